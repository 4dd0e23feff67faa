"""Runs the real policy inside the simulated engine, as infercept/adapter/policy_driver.py
does inside vLLM's scheduler: every iteration, describe each intercepted request and the
batch (``Intercepted``, ``BatchState``), call ``policy.plan``, carry out the plan.

Calling the planner for every intercepted request every iteration is O(n) per iteration
and would dominate a paper-scale run, so by default the driver leaves out calls whose
answer is known without asking (``plan_every_iteration=True`` turns this off; the tests
check both give the same run):

- A request whose KV was discarded (NONE) only ever gets KEEP_DISCARDED and changes no
  other decision (no policy budgets for it): never passed.
- min-waste without memory pressure only swaps out preserved requests whose context fits
  the iteration's swap budget; the others stay preserved whatever the plan says about the
  rest: only those that fit are passed.
- Swapped requests (CPU) only matter to min-waste, which prefetches one that resumes
  soon (remaining_s <= swap_s(C) + forward_s(batch_tokens)) and discards some to make CPU
  room for a swap-out. All are passed when CPU room could run short (the preserved
  contexts exceed the free CPU tokens); otherwise only those that pass the planner's own
  "soon" test, run here on the ones ``SwappedWatch`` says could pass it.
- "discard" and "swap" decide once, at the first plan after a pause.
- "preserve" changes nothing unless the batch needs device memory
  (``device_tokens_needed > 0``), and then only evicts its latest first arrivals until
  their contexts cover the need: only those are passed.
- "ttl" changes nothing unless under pressure or a preserved request's time-to-live ran
  out (checked against the earliest expiry, recomputed when the estimator learns).
- Only "min-waste" and "ttl" read the duration estimator, so only they teach it.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from infercept.policy import (Action, DurationEstimator, Intercepted, Location, MinWastePolicy,
                              make_policy)
from infercept.sim.swapped import SwappedWatch

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
        self._uses_cpu = isinstance(self.policy, MinWastePolicy)
        self._uses_ttl = self.policy.name == "ttl"
        self._next_expiry_s: float | None = None  # ttl: earliest expiry; None: recompute
        self._swapped = SwappedWatch(self.estimator)

    # ---- every iteration ---------------------------------------------------

    def step(self, engine: "Engine", now: float) -> None:
        """Plan and apply, before the engine schedules the iteration starting at ``now``."""
        if self.plan_every_iteration:
            candidates, batch = list(engine.intercepts.values()), None
        else:
            candidates, batch = self._candidates(engine, now)
        if not candidates:
            return
        views = [self._view(engine, r, now) for r in candidates]
        plan = self.policy.plan(views, batch or engine.batch_state(), engine.cost)
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
            for request in candidates:
                if request.location is Location.CPU:
                    self._swapped.schedule(engine, request, now,
                                           self._remaining_s(request, now))

    def _candidates(self, engine: "Engine", now: float):
        """The requests to plan for (none: no plan this iteration), and the batch state
        when it was needed to pick them."""
        device = list(engine.intercepted_on(Location.DEVICE))
        if self._uses_cpu:
            return self._min_waste_candidates(engine, device, now)
        if not device:
            return [], None
        if self.policy.name in _DECIDE_ONCE:
            return device, None
        if self._uses_ttl and now >= self._earliest_expiry_s(device):
            return device, None
        batch = engine.batch_state()
        if batch.device_tokens_needed == 0:
            return [], batch
        if self.policy.name == "preserve":
            return _latest_first_until(engine, device, batch.device_tokens_needed), batch
        return device, batch

    def _min_waste_candidates(self, engine: "Engine", device: list, now: float):
        due = self._swapped.due(engine, now)
        if not device and not due:
            return [], None
        batch = engine.batch_state()
        if device and batch.device_tokens_needed == 0 and not self.policy.discard_without_pressure:
            # no pressure: a preserved request whose context exceeds the swap budget stays
            # preserved and takes nothing from the others' budget
            budget_tokens = engine.cost.swap_budget_tokens(batch.batch_tokens)
            device = [r for r in device if engine.own_kv_tokens(r) <= budget_tokens]
            if not device and not due:
                return [], batch
        if device and sum(engine.own_kv_tokens(r) for r in device) > batch.free_cpu_tokens:
            # swapped requests may be discarded to make room: pass them all
            return device + list(engine.intercepted_on(Location.CPU)), batch
        iteration_s = engine.cost.forward_s(batch.batch_tokens)
        soon = []
        for request in due:  # the planner's own test for a prefetch
            remaining_s = self._remaining_s(request, now)
            if remaining_s <= engine.cost.swap_s(request.copied_tokens) + iteration_s:
                soon.append(request)
            else:
                self._swapped.schedule(engine, request, now, remaining_s)
        return device + soon, batch

    def _remaining_s(self, request: "SimRequest", now: float) -> float:
        return self.estimator.remaining_s(request.tool, now - request.paused_at_s)

    def _earliest_expiry_s(self, device) -> float:
        if self._next_expiry_s is None:
            ttl_by_tool: dict[str, float | None] = {}
            earliest_s = math.inf
            for request in device:
                tool = request.tool
                if tool not in ttl_by_tool:
                    ttl_by_tool[tool] = self.estimator.ttl_s(tool)
                ttl_s = ttl_by_tool[tool]
                if ttl_s is not None:
                    earliest_s = min(earliest_s, request.paused_at_s + ttl_s)
            self._next_expiry_s = earliest_s
        return self._next_expiry_s

    def _view(self, engine: "Engine", request: "SimRequest", now: float) -> Intercepted:
        tool = request.tool
        elapsed_s = now - request.paused_at_s
        return Intercepted(
            request_id=request.key,
            context_tokens=request.kv_tokens,
            shared_tokens=request.kv_tokens - engine.own_kv_tokens(request),
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
        self.estimator.observe(request.tool, now - request.paused_at_s)
        if self._uses_ttl:
            self._next_expiry_s = None
        if self._uses_cpu:
            self._swapped.observed(request.tool)


def _latest_first_until(engine: "Engine", device: list["SimRequest"],
                        needed_tokens: int) -> list["SimRequest"]:
    """The preserved requests that preserve evicts under pressure: latest first arrival
    first, until their own tokens cover ``needed_tokens``; the others stay as they are."""
    chosen, freed_tokens = [], 0
    for request in sorted(device, key=_order_key, reverse=True):
        if freed_tokens >= needed_tokens:
            break
        chosen.append(request)
        freed_tokens += engine.own_kv_tokens(request)
    return chosen


def _order_key(request: "SimRequest") -> tuple[float, str]:
    return (request.arrival_s, request.key)

