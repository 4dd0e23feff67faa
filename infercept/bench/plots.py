"""Plots of a benchmark summary (summary.json as ``infercept.bench.metrics.write_summary``
writes it), shared by the real benchmark and the simulator.

- ``plot_latency_vs_rate``: normalized latency against request rate, a line per policy,
  the SLO as a dashed line (the paper's figures). A hollow marker is a run in which not
  every request completed (cut off or overloaded): its latency covers the completed ones.
- ``plot_recompute_and_waste``: per policy at one rate, the share of forward time spent
  recomputing and the memory waste (idle KV of intercepted requests).
- ``plot_series``: any y against any x, a line per label (e.g. sustainable rate against
  the number of replicas).

Matplotlib is imported lazily and drawn without pyplot, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def _figure(width_in: float = 6.4, height_in: float = 4.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), layout="constrained")


def plot_latency_vs_rate(summary: Mapping[str, Any], path: str | Path, *,
                         metric: str = "normalized_latency_p90_s_per_token",
                         title: str | None = None) -> Path:
    """Normalized latency (ms/token) against request rate, one line per policy."""
    figure = _figure()
    axes = figure.add_subplot()
    for policy, entry in summary["policies"].items():
        runs = [r for r in entry["runs"] if r.get(metric) is not None]
        if not runs:
            continue
        rates = [r["rate"] for r in runs]
        values_ms = [r[metric] * 1e3 for r in runs]
        (line,) = axes.plot(rates, values_ms, marker="o", label=policy)
        incomplete = [(x, y) for x, y, r in zip(rates, values_ms, runs)
                      if r["num_completed"] < r["num_requests"]]
        if incomplete:
            axes.plot(*zip(*incomplete), linestyle="none", marker="o", markersize=9,
                      markerfacecolor="white", markeredgecolor=line.get_color())
    slo = summary.get("slo_p90_s_per_token")
    if slo is not None:
        axes.axhline(slo * 1e3, color="grey", linestyle="--", linewidth=1, label="SLO (p90)")
    axes.set_xlabel("request rate (req/s)")
    axes.set_ylabel(f"{_metric_label(metric)} (ms/token)")
    axes.set_yscale("log")
    _plain_ticks(axes.yaxis)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    if title:
        axes.set_title(title)
    return _save(figure, path)


def _plain_ticks(axis) -> None:
    """Log-scale ticks written as plain numbers (20, 30, 40) rather than 2x10^1."""
    from matplotlib.ticker import FormatStrFormatter

    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(FormatStrFormatter("%g"))


def _metric_label(metric: str) -> str:
    for quantile in ("p50", "p90", "p99", "mean"):
        if f"_{quantile}_" in metric:
            return f"normalized latency {quantile}"
    return metric


def common_rate(summary: Mapping[str, Any]) -> float | None:
    """The highest rate at which every policy ran and completed every request; else the
    lowest rate they all ran; None when they share no rate."""
    by_policy = [{r["rate"]: r for r in e["runs"]} for e in summary["policies"].values()]
    if not by_policy:
        return None
    shared = sorted(set.intersection(*(set(runs) for runs in by_policy)))
    if not shared:
        return None
    complete = [rate for rate in shared
                if all(runs[rate]["num_completed"] == runs[rate]["num_requests"]
                       for runs in by_policy)]
    return complete[-1] if complete else shared[0]


def plot_recompute_and_waste(summary: Mapping[str, Any], path: str | Path, *,
                             rate: float | None = None, title: str | None = None) -> Path:
    """Two bar panels at ``rate`` (default ``common_rate``): recompute share of forward
    time, and memory waste, per policy (in percent; a missing value is drawn as 0)."""
    rate = common_rate(summary) if rate is None else rate
    policies, recompute, waste = [], [], []
    for policy, entry in summary["policies"].items():
        run = next((r for r in entry["runs"] if r["rate"] == rate), None)
        if run is None:
            continue
        policies.append(policy)
        recompute.append(100 * (run.get("recompute_share_of_forward_time") or 0.0))
        waste.append(100 * (run.get("memory_waste_fraction") or 0.0))
    figure = _figure(width_in=8.0)
    for index, (values, label) in enumerate(((recompute, "recompute share of forward time"),
                                             (waste, "memory waste"))):
        axes = figure.add_subplot(1, 2, index + 1)
        bars = axes.bar(policies, values, color=f"C{index}")
        axes.bar_label(bars, fmt="%.1f", fontsize="small")
        axes.set_ylabel(f"{label} (%)")
        axes.tick_params(axis="x", labelrotation=30)
        axes.grid(True, axis="y", alpha=0.3)
    if title is None:
        title = "" if rate is None else f"at {rate:g} req/s"
    figure.suptitle(title)
    return _save(figure, path)


def plot_series(series: Mapping[str, Sequence[tuple[float, float | None]]],
                path: str | Path, *, xlabel: str, ylabel: str, title: str | None = None,
                logx: bool = False) -> Path:
    """Lines of (x, y) points by label; points with y None are skipped."""
    figure = _figure()
    axes = figure.add_subplot()
    for label, points in series.items():
        kept = [(x, y) for x, y in points if y is not None]
        if kept:
            axes.plot(*zip(*kept), marker="o", label=label)
    if logx:
        axes.set_xscale("log", base=2)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    if title:
        axes.set_title(title)
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
