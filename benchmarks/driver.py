"""Replays a saved trace against one engine, in wall-clock time, and records the run.

``replay`` is the in-process loop: it starts each request when its arrival time comes,
steps the engine while it has work, and resumes a paused request once its tool's duration
has passed (the tool's token ids from the trace are appended). Tools are simulated by
waiting, so the engine keeps serving the others meanwhile; when nothing runs, the loop
sleeps until the next arrival or tool return.

A request's record: start = its arrival time in the trace, end = when its last segment
came back, output tokens = what the model generated, tool time = what the loop actually
waited (a resume happens between engine steps, so at most a step late). A run that has not
finished ``drain_s`` after its last arrival is cut off: what is left is aborted and
recorded as not completed.

Per run the engine counters are: forward time (the sum of engine step wall times), the
share of it spent recomputing (each step's time split in proportion to the tokens it
recomputed), forwarded and recomputed tokens, the idle KV tokens of paused requests after
every step and resume, the cache capacity, and the bytes swapped.

``replay_http`` does the same through a server (``benchmarks.http_replay.HttpReplay``).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Callable

from benchmarks.http_replay import HttpReplay, kv_capacity_from_metrics, metric_sum
from infercept.bench.metrics import EngineCounters, RequestRecord
from infercept.bench.workload import Request, Trace


# Events this close to now count as due: a sleep until a due time may wake a hair short of it.
_DUE_SLACK_S = 1e-6


@dataclass
class RunResult:
    policy: str
    rate: float
    records: list[RequestRecord]
    counters: EngineCounters
    details: dict = field(default_factory=dict)  # engine diagnostics (decisions, preemptions)


@dataclass
class _Progress:
    request: Request
    segment: int = 0  # index of the segment running or about to run
    output_tokens: int = 0
    tool_s_total: float = 0.0
    paused_at_s: float | None = None
    end_s: float | None = None


class _Replay:
    def __init__(self, backend, trace: Trace, drain_s: float, clock: Callable[[], float],
                 sleep: Callable[[float], None]):
        self.backend = backend
        self.arrivals = sorted(trace.requests, key=lambda r: r.arrival_s)
        self.deadline_s = (self.arrivals[-1].arrival_s if self.arrivals else 0.0) + drain_s
        self.clock, self.sleep = clock, sleep
        self.progress: dict[str, _Progress] = {}
        self.tools: list[tuple[float, str]] = []  # (due time, request id), a heap
        self.num_open = 0
        self.forward_s = self.recompute_forward_s = 0.0
        self.forwarded_tokens = self.recomputed_tokens = self.num_steps = 0
        self.idle_events: list[tuple[float, int]] = []
        self.resume_lateness_s: list[float] = []
        self.used_token_s = 0.0  # device KV in use, integrated over busy steps
        self.used_tokens_max = 0
        self.step_cpu_s = 0.0  # this process's CPU time in engine steps

    def now_s(self) -> float:
        return self.clock() - self.t0

    def run(self) -> float:
        """Replay to the end or the deadline; returns the time it stopped."""
        self.t0 = self.clock()
        next_arrival = 0
        while True:
            now = self.now_s()
            due_s = now + _DUE_SLACK_S
            while (next_arrival < len(self.arrivals)
                   and self.arrivals[next_arrival].arrival_s <= due_s):
                self._start(self.arrivals[next_arrival])
                next_arrival += 1
            self._resume_due(now)
            if next_arrival == len(self.arrivals) and self.num_open == 0:
                return now
            if now > self.deadline_s:
                self.backend.abort_all()
                return now
            if self.backend.has_work():
                cpu_s = time.process_time()
                report = self.backend.step()
                self.step_cpu_s += time.process_time() - cpu_s
                self._account(report)
                continue
            upcoming = [self.deadline_s]
            if next_arrival < len(self.arrivals):
                upcoming.append(self.arrivals[next_arrival].arrival_s)
            if self.tools:
                upcoming.append(self.tools[0][0])
            self.sleep(max(0.0, min(upcoming) - now))

    def _start(self, request: Request) -> None:
        self.progress[request.request_id] = _Progress(request)
        self.num_open += 1
        self.backend.start(request)

    def _resume_due(self, now: float) -> None:
        resumed = False
        while self.tools and self.tools[0][0] <= now + _DUE_SLACK_S:
            due_s, request_id = heapq.heappop(self.tools)
            state = self.progress[request_id]
            state.tool_s_total += now - state.paused_at_s
            self.resume_lateness_s.append(now - due_s)
            state.segment += 1
            self.backend.resume(request_id)
            resumed = True
        if resumed:
            self._sample_idle(self.backend.idle_device_tokens())

    def _account(self, report) -> None:
        now = self.now_s()
        self.num_steps += 1
        self.forward_s += report.wall_s
        self.forwarded_tokens += report.forwarded_tokens
        self.recomputed_tokens += report.recomputed_tokens
        if report.forwarded_tokens > 0:
            self.recompute_forward_s += (report.wall_s * report.recomputed_tokens
                                         / report.forwarded_tokens)
        self._sample_idle(report.idle_device_tokens)
        self.used_token_s += report.used_device_tokens * report.wall_s
        self.used_tokens_max = max(self.used_tokens_max, report.used_device_tokens)
        for done in report.done:
            state = self.progress[done.request_id]
            state.output_tokens += done.num_tokens
            if done.finished:
                state.end_s = now
                self.num_open -= 1
            else:
                state.paused_at_s = now
                tool_s = state.request.segments[state.segment].tool_s
                heapq.heappush(self.tools, (now + tool_s, done.request_id))

    def _sample_idle(self, idle_tokens: int) -> None:
        if not self.idle_events or self.idle_events[-1][1] != idle_tokens:
            self.idle_events.append((self.now_s(), idle_tokens))

    def records(self, stopped_s: float) -> list[RequestRecord]:
        records = []
        for request in self.arrivals:
            state = self.progress.get(request.request_id)
            if state is None:  # never started: the run was cut off before its arrival
                continue
            completed = state.end_s is not None
            records.append(RequestRecord(
                request.request_id, request.arrival_s, state.end_s if completed else stopped_s,
                state.output_tokens, state.tool_s_total, state.segment, completed))
        return records


def replay(backend, trace: Trace, *, drain_s: float, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> RunResult:
    """Replay ``trace`` against an in-process backend (``benchmarks.backends``)."""
    before = backend.counters()
    loop = _Replay(backend, trace, drain_s, clock, sleep)
    stopped_s = loop.run()
    records = loop.records(stopped_s)
    change = counter_change(before, backend.counters())
    counters = EngineCounters(
        forward_s=loop.forward_s,
        recompute_forward_s=loop.recompute_forward_s,
        forwarded_tokens=loop.forwarded_tokens,
        recomputed_tokens=loop.recomputed_tokens,
        idle_kv_events=tuple(loop.idle_events),
        kv_capacity_tokens=backend.kv_capacity_tokens,
        swapped_out_bytes=int(change.get("bytes_swapped_out", 0)),
        swapped_in_bytes=int(change.get("bytes_swapped_in", 0)),
    )
    lateness = sorted(loop.resume_lateness_s)
    details = {
        "engine": change,
        "num_steps": loop.num_steps,
        # Below 1 (one thread) when other processes took the cores during the steps.
        "cpu_s_per_forward_s": loop.step_cpu_s / loop.forward_s if loop.forward_s else None,
        "device_kv_used_tokens_mean_busy": (loop.used_token_s / loop.forward_s
                                            if loop.forward_s else None),
        "device_kv_used_tokens_max": loop.used_tokens_max,
        "elapsed_s": stopped_s,
        "resume_lateness_p50_s": lateness[len(lateness) // 2] if lateness else None,
        "resume_lateness_max_s": lateness[-1] if lateness else None,
        "output_token_mismatches": _mismatches(trace, records),
    }
    return RunResult(backend.policy, trace.rate, records, counters, details)


def counter_change(before: dict, after: dict) -> dict:
    """``after - before`` for the numeric counters (and the per-action decision counts)."""
    change = {}
    for key, value in after.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and key in before:
            change[key] = value - before[key]
        elif key == "decisions":
            old = before.get(key, {})
            change[key] = {a: n - old.get(a, 0) for a, n in value.items() if n != old.get(a, 0)}
    change.pop("idle_device_tokens", None)  # a gauge, not a counter
    change.pop("free_cpu_blocks", None)
    return change


def _mismatches(trace: Trace, records: list[RequestRecord]) -> int:
    """Completed requests whose generated tokens differ from the trace's (should be 0)."""
    wanted = {r.request_id: r.output_tokens for r in trace.requests}
    return sum(1 for r in records if r.completed and r.output_tokens != wanted[r.request_id])


# ---------------------------------------------------------------------------- HTTP

def replay_http(base_url: str, model: str, policy: str, trace: Trace, *,
                drain_s: float) -> RunResult:
    """Replay ``trace`` through a running server (InferCept's, or stock vLLM's for "vllm")."""
    requests = sorted(trace.requests, key=lambda r: r.arrival_s)
    deadline_s = (requests[-1].arrival_s if requests else 0.0) + drain_s
    client = HttpReplay(base_url, model, policy)
    logs, before, after, idle_events = client.run(requests, deadline_s)
    stopped_s = max([deadline_s] + [log.end_s for log in logs.values() if log.end_s is not None])
    records = [
        RequestRecord(r.request_id, r.arrival_s, logs[r.request_id].end_s or stopped_s,
                      logs[r.request_id].output_tokens, logs[r.request_id].tool_s_total,
                      logs[r.request_id].num_interceptions, logs[r.request_id].end_s is not None)
        for r in requests]
    if policy == "vllm":
        forwarded = sum(log.forwarded_tokens for log in logs.values())
        recomputed = sum(log.recomputed_tokens for log in logs.values())
        swapped_out = swapped_in = 0
    else:
        def change(name: str, **labels: str) -> float:
            return ((metric_sum(after, name, **labels) or 0)
                    - (metric_sum(before, name, **labels) or 0))

        forwarded = int(change("infercept:forwarded_tokens_total"))
        recomputed = int(change("infercept:recomputed_tokens_total"))
        swapped_out = int(change("infercept:bytes_swapped_total", direction="out"))
        swapped_in = int(change("infercept:bytes_swapped_total", direction="in"))
    counters = EngineCounters(
        forwarded_tokens=forwarded, recomputed_tokens=recomputed,
        idle_kv_events=tuple(idle_events), kv_capacity_tokens=kv_capacity_from_metrics(after),
        swapped_out_bytes=swapped_out, swapped_in_bytes=swapped_in)
    decisions = {labels["strategy"]: value - (metric_sum(before, name, **labels) or 0)
                 for name, labels, value in after
                 if name == "infercept:decisions_total" and "strategy" in labels}
    details = {"backend": "http", "output_token_mismatches": _mismatches(trace, records),
               "engine": {"decisions": {k: v for k, v in decisions.items() if v}}}
    return RunResult(policy, trace.rate, records, counters, details)
