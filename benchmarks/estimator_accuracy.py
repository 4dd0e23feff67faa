"""How well the duration estimator predicts remaining interception time, and how often
the min-waste planner then decides as it would with the oracle duration.

Per augmentation of the paper's Table 1, interceptions are drawn one by one (durations
and contexts normal, clipped at ``FLOOR_FRACTION_OF_MEAN`` of the mean, seeded), and
each is looked at while it is still running at elapsed times of ``--elapsed-fractions``
times the augmentation's mean duration. At each point three predictions of the remaining
time are compared:

- estimator: ``DurationEstimator.remaining_s`` (per-tool history, learned online: the
  interception is observed only after it ends);
- elapsed: the paper's simple estimate, remaining = time elapsed since the call;
- oracle: the true remaining time.

Decisions: the min-waste planner sees the request alone on the device, with no CPU
space (so it chooses preserve or discard), for every running context in
``--running-context``. Reported per augmentation and predictor:

- mae_rel: sum |predicted - true remaining| / sum true remaining;
- agree: share of decisions identical to the oracle's, at the elapsed points;
- excess_waste: waste when the decision is revisited every ``step`` while the request is
  intercepted (preserved until the first step the predictor makes the planner discard,
  then WasteChunkD), over the oracle's waste min(WastePreserve, WasteChunkD), minus 1.
  The step is one decode iteration, or 1/``TRAJECTORY_STEPS_PER_MEAN`` of the mean
  duration when that is longer (to bound the run time).

    python benchmarks/estimator_accuracy.py --requests 500 --out estimator.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from infercept.policy import (Action, BatchState, CostModel, DurationEstimator,  # noqa: E402
                              Intercepted, Location, MinWastePolicy)

DEFAULT_WORKLOADS = REPO_ROOT.parent / "shared" / "workloads" / "augmentations.json"
FLOOR_FRACTION_OF_MEAN = 0.1
PREDICTORS = ("estimator", "elapsed")

# An illustrative GPU (GPT-J-6B-like on an A100): 25 ms iterations up to 512 tokens,
# 60 us per token beyond, 448 KiB of KV per token moved at ~25 GB/s.
DEFAULT_COST = CostModel(fwd_base_s=0.025, fwd_per_token_s=6e-5, saturation_tokens=512,
                         swap_s_per_token=1.8e-5, kv_bytes_per_token=458_752,
                         block_size_tokens=16, device_capacity_tokens=40_000,
                         cpu_capacity_tokens=160_000)
DECODE_BATCH_TOKENS = 64
TRAJECTORY_STEPS_PER_MEAN = 50


@dataclass
class Tally:
    """Sums for one augmentation and one predictor."""

    abs_error_s: float = 0.0
    true_remaining_s: float = 0.0
    decisions: int = 0
    agreed: int = 0
    waste: float = 0.0
    oracle_waste: float = 0.0

    def summary(self) -> dict[str, float]:
        return {
            "mae_rel": self.abs_error_s / self.true_remaining_s if self.true_remaining_s else 0.0,
            "agree": self.agreed / self.decisions if self.decisions else 1.0,
            "excess_waste": self.waste / self.oracle_waste - 1 if self.oracle_waste else 0.0,
        }


@dataclass
class Setting:
    cost: CostModel
    running_context_tokens: tuple[int, ...]
    elapsed_fractions: tuple[float, ...]
    policy: MinWastePolicy = field(default_factory=MinWastePolicy)


def clipped_normal(rng: random.Random, mean: float, sd: float) -> float:
    return max(FLOOR_FRACTION_OF_MEAN * mean, rng.gauss(mean, sd))


def decide(setting: Setting, context_tokens: int, remaining_s: float,
           running_context_tokens: int) -> tuple[Action, float, float]:
    """(action, WastePreserve with this remaining time, WasteChunkD) for one request."""
    request = Intercepted("r", context_tokens, Location.DEVICE, 0.0, remaining_s, 0.0)
    batch = BatchState(running_context_tokens=running_context_tokens,
                       batch_tokens=DECODE_BATCH_TOKENS, free_device_tokens=0,
                       free_cpu_tokens=0)
    decision = setting.policy.plan([request], batch, setting.cost).decisions[0]
    return decision.action, decision.waste_preserve, decision.waste_discard


def score_point(setting: Setting, tallies: dict[str, Tally], context_tokens: int,
                true_s: float, predicted_s: dict[str, float]) -> None:
    """Add one (interception, elapsed point) to every predictor's error and agreement."""
    for name, estimate_s in predicted_s.items():
        tallies[name].abs_error_s += abs(estimate_s - true_s)
        tallies[name].true_remaining_s += true_s
    for running_tokens in setting.running_context_tokens:
        oracle_action, _, _ = decide(setting, context_tokens, true_s, running_tokens)
        for name, estimate_s in predicted_s.items():
            action, _, _ = decide(setting, context_tokens, estimate_s, running_tokens)
            tallies[name].decisions += 1
            tallies[name].agreed += action is oracle_action


def revisited_waste(context_tokens: int, duration_s: float, discard_waste: float,
                    remaining_at: Callable[[float], float], step_s: float) -> float:
    """Waste of an interception whose decision is revisited every ``step_s``: preserved
    until the planner first discards it (its step-3 rule: WasteChunkD < WastePreserve,
    as no CPU space and no pressure leave nothing else), then recomputed."""
    elapsed_s = 0.0
    while elapsed_s < duration_s:
        if discard_waste < remaining_at(elapsed_s) * context_tokens:
            return elapsed_s * context_tokens + discard_waste
        elapsed_s += step_s
    return duration_s * context_tokens


def score_trajectory(setting: Setting, tallies: dict[str, Tally], context_tokens: int,
                     duration_s: float, predictors: dict[str, Callable[[float], float]],
                     step_s: float) -> None:
    for running_tokens in setting.running_context_tokens:
        _, true_preserve, discard = decide(setting, context_tokens, duration_s,
                                           running_tokens)
        for name, remaining_at in predictors.items():
            tallies[name].waste += revisited_waste(context_tokens, duration_s, discard,
                                                   remaining_at, step_s)
            tallies[name].oracle_waste += min(true_preserve, discard)


def run_augmentation(name: str, stats: dict, setting: Setting, num_interceptions: int,
                     seed: int) -> dict[str, dict[str, float]]:
    rng = random.Random(f"{seed}:{name}")
    mean_s, sd_s = stats["interception_s"]
    context_mean, context_sd = stats["context_tokens"]
    estimator = DurationEstimator()
    predictors = {"estimator": lambda elapsed_s: estimator.remaining_s(name, elapsed_s),
                  "elapsed": lambda elapsed_s: elapsed_s}
    step_s = max(setting.cost.forward_s(DECODE_BATCH_TOKENS),
                 mean_s / TRAJECTORY_STEPS_PER_MEAN)
    tallies = {p: Tally() for p in PREDICTORS}
    for _ in range(num_interceptions):
        duration_s = clipped_normal(rng, mean_s, sd_s)
        context_tokens = round(clipped_normal(rng, context_mean, context_sd))
        for fraction in setting.elapsed_fractions:
            elapsed_s = fraction * mean_s
            if elapsed_s < duration_s:
                score_point(setting, tallies, context_tokens, duration_s - elapsed_s,
                            {p: predict(elapsed_s) for p, predict in predictors.items()})
        score_trajectory(setting, tallies, context_tokens, duration_s, predictors, step_s)
        estimator.observe(name, duration_s)
    return {p: tallies[p].summary() for p in PREDICTORS}


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    header = (f"{'augmentation':<13} {'MAE/true est':>12} {'MAE/true elap':>13} "
              f"{'agree est':>9} {'agree elap':>10} {'excess est':>10} {'excess elap':>11}")
    rows = [header, "-" * len(header)]
    for name, by_predictor in results.items():
        est, elap = by_predictor["estimator"], by_predictor["elapsed"]
        rows.append(f"{name:<13} {est['mae_rel']:>12.3f} {elap['mae_rel']:>13.3f} "
                    f"{est['agree']:>9.1%} {elap['agree']:>10.1%} "
                    f"{est['excess_waste']:>10.2%} {elap['excess_waste']:>11.2%}")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", type=Path, default=DEFAULT_WORKLOADS)
    parser.add_argument("--requests", type=int, default=500,
                        help="interceptions drawn per augmentation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--elapsed-fractions", default="0,0.25,0.5,1,2",
                        help="elapsed points, as fractions of the mean duration")
    parser.add_argument("--running-context", default="0,8000,32000",
                        help="running-batch contexts (tokens) the decisions are made under")
    parser.add_argument("--cost", type=Path, help="CostModel JSON (CostModel.to_dict)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cost = (CostModel.from_dict(json.loads(args.cost.read_text())) if args.cost
            else DEFAULT_COST)
    setting = Setting(cost=cost,
                      running_context_tokens=tuple(int(x) for x in
                                                   args.running_context.split(",")),
                      elapsed_fractions=tuple(float(x) for x in
                                              args.elapsed_fractions.split(",")))
    augmentations = json.loads(args.workloads.read_text())["augmentations"]
    results = {name: run_augmentation(name, stats, setting, args.requests, args.seed)
               for name, stats in augmentations.items()}
    print(format_table(results))
    report = {"settings": {"requests": args.requests, "seed": args.seed,
                           "elapsed_fractions": list(setting.elapsed_fractions),
                           "running_context_tokens": list(setting.running_context_tokens),
                           "decode_batch_tokens": DECODE_BATCH_TOKENS,
                           "cost": cost.to_dict()},
              "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
