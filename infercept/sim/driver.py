"""Runs the real policy inside the simulated engine, as infercept/adapter/policy_driver.py
does inside vLLM's scheduler: every iteration, describe each intercepted request and the
batch (``Intercepted``, ``BatchState``), call ``policy.plan``, carry out the plan.

Calling the planner for every intercepted request every iteration is O(n) per iteration
and would dominate a paper-scale run, so by default the driver leaves out calls whose
answer is known without asking (``plan_every_iteration=True`` turns this off; the tests
check both give the same run):

- A request whose KV was discarded (NONE) only ever gets KEEP_DISCARDED and changes no
  other decision (no policy budgets for it): never passed.
- Swapped requests (CPU) only matter to min-waste (prefetch, or discard to make CPU room);
  the other policies leave them as they are.
- "discard" and "swap" decide once, at the first plan after a pause.
- "preserve" changes nothing unless the batch needs device memory
  (``device_tokens_needed > 0``).
- "ttl" changes nothing unless under pressure or a preserved request's time-to-live ran
  out (checked against the earliest expiry, recomputed when the estimator learns).
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

    def _candidates(self, engine: "Engine", now: float) -> list["SimRequest"]:
        device = engine.intercepted_on(Location.DEVICE)
        name = self.policy.name
        if self._uses_cpu:
            return [*device, *engine.intercepted_on(Location.CPU)]
        if not device:
            return []
        if name in _DECIDE_ONCE:
            return list(device)
        if self._uses_ttl and now >= self._earliest_expiry_s(device):
            return list(device)
        return list(device) if engine.device_tokens_needed() > 0 else []

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

    def observe_resume(self, request: "SimRequest", now: float) -> None:
        self.estimator.observe(request.session.tool, now - request.paused_at_s)
        if self._uses_ttl:
            self._next_expiry_s = None
