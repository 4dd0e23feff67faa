"""Compare a simulated summary with the real benchmark's (both in summary.json form).

The simulator is validated run by run: for every policy and request rate present in both
summaries, normalized latency (mean and p90) and throughput (output tokens and completed
requests per second) must agree within ``tolerance`` (relative to the measurement). The
simulated side should use a profile loaded from the engine's measured cost model
(``infercept.sim.profiles.load_profile("cost_model.json")``) and the benchmark's trace.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from infercept.policy import CostModel
from infercept.policy.cost_model import fit_hinge

COMPARED_METRICS = ("normalized_latency_mean_s_per_token", "normalized_latency_p90_s_per_token",
                    "output_tokens_per_s", "completed_requests_per_s")
DEFAULT_TOLERANCE = 0.15


@dataclass(frozen=True)
class Comparison:
    policy: str
    rate: float
    metric: str
    simulated: float
    measured: float

    @property
    def relative_error(self) -> float:
        if self.measured == 0:
            return 0.0 if self.simulated == 0 else math.inf
        return abs(self.simulated - self.measured) / abs(self.measured)


@dataclass(frozen=True)
class Validation:
    tolerance: float
    comparisons: tuple[Comparison, ...]
    unmatched: tuple[str, ...]  # "policy@rate" runs found in only one summary

    @property
    def failures(self) -> tuple[Comparison, ...]:
        return tuple(c for c in self.comparisons if not c.relative_error <= self.tolerance)

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and not self.failures

    @property
    def max_relative_error(self) -> float:
        return max((c.relative_error for c in self.comparisons), default=math.nan)

    def markdown(self) -> str:
        lines = [f"tolerance {self.tolerance:.0%}: {'pass' if self.passed else 'FAIL'}", "",
                 "| policy | rate | metric | simulated | measured | error |",
                 "|---|---|---|---|---|---|"]
        for c in self.comparisons:
            lines.append(f"| {c.policy} | {c.rate:g} | {c.metric} | {c.simulated:.4g} | "
                         f"{c.measured:.4g} | {c.relative_error:.1%} |")
        if self.unmatched:
            lines += ["", "not compared: " + ", ".join(self.unmatched)]
        return "\n".join(lines) + "\n"


def load_summary(summary: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    if isinstance(summary, (str, Path)):
        return json.loads(Path(summary).read_text())
    return summary


def validate(sim_summary: Mapping[str, Any] | str | Path,
             measured_summary: Mapping[str, Any] | str | Path,
             tolerance: float = DEFAULT_TOLERANCE) -> Validation:
    """Every run (policy, rate) in both summaries, metric by metric. A metric missing
    (None) on either side is not compared."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    simulated = _runs(load_summary(sim_summary))
    measured = _runs(load_summary(measured_summary))
    comparisons, unmatched = [], []
    for key in sorted(set(simulated) | set(measured)):
        if key not in simulated or key not in measured:
            unmatched.append(f"{key[0]}@{key[1]:g}")
            continue
        for metric in COMPARED_METRICS:
            sim_value, real_value = simulated[key].get(metric), measured[key].get(metric)
            if sim_value is None or real_value is None:
                continue
            comparisons.append(Comparison(key[0], key[1], metric, float(sim_value),
                                          float(real_value)))
    return Validation(tolerance, tuple(comparisons), tuple(unmatched))


def _runs(summary: Mapping[str, Any]) -> dict[tuple[str, float], Mapping[str, Any]]:
    """{(policy, rate): run} with rates rounded so that 0.1 + 0.2 matches 0.3."""
    return {(policy, round(float(run["rate"]), 9)): run
            for policy, entry in summary["policies"].items() for run in entry["runs"]}


def cost_from_steps(steps: Iterable[tuple[int, float]], base: CostModel) -> CostModel:
    """``base`` with its forward time refitted to measured engine steps.

    ``steps``: (tokens forwarded, wall seconds) of each step of real runs. The fit is the
    CostModel's own shape, ``fwd_base_s + fwd_per_token_s * max(0, tokens - saturation)``,
    by ``fit_hinge``'s least squares; steps that forwarded nothing are left out. Unlike the
    start-up profiler, which times the model's forward pass alone, a step's wall time also
    holds vLLM's scheduling, sampling and output processing, and whatever else the machine
    was doing: what a request waited for. docs/simulator.md reports both against
    wall-clock runs.
    """
    points = [(int(n), float(s)) for n, s in steps if n > 0]
    if len(points) < 2:
        raise ValueError("need at least two steps that forwarded tokens")
    base_s, per_token_s, saturation_tokens = fit_hinge(points)
    return dataclasses.replace(base, fwd_base_s=base_s, fwd_per_token_s=per_token_s,
                               saturation_tokens=max(1, saturation_tokens))
