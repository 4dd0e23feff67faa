"""Which swapped requests min-waste could prefetch now, without asking about every one.

min-waste prefetches a swapped request when its estimated remaining time R is at most
swap_s(C) + forward_s(batch_tokens). R falls at most as fast as time passes (between
recorded durations it is ``mean - elapsed``; at one it jumps up), so while the estimator
learns nothing about its tool, R cannot reach X = swap_s(C) + forward_s(max batch) before
R - X seconds: that is when the request is next due. One already within X of it is kept
in a small band and checked every iteration. When the estimator learns a duration of a
tool, the next checks of that tool's swapped requests (and of those whose tool has no
history of its own, whose estimate comes from every tool's) are recomputed at the next
iteration.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from infercept.policy import DurationEstimator, Location

if TYPE_CHECKING:
    from infercept.sim.engine import Engine
    from infercept.sim.state import SimRequest

_SLACK_S = 1e-9  # rounding margin on a next check


class SwappedWatch:
    def __init__(self, estimator: DurationEstimator) -> None:
        self.estimator = estimator
        self._band: dict[str, "SimRequest"] = {}
        self._earliest_s = -math.inf  # no swapped request is due before this
        self._dirty_tools: set[str] = set()
        self._observed_tools: set[str] = set()

    def observed(self, tool: str) -> None:
        """The estimator learned a duration of ``tool``."""
        self._observed_tools.add(tool)
        self._dirty_tools.add(tool)

    def due(self, engine: "Engine", now: float) -> list["SimRequest"]:
        """Swapped requests whose planner test must run now."""
        self._refresh(engine, now)
        due = []
        for key, request in list(self._band.items()):
            if engine.is_swapped(request):
                due.append(request)
            else:
                del self._band[key]
        if now >= self._earliest_s:
            earliest_s = math.inf
            for request in engine.intercepted_on(Location.CPU):
                if request.key in self._band:
                    continue
                if now >= request.next_check_s:
                    due.append(request)
                elif request.next_check_s < earliest_s:
                    earliest_s = request.next_check_s
            self._earliest_s = earliest_s
        return due

    def schedule(self, engine: "Engine", request: "SimRequest", now: float,
                 remaining_s: float) -> None:
        """Set when a swapped request with remaining estimate ``remaining_s`` is next due."""
        gap_s = remaining_s - engine.cost.swap_s(request.copied_tokens) - engine.max_forward_s
        if gap_s <= _SLACK_S:
            request.next_check_s = now
            self._band[request.key] = request
            return
        self._band.pop(request.key, None)
        request.next_check_s = now + gap_s - _SLACK_S
        self._earliest_s = min(self._earliest_s, request.next_check_s)

    def _refresh(self, engine: "Engine", now: float) -> None:
        """Reschedule the swapped requests of tools whose estimates moved (the estimator's
        ``remaining_many_s`` answers ``remaining_s`` for all of a tool's at once)."""
        if not self._dirty_tools:
            return
        tools = set(self._dirty_tools)
        tools.update(t for t in engine.swapped_tools() if t not in self._observed_tools)
        self._dirty_tools.clear()
        band, earliest_s = self._band, self._earliest_s
        max_forward_s, swap_s_per_token = engine.max_forward_s, engine.cost.swap_s_per_token
        for tool in tools:
            requests = list(engine.swapped_of_tool(tool))
            remaining = self.estimator.remaining_many_s(
                tool, [now - request.paused_at_s for request in requests])
            for request, remaining_s in zip(requests, remaining):
                gap_s = remaining_s - swap_s_per_token * request.copied_tokens - max_forward_s
                if gap_s <= _SLACK_S:
                    request.next_check_s = now
                    band[request.key] = request
                    continue
                if request.key in band:
                    del band[request.key]
                request.next_check_s = now + gap_s - _SLACK_S
                if request.next_check_s < earliest_s:
                    earliest_s = request.next_check_s
        self._earliest_s = earliest_s
