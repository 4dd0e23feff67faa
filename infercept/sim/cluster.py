"""The discrete-event loop: engine replicas behind a router, fed by a trace.

Time advances replica by replica: the runnable replica with the earliest clock runs its
next iteration, unless an arrival (a first segment, or a follow-up when a tool call
returns) comes first; an arrival is routed and queued, and the replica sees it at its
next iteration boundary. A replica with nothing to run waits for the next arrival.
"""

from __future__ import annotations

import heapq
import math
from typing import Sequence

from infercept.bench.workload import Trace
from infercept.sim.engine import PAUSE, Engine
from infercept.sim.router import Router
from infercept.sim.state import Session

ABORT_CHECK_EVERY_S = 10.0


class Deadlock(RuntimeError):
    """Requests are left that no replica can ever run (a context larger than the cache)."""


class Cluster:
    def __init__(self, engines: Sequence[Engine], router: Router) -> None:
        if not engines:
            raise ValueError("a cluster needs at least one engine")
        self.engines = list(engines)
        self.router = router
        self.num_migrations = 0
        self.aborted = False
        self._events: list[tuple[float, int, Session]] = []
        self._num_events = 0

    def run(self, trace: Trace, *, horizon_s: float = math.inf,
            abort_p90_s_per_token: float | None = None) -> list[Session]:
        """Simulate ``trace`` until every request ends, the clock reaches ``horizon_s``, or
        (with ``abort_p90_s_per_token``) the p90 normalized latency surely exceeds it.
        Returns one Session per trace request, in trace order."""
        sessions = [Session(request) for request in trace.requests]
        for session in sessions:
            self._push(session.request.arrival_s, session)
        next_check_s = ABORT_CHECK_EVERY_S
        engines, events = self.engines, self._events
        while True:
            next_event_s = events[0][0] if events else math.inf
            engine, clock_s = None, math.inf
            for candidate in engines:
                if candidate.runnable and candidate.clock_s < clock_s:
                    engine, clock_s = candidate, candidate.clock_s
            now_s = min(clock_s, next_event_s)
            if now_s >= horizon_s or now_s == math.inf:
                break
            if abort_p90_s_per_token is not None and now_s >= next_check_s:
                next_check_s = now_s + ABORT_CHECK_EVERY_S
                if _surely_over(sessions, now_s, abort_p90_s_per_token):
                    self.aborted = True
                    break
            if clock_s < next_event_s:
                for kind, session, time_s in engine.step():
                    if kind == PAUSE:
                        session.paused_at_s = time_s
                        tool_s = session.request.segments[session.segment].tool_s
                        self._push(time_s + tool_s, session)
                    else:
                        session.end_s = time_s
            else:
                _, _, session = heapq.heappop(events)
                self._deliver(session, next_event_s)
        if not self.aborted and horizon_s == math.inf and any(s.end_s is None for s in sessions):
            raise Deadlock("requests are left that no replica can run")
        return sessions

    def _push(self, time_s: float, session: Session) -> None:
        heapq.heappush(self._events, (time_s, self._num_events, session))
        self._num_events += 1

    def _deliver(self, session: Session, now_s: float) -> None:
        follow_up = session.replica is not None
        if follow_up:
            session.next_segment()
        index = self.router.route(session, self.engines, follow_up)
        if follow_up and index != session.replica:
            self.num_migrations += 1
            session.num_migrations += 1
            previous = self.engines[session.replica]
            if previous.holds(session.request_id):
                previous.release(session.request_id)
        session.replica = index
        self.engines[index].submit(session, now_s)


def _surely_over(sessions: Sequence[Session], now_s: float, slo_s_per_token: float) -> bool:
    """More than a tenth of the requests (plus one) already have a normalized latency over
    the SLO, counting an unfinished one by its lower bound (now, less all its tool time)."""
    over = 0
    limit = 0.1 * len(sessions) + 1
    for session in sessions:
        request = session.request
        if request.arrival_s > now_s:
            continue
        end_s = now_s if session.end_s is None else session.end_s
        latency_s = end_s - request.arrival_s - request.tool_s_total
        if latency_s > slo_s_per_token * request.output_tokens:
            over += 1
            if over > limit:
                return True
    return False
