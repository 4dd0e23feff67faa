"""Metrics of one benchmark run, the sustainable request rate, and the summary files.

The driver records a ``RequestRecord`` per request and one ``EngineCounters`` per run, calls
``compute_run_metrics``, and groups the results as ``{policy: {rate: RunMetrics}}``, the
shape that ``sustainable_rate``, ``metric_by_rate`` (series for plots) and
``write_summary`` take.

Definitions:

- Normalized latency of a request (the paper's): (end - start - sum of its interception
  durations) / output tokens, in seconds per token. Output tokens are the tokens the model
  generated, tool returns excluded. Percentiles interpolate linearly between order
  statistics (numpy's default).
- The run's window runs from the first start to the last completed end (``makespan_s``),
  unless the driver passes its own. Token throughput counts every record's output tokens
  (an unfinished request's tokens were generated too); completed requests per second and
  the latency statistics count completed requests only.
- Memory waste: the time-integral of the KV tokens held by intercepted, idle requests over
  the window, divided by cache capacity times the window's duration. The idle-token count is
  a step function given as ``(time_s, idle_tokens)`` change events: each value holds until
  the next event; it is 0 before the first one; of events with equal times the last wins.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class RequestRecord:
    """One request's timeline, as recorded by the driver."""

    request_id: str
    start_s: float  # arrival (submission) time
    end_s: float  # time its last token came back
    output_tokens: int  # generated tokens over all segments
    tool_s_total: float  # sum of its interception durations
    num_interceptions: int = 0
    completed: bool = True


@dataclass(frozen=True)
class EngineCounters:
    """Engine-level totals of one run; a field left None is reported as None."""

    forward_s: float | None = None  # time spent in model forward passes
    recompute_forward_s: float | None = None  # of which recomputing earlier computed context
    forwarded_tokens: int | None = None
    recomputed_tokens: int | None = None
    idle_kv_events: tuple[tuple[float, int], ...] = ()  # (time_s, idle_tokens) changes
    kv_capacity_tokens: int | None = None
    swapped_out_bytes: int = 0
    swapped_in_bytes: int = 0


@dataclass(frozen=True)
class RunMetrics:
    num_requests: int
    num_completed: int
    makespan_s: float
    normalized_latency_mean_s_per_token: float | None
    normalized_latency_p50_s_per_token: float | None
    normalized_latency_p90_s_per_token: float | None
    normalized_latency_p99_s_per_token: float | None
    output_tokens_per_s: float
    completed_requests_per_s: float
    recompute_share_of_forward_time: float | None
    recompute_share_of_forwarded_tokens: float | None
    idle_kv_token_s: float | None
    memory_waste_fraction: float | None
    swapped_bytes: int


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100), linear between order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def normalized_latency_s_per_token(record: RequestRecord) -> float:
    if record.output_tokens <= 0:
        raise ValueError(f"{record.request_id} has no output tokens")
    return (record.end_s - record.start_s - record.tool_s_total) / record.output_tokens


def normalized_latencies_s_per_token(records: Iterable[RequestRecord]) -> list[float]:
    """Sorted normalized latencies of the completed requests (e.g. for a CDF plot)."""
    return sorted(normalized_latency_s_per_token(r) for r in records if r.completed)


def step_integral(events: Iterable[tuple[float, float]], start_s: float, end_s: float) -> float:
    """Integral over [start_s, end_s] of the step function given by (time_s, value) events."""
    total, value, previous_s = 0.0, 0.0, start_s
    for time_s, new_value in sorted(events, key=lambda event: event[0]):
        if time_s > previous_s:
            until_s = min(time_s, end_s)
            total += value * (until_s - previous_s)
            previous_s = until_s
        value = new_value
    return total + value * max(0.0, end_s - previous_s)


def _share(part: float | None, whole: float | None) -> float | None:
    if part is None or whole is None or whole <= 0:
        return None
    return part / whole


def compute_run_metrics(records: Sequence[RequestRecord],
                        counters: EngineCounters = EngineCounters(),
                        window_s: tuple[float, float] | None = None) -> RunMetrics:
    """Metrics of one run; ``window_s`` = (start, end) overrides the records' span."""
    completed = [r for r in records if r.completed]
    if window_s is None:
        if not completed:
            raise ValueError("no completed request to take the run's window from")
        window_s = (min(r.start_s for r in records), max(r.end_s for r in completed))
    start_s, end_s = window_s
    makespan_s = end_s - start_s
    if makespan_s <= 0:
        raise ValueError(f"empty run window {window_s}")
    latencies = normalized_latencies_s_per_token(completed)

    def latency_percentile(q: float) -> float | None:
        return percentile(latencies, q) if latencies else None

    idle_kv_token_s = None
    if counters.kv_capacity_tokens is not None:
        idle_kv_token_s = step_integral(counters.idle_kv_events, start_s, end_s)
    return RunMetrics(
        num_requests=len(records),
        num_completed=len(completed),
        makespan_s=makespan_s,
        normalized_latency_mean_s_per_token=sum(latencies) / len(latencies) if latencies else None,
        normalized_latency_p50_s_per_token=latency_percentile(50),
        normalized_latency_p90_s_per_token=latency_percentile(90),
        normalized_latency_p99_s_per_token=latency_percentile(99),
        output_tokens_per_s=sum(r.output_tokens for r in records) / makespan_s,
        completed_requests_per_s=len(completed) / makespan_s,
        recompute_share_of_forward_time=_share(counters.recompute_forward_s, counters.forward_s),
        recompute_share_of_forwarded_tokens=_share(counters.recomputed_tokens,
                                                   counters.forwarded_tokens),
        idle_kv_token_s=idle_kv_token_s,
        memory_waste_fraction=_share(idle_kv_token_s, None if counters.kv_capacity_tokens is None
                                     else counters.kv_capacity_tokens * makespan_s),
        swapped_bytes=counters.swapped_out_bytes + counters.swapped_in_bytes,
    )


# ---------------------------------------------------------------------------- across runs

def meets_slo(metrics: RunMetrics, slo_p90_s_per_token: float) -> bool:
    """Every request completed and the p90 normalized latency is at most the SLO."""
    p90 = metrics.normalized_latency_p90_s_per_token
    return (metrics.num_completed == metrics.num_requests and p90 is not None
            and p90 <= slo_p90_s_per_token)


def sustainable_rate(results_by_rate: Mapping[float, RunMetrics],
                     slo_p90_s_per_token: float) -> float | None:
    """The highest rate reached by raising the rate from the lowest while each run meets the
    SLO: a passing rate above a failing one does not count (it is taken as noise, since
    latency only grows with load). None when the lowest rate already fails."""
    best = None
    for rate in sorted(results_by_rate):
        if not meets_slo(results_by_rate[rate], slo_p90_s_per_token):
            break
        best = rate
    return best


def metric_by_rate(results: Mapping[str, Mapping[float, RunMetrics]],
                   metric: str) -> dict[str, list[tuple[float, float | None]]]:
    """{policy: [(rate, value of ``metric``), ...] by increasing rate}, for a line plot."""
    return {policy: [(rate, getattr(by_rate[rate], metric)) for rate in sorted(by_rate)]
            for policy, by_rate in results.items()}


def summarize(results: Mapping[str, Mapping[float, RunMetrics]],
              slo_p90_s_per_token: float) -> dict:
    """The content of summary.json: per policy, its sustainable rate and every run."""
    return {
        "slo_p90_s_per_token": slo_p90_s_per_token,
        "policies": {
            policy: {
                "sustainable_rate": sustainable_rate(by_rate, slo_p90_s_per_token),
                "runs": [{"rate": rate, **dataclasses.asdict(by_rate[rate])}
                         for rate in sorted(by_rate)],
            }
            for policy, by_rate in results.items()
        },
    }


_TABLE_COLUMNS = (
    ("p50 ms/tok", "normalized_latency_p50_s_per_token", 1e3, "{:.2f}"),
    ("p90 ms/tok", "normalized_latency_p90_s_per_token", 1e3, "{:.2f}"),
    ("p99 ms/tok", "normalized_latency_p99_s_per_token", 1e3, "{:.2f}"),
    ("mean ms/tok", "normalized_latency_mean_s_per_token", 1e3, "{:.2f}"),
    ("tok/s", "output_tokens_per_s", 1, "{:.1f}"),
    ("done req/s", "completed_requests_per_s", 1, "{:.3f}"),
    ("recompute (time)", "recompute_share_of_forward_time", 100, "{:.1f}%"),
    ("recompute (tokens)", "recompute_share_of_forwarded_tokens", 100, "{:.1f}%"),
    ("memory waste", "memory_waste_fraction", 100, "{:.2f}%"),
    ("swapped MiB", "swapped_bytes", 1 / 2**20, "{:.1f}"),
)


def _cell(value: float | None, scale: float, fmt: str) -> str:
    return "-" if value is None else fmt.format(value * scale)


def summary_markdown(summary: dict) -> str:
    """Two markdown tables: sustainable rate per policy, then every run's metrics."""
    slo_ms = summary["slo_p90_s_per_token"] * 1e3
    lines = [f"SLO: p90 normalized latency <= {slo_ms:.2f} ms/token", "",
             "| policy | sustainable rate (req/s) |", "|---|---|"]
    for policy, entry in summary["policies"].items():
        lines.append(f"| {policy} | {_cell(entry['sustainable_rate'], 1, '{:g}')} |")
    header = ["policy", "rate (req/s)", "done/total"] + [name for name, *_ in _TABLE_COLUMNS]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for policy, entry in summary["policies"].items():
        for run in entry["runs"]:
            cells = [policy, f"{run['rate']:g}", f"{run['num_completed']}/{run['num_requests']}"]
            cells += [_cell(run[key], scale, fmt) for _, key, scale, fmt in _TABLE_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(results: Mapping[str, Mapping[float, RunMetrics]], slo_p90_s_per_token: float,
                  out_dir: str | Path) -> tuple[Path, Path]:
    """Write summary.json and summary.md into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, slo_p90_s_per_token)
    json_path, md_path = out / "summary.json", out / "summary.md"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    md_path.write_text(summary_markdown(summary))
    return json_path, md_path
