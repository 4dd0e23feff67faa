"""InferCept's Prometheus metrics, served next to vLLM's on /metrics.

Engine-side counters live in the scheduler (engine-core process); the server
polls them once a second (`InterceptService.stats`) and this collector
reports the latest snapshot. Resume latency is measured in the server.
"""

from __future__ import annotations

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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


class InterceptCollector:
    def __init__(self, service):
        self.service = service

    def collect(self):
        stats = self.service.stats
        if not stats:
            return
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"infercept:{name}", doc, value=stats.get(name, 0))
        decisions = CounterMetricFamily(
            "infercept:decisions", "Policy decisions on intercepted requests, by strategy.",
            labels=["strategy"])
        for action, count in sorted(stats.get("decisions", {}).items()):
            decisions.add_metric([action], count)
        yield decisions
        swapped = CounterMetricFamily("infercept:bytes_swapped", "KV bytes moved between device and CPU.",
                                      labels=["direction"])
        swapped.add_metric(["out"], stats.get("bytes_swapped_out", 0))
        swapped.add_metric(["in"], stats.get("bytes_swapped_in", 0))
        yield swapped
        states = GaugeMetricFamily("infercept:intercepted_requests",
                                   "Intercepted requests by where their KV is.", labels=["state"])
        for state, count in sorted(stats.get("intercepted_by_state", {}).items()):
            states.add_metric([state], count)
        yield states
        yield GaugeMetricFamily("infercept:idle_device_tokens",
                                "KV tokens held on the device by intercepted requests.",
                                value=stats.get("idle_device_tokens", 0))
