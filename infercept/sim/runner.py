"""Simulate a trace under a policy, sweep request rates, and search the sustainable rate.

Results use the real benchmark's types (``RequestRecord``, ``EngineCounters``,
``RunMetrics``), so ``infercept.bench.metrics.write_summary`` and ``infercept.bench.plots``
take them as they are.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from infercept.bench.metrics import (EngineCounters, RequestRecord, RunMetrics,
                                     compute_run_metrics, meets_slo)
from infercept.bench.workload import Trace, generate_trace
from infercept.sim.cluster import Cluster
from infercept.sim.engine import ENGINE_POLICIES, UNBOUNDED, Engine
from infercept.sim.profiles import HardwareProfile
from infercept.sim.router import make_router
from infercept.sim.state import Session

POLICIES = ENGINE_POLICIES
# Unfinished requests are cut off this long after the last one could have ended if served
# at once (its arrival plus its tool time); a run cut off does not meet any SLO.
HORIZON_SLACK_S = 600.0


@dataclass(frozen=True)
class SimConfig:
    """How to run: replicas and router, vLLM options, and run control.

    ``abort_over_slo``: stop a run as soon as its p90 normalized latency surely exceeds the
    profile's SLO (it cannot be sustainable); its metrics then cover the part that ran.
    """

    replicas: int = 1
    router: str = "affinity"
    prefix_caching: bool = True
    plan_every_iteration: bool = False
    check_invariants: bool = False
    horizon_slack_s: float = HORIZON_SLACK_S
    abort_over_slo: bool = False


@dataclass(frozen=True)
class SimResult:
    policy: str
    rate: float
    records: tuple[RequestRecord, ...]
    counters: EngineCounters
    metrics: RunMetrics | None  # None when no request completed
    stats: dict = field(default_factory=dict)


def simulate(trace: Trace, profile: HardwareProfile, policy: str,
             config: SimConfig = SimConfig()) -> SimResult:
    """Run every request of ``trace`` through ``config.replicas`` engines under ``policy``."""
    capacity = unbounded_capacity_tokens(trace, profile) if policy == UNBOUNDED else None
    engines = [Engine(profile, policy, prefix_caching=config.prefix_caching,
                      plan_every_iteration=config.plan_every_iteration,
                      check_invariants=config.check_invariants,
                      device_capacity_tokens=capacity)
               for _ in range(config.replicas)]
    cluster = Cluster(engines, make_router(config.router))
    horizon_s = max((r.arrival_s + r.tool_s_total for r in trace.requests), default=0.0)
    started = time.perf_counter()
    sessions = cluster.run(trace, horizon_s=horizon_s + config.horizon_slack_s,
                           abort_p90_s_per_token=(profile.slo_p90_s_per_token
                                                  if config.abort_over_slo else None))
    wall_s = time.perf_counter() - started
    stop_s = max(engine.clock_s for engine in engines)
    records = tuple(_record(session, stop_s) for session in sessions)
    counters = merge_counters([engine.counters() for engine in engines])
    metrics = compute_run_metrics(records, counters) if any(r.completed for r in records) else None
    return SimResult(policy, trace.rate, records, counters, metrics,
                     _stats(engines, cluster, wall_s))


def _record(session: Session, stop_s: float) -> RequestRecord:
    request = session.request
    return RequestRecord(request_id=request.request_id, start_s=request.arrival_s,
                         end_s=stop_s if session.end_s is None else session.end_s,
                         output_tokens=request.output_tokens,
                         tool_s_total=request.tool_s_total,
                         num_interceptions=request.num_interceptions,
                         completed=session.end_s is not None)


def _stats(engines: Sequence[Engine], cluster: Cluster, wall_s: float) -> dict:
    decisions: dict[str, int] = {}
    for engine in engines:
        if engine.driver is not None:
            for action, count in engine.driver.decisions.items():
                decisions[action] = decisions.get(action, 0) + count
    return {
        "wall_s": wall_s,
        "iterations": sum(e.num_iterations for e in engines),
        "preemptions": sum(e.num_preemptions for e in engines),
        "swap_stall_s": sum(e.stall_s for e in engines),
        "migrations": cluster.num_migrations,
        "aborted": cluster.aborted,
        "decisions": decisions,
        # Cached prefix blocks count as free, as in vLLM.
        "device_blocks_in_use_at_end": sum(e.pool.num_used_blocks for e in engines),
        "cpu_blocks_in_use_at_end": sum(e.cpu.num_used_blocks for e in engines),
        "intercepted_at_end": sum(len(e.intercepts) for e in engines),
    }


def unbounded_capacity_tokens(trace: Trace, profile: HardwareProfile) -> int:
    """A KV cache that holds every request's whole context at once (it never fills)."""
    block_size = profile.block_size_tokens
    blocks = sum(-(-(r.context_tokens + 1) // block_size) + 1 for r in trace.requests)
    return max(1, blocks) * block_size


def merge_counters(parts: Sequence[EngineCounters]) -> EngineCounters:
    """Counters of several replicas as one: sums, and the idle-KV step functions added."""
    if len(parts) == 1:
        return parts[0]
    tagged = sorted((time_s, index, tokens) for index, part in enumerate(parts)
                    for time_s, tokens in part.idle_kv_events)
    current, total, merged = [0] * len(parts), 0, []
    for time_s, index, tokens in tagged:
        total += tokens - current[index]
        current[index] = tokens
        merged.append((time_s, total))
    return EngineCounters(
        forward_s=sum(p.forward_s or 0.0 for p in parts),
        recompute_forward_s=sum(p.recompute_forward_s or 0.0 for p in parts),
        forwarded_tokens=sum(p.forwarded_tokens or 0 for p in parts),
        recomputed_tokens=sum(p.recomputed_tokens or 0 for p in parts),
        idle_kv_events=tuple(merged),
        kv_capacity_tokens=sum(p.kv_capacity_tokens or 0 for p in parts),
        swapped_out_bytes=sum(p.swapped_out_bytes for p in parts),
        swapped_in_bytes=sum(p.swapped_in_bytes for p in parts))


# ---------------------------------------------------------------------------- traces

TraceMaker = Callable[[float], Trace]


def trace_maker(workload: str, duration_s: float, seed: int, *, time_scale: float = 1.0,
                length_scale: float = 1.0) -> TraceMaker:
    """Traces of ``workload`` with ``rate x duration_s`` requests arriving at ``rate``/s.
    The same seed gives the same requests at every rate (arrivals scale with 1/rate)."""
    def make(rate: float) -> Trace:
        return generate_trace(workload, max(1, round(rate * duration_s)), rate, seed,
                              time_scale=time_scale, length_scale=length_scale)
    return make


def rescaled_trace_maker(trace: Trace) -> TraceMaker:
    """A loaded trace replayed at other rates: its arrival times scaled by old/new rate."""
    def make(rate: float) -> Trace:
        factor = trace.rate / rate
        requests = tuple(dataclasses.replace(r, arrival_s=r.arrival_s * factor)
                         for r in trace.requests)
        return dataclasses.replace(trace, rate=rate, requests=requests)
    return make


# ---------------------------------------------------------------------------- across runs

def run_sweep(profile: HardwareProfile, policies: Sequence[str], rates: Sequence[float],
              make_trace: TraceMaker, config: SimConfig = SimConfig(),
              progress: bool = False) -> dict[str, dict[float, SimResult]]:
    """Every policy at every rate: ``{policy: {rate: SimResult}}``."""
    jobs = [(policy, rate) for policy in policies for rate in sorted(rates)]
    results: dict[str, dict[float, SimResult]] = {policy: {} for policy in policies}
    traces: dict[float, Trace] = {}
    for policy, rate in _progress(jobs, progress, "simulating"):
        trace = traces.setdefault(rate, make_trace(rate))
        results[policy][rate] = simulate(trace, profile, policy, config)
    return results


def run_metrics(results: Mapping[str, Mapping[float, SimResult]]
                ) -> dict[str, dict[float, RunMetrics]]:
    """The ``{policy: {rate: RunMetrics}}`` that ``write_summary`` takes (runs in which no
    request completed are left out)."""
    return {policy: {rate: r.metrics for rate, r in by_rate.items() if r.metrics is not None}
            for policy, by_rate in results.items()}


def passes(result: SimResult, slo_p90_s_per_token: float) -> bool:
    return result.metrics is not None and meets_slo(result.metrics, slo_p90_s_per_token)


def find_sustainable_rate(profile: HardwareProfile, policy: str, make_trace: TraceMaker,
                          config: SimConfig = SimConfig(), *, start_rate: float = 1.0,
                          rel_tol: float = 0.05, step: float = 2.0, max_rate: float = 1e4,
                          ) -> tuple[float | None, dict[float, SimResult]]:
    """The highest rate meeting the profile's SLO, to within ``rel_tol``: multiply or divide
    by ``step`` from ``start_rate`` to bracket it, then bisect (geometric mean). Assumes
    latency grows with load. Returns (rate or None, every run by rate)."""
    if step <= 1 or rel_tol <= 0:
        raise ValueError("need step > 1 and rel_tol > 0")
    slo = profile.slo_p90_s_per_token
    runs: dict[float, SimResult] = {}

    def ok(rate: float) -> bool:
        if rate not in runs:
            runs[rate] = simulate(make_trace(rate), profile, policy, config)
        return passes(runs[rate], slo)

    low, high = None, None
    rate = start_rate
    if ok(rate):
        low = rate
        while high is None and rate < max_rate:
            rate *= step
            if ok(rate):
                low = rate
            else:
                high = rate
    else:
        high = rate
        while low is None and rate > start_rate / 1e3:
            rate /= step
            if ok(rate):
                low = rate
            else:
                high = rate
    if low is None or high is None:
        return low, runs
    while high / low > 1 + rel_tol:
        middle = math.sqrt(low * high)
        if ok(middle):
            low = middle
        else:
            high = middle
    return low, runs


def _progress(items: Iterable, enabled: bool, description: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(list(items), desc=description, unit="run")
