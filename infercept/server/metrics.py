"""InferCept's Prometheus metrics, served next to vLLM's on /metrics.

Engine-side counters live in each engine core's scheduler; the server polls
them once a second (`InterceptService.refresh_stats`) and publishes the
latest snapshot, one series per engine (label `engine`, its data-parallel
rank, as vLLM labels its own); sum over `engine` for the whole server.

They are prometheus_client metrics, so they work in both of vLLM's modes:
one API server process (the default registry) and several (its
multiprocess registry, which reads what every process wrote). Every API
server process polls the same engines, so only the first publishes the
engine counters; counters then add up to the engines' own values. Resume
latency is measured in each API server process, for its own requests.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RESUME_LATENCY = Histogram(
    "infercept:resume_latency_seconds",
    "From a resuming request's arrival to its response (first chunk when streaming).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

_COUNTERS = {
    "interceptions": "Requests intercepted (paused on a tool call).",
    "resumes": "Intercepted requests resumed.",
    "recomputed_tokens": "Forwarded tokens that recomputed KV computed before.",
    "forwarded_tokens": "Tokens forwarded through the model.",
    "tokens_reused": "Context tokens whose KV a resumed request did not recompute.",
    "preemptions": "Running requests preempted by vLLM for lack of KV blocks.",
}
COUNTERS = {name: Counter(f"infercept:{name}", doc, ["engine"]) for name, doc in _COUNTERS.items()}
DECISIONS = Counter("infercept:decisions", "Policy decisions on intercepted requests, by strategy.",
                    ["engine", "strategy"])
BYTES_SWAPPED = Counter("infercept:bytes_swapped", "KV bytes moved between device and CPU.",
                        ["engine", "direction"])
# Written by one process only: the most recent value is the engine's.
INTERCEPTED = Gauge("infercept:intercepted_requests", "Intercepted requests by where their KV is.",
                    ["engine", "state"], multiprocess_mode="mostrecent")
IDLE_DEVICE_TOKENS = Gauge("infercept:idle_device_tokens",
                           "KV tokens held on the device by intercepted requests.",
                           ["engine"], multiprocess_mode="mostrecent")


class StatsPublisher:
    """Turns engines' stats snapshots into the metrics above (counters by their increase)."""

    def __init__(self):
        self._last: dict[tuple, float] = {}

    def publish(self, stats_by_rank: dict[int, dict]) -> None:
        for rank, stats in stats_by_rank.items():
            engine = str(rank)
            for name, counter in COUNTERS.items():
                self._add(counter, (engine,), stats.get(name, 0))
            for strategy, count in stats.get("decisions", {}).items():
                self._add(DECISIONS, (engine, strategy), count)
            self._add(BYTES_SWAPPED, (engine, "out"), stats.get("bytes_swapped_out", 0))
            self._add(BYTES_SWAPPED, (engine, "in"), stats.get("bytes_swapped_in", 0))
            for state, count in stats.get("intercepted_by_state", {}).items():
                INTERCEPTED.labels(engine, state).set(count)
            IDLE_DEVICE_TOKENS.labels(engine).set(stats.get("idle_device_tokens", 0))

    def _add(self, counter: Counter, labels: tuple, value: float) -> None:
        key = (id(counter), *labels)
        increase = value - self._last.get(key, 0)
        if increase > 0:
            counter.labels(*labels).inc(increase)
            self._last[key] = value
        else:  # make the series exist at 0 (and ignore an engine's restart)
            counter.labels(*labels)
            self._last.setdefault(key, value)
