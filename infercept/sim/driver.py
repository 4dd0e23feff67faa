"""Runs the real policy inside the simulated engine, as infercept/adapter/policy_driver.py
does inside vLLM's scheduler: every iteration, describe each intercepted request and the
batch (``Intercepted``, ``BatchState``), call ``policy.plan``, carry out the plan.

Calling the planner for every intercepted request every iteration is O(n) per iteration
and would dominate a paper-scale run, so by default the driver leaves out calls whose
answer is known without asking (``plan_every_iteration=True`` turns this off; the tests
check both give the same run):

- A request whose KV was discarded (NONE) only ever gets KEEP_DISCARDED and changes no
  other decision (no policy budgets for it): never passed.
- Swapped requests (CPU) only matter to min-waste, which prefetches one that resumes
  soon (remaining_s <= swap_s(C) + forward_s(batch_tokens)) and discards some to make CPU
  room for a swap-out. A swapped request is passed when CPU room could run short (the
  preserved contexts exceed the free CPU tokens), or once its next check comes: the
  estimate of the remaining time falls at most as fast as time passes (between recorded
  durations it is ``mean - elapsed``; past one it jumps up), so from R > X it cannot reach
  X = swap_s(C) + forward_s(max_num_batched_tokens) before R - X seconds have passed,
  unless the estimator learns a new duration of that tool (which checks it again).
- "discard" and "swap" decide once, at the first plan after a pause.
- "preserve" changes nothing unless the batch needs device memory
  (``device_tokens_needed > 0``).
- "ttl" changes nothing unless under pressure or a preserved request's time-to-live ran
  out (checked against the earliest expiry, recomputed when the estimator learns).
- Only "min-waste" and "ttl" read the duration estimator, so only they teach it.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from infercept.policy import Action, DurationEstimator, Intercepted, Location, make_policy

if TYPE_CHECKING:
    from infercept.sim.engine import Engine
    from infercept.sim.state import SimRequest

_DECIDE_ONCE = frozenset({"discard", "swap"})
_SLACK_S = 1e-9  # rounding margin on a swapped request's next check


class PolicyDriver:
    def __init__(self, policy_name: str, plan_every_iteration: bool = False) -> None:
        self.policy = make_policy(policy_name)
        self.estimator = DurationEstimator()
        self.plan_every_iteration = plan_every_iteration
        self.decisions: Counter = Counter()  # action value -> count (location changes)
        self.num_plans = 0
        self._uses_cpu = self.policy.name == "min-waste"
        self._uses_ttl = self.policy.name == "ttl"
        self._next_expiry_s: float | None = None  # ttl: earliest expiry; None: recompute
        self._observed_tools: set[str] = set()  # tools with a history of their own

    # ---- every iteration ---------------------------------------------------

    def step(self, engine: "Engine", now: float) -> None:
        """Plan and apply, before the engine schedules the iteration starting at ``now``."""
        if self.plan_every_iteration:
            candidates = list(engine.intercepts.values())
        else:
            candidates = self._candidates(engine, now)
        if not candidates:
            return
        views = [self._view(r, now) for r in candidates]
        plan = self.policy.plan(views, engine.batch_state(), engine.cost)
        self.num_plans += 1
        by_id = {r.key: r for r in candidates}
        for decision in plan.decisions:
            request = by_id[decision.request_id]
            before = request.location
            self._apply(engine, request, decision.action)
            if request.location is not before:
                self.decisions[decision.action.value] += 1
        if self._uses_ttl:
            self._next_expiry_s = None
        if self._uses_cpu:
            self._schedule_checks(engine, candidates, now)

    def _candidates(self, engine: "Engine", now: float) -> list["SimRequest"]:
        device = engine.intercepted_on(Location.DEVICE)
        name = self.policy.name
        if self._uses_cpu:
            return [*device, *self._swapped_to_check(engine, device, now)]
        if not device:
            return []
        if name in _DECIDE_ONCE:
            return list(device)
        if self._uses_ttl and now >= self._earliest_expiry_s(device):
            return list(device)
        return list(device) if engine.device_tokens_needed() > 0 else []

    @staticmethod
    def _swapped_to_check(engine: "Engine", device, now: float) -> list["SimRequest"]:
        swapped = engine.intercepted_on(Location.CPU)
        if not swapped:
            return []
        if device and sum(r.kv_tokens for r in device) > engine.cpu.num_free_blocks * \
                engine.block_size:
            return list(swapped)
        return [r for r in swapped if now >= r.next_check_s]

    def _schedule_checks(self, engine: "Engine", requests, now: float) -> None:
        """When each swapped request could next resume soon (see the module docstring)."""
        for request in requests:
            if request.location is not Location.CPU:
                continue
            remaining_s = self.estimator.remaining_s(request.session.tool,
                                                     now - request.paused_at_s)
            soon_s = engine.cost.swap_s(request.kv_tokens) + engine.max_forward_s
            request.next_check_s = now + max(0.0, remaining_s - soon_s - _SLACK_S)

    def _earliest_expiry_s(self, device) -> float:
        if self._next_expiry_s is None:
            expiries = [r.paused_at_s + ttl_s for r in device
                        if (ttl_s := self.estimator.ttl_s(r.session.tool)) is not None]
            self._next_expiry_s = min(expiries, default=math.inf)
        return self._next_expiry_s

    def _view(self, request: "SimRequest", now: float) -> Intercepted:
        tool = request.session.tool
        elapsed_s = now - request.paused_at_s
        return Intercepted(
            request_id=request.key,
            context_tokens=request.kv_tokens,
            location=request.location,
            elapsed_s=elapsed_s,
            remaining_s=self.estimator.remaining_s(tool, elapsed_s),
            arrival_s=request.arrival_s,
            ttl_s=self.estimator.ttl_s(tool) if self._uses_ttl else None,
        )

    @staticmethod
    def _apply(engine: "Engine", request: "SimRequest", action: Action) -> None:
        """What the adapter's ``_apply`` does: SWAP_OUT falls back to DISCARD without CPU
        room; SWAP_IN (prefetch) does nothing without device room."""
        if action is Action.SWAP_OUT and engine.swap_out(request):
            return
        if action in (Action.SWAP_OUT, Action.DISCARD):
            engine.discard(request)
        elif action is Action.SWAP_IN:
            engine.prefetch(request)

    # ---- pause and resume --------------------------------------------------

    def paused(self, request: "SimRequest") -> None:
        if self._uses_ttl:
            self._next_expiry_s = None

    def observe_resume(self, engine: "Engine", request: "SimRequest", now: float) -> None:
        """Teach the estimator the finished call's duration; skipped for the policies that
        never read an estimate (their plans do not depend on it), as it is costly."""
        if not (self._uses_cpu or self._uses_ttl):
            return
        tool = request.session.tool
        self.estimator.observe(tool, now - request.paused_at_s)
        if self._uses_ttl:
            self._next_expiry_s = None
        if self._uses_cpu:  # estimates of this tool (and of tools without history) moved
            self._observed_tools.add(tool)
            for other in engine.intercepted_on(Location.CPU):
                other_tool = other.session.tool
                if other_tool == tool or other_tool not in self._observed_tools:
                    other.next_check_s = now
