"""What InferCept's scheduler costs when nothing is intercepted.

The preset's requests with every tool call removed (same prompts, same final contexts, one
segment each), all submitted at once, run to completion through stock vLLM and through
InferCept's scheduler and connector (policy min-waste), alternately, ``repeats`` times in one
process (one engine at a time, each built fresh and warmed up; which goes first alternates).
Both get the same, ample, KV cache, so neither preempts. Reported: output tokens per second
of every run, and the ratio InferCept / stock of the medians and of each repeat's pair.

    python -m benchmarks.overhead --preset cpu-quick --out results/cpu-quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from benchmarks.presets import PRESETS, Preset

POLICIES = ("vllm", "min-waste")


def overhead_trace(preset: Preset, vocab_size: int, excluded_token_ids):
    """``overhead_requests`` requests without interceptions, all arriving at time 0."""
    trace = preset.trace(1.0, vocab_size, excluded_token_ids,
                         num_requests=preset.overhead_requests).without_interceptions()
    requests = tuple(dataclasses.replace(r, arrival_s=0.0) for r in trace.requests)
    return dataclasses.replace(trace, requests=requests)


def measure_overhead(preset: Preset, out_dir: Path, repeats: int | None = None) -> dict:
    from benchmarks.backends import InterceptBackend, StockBackend
    from benchmarks.driver import replay
    from benchmarks.random_model import build_random_model, special_token_ids
    from infercept.bench.metrics import compute_run_metrics
    from infercept.config import InterceptConfig

    model_path = str(build_random_model(Path(out_dir) / "model", preset.model))
    vocab_size = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
    trace = overhead_trace(preset, vocab_size, special_token_ids(model_path))
    kv_cache_tokens = preset.unbounded_kv_cache_tokens(trace)
    kwargs = preset.engine_kwargs(model_path, kv_cache_tokens)
    intercept = InterceptConfig(policy="min-waste",
                                swap_space_bytes=preset.swap_space_bytes(kv_cache_tokens))
    tokens_per_s: dict[str, list[float]] = {policy: [] for policy in POLICIES}
    for repeat in range(repeats or preset.overhead_repeats):
        order = POLICIES if repeat % 2 == 0 else POLICIES[::-1]
        for policy in order:
            backend = (StockBackend(kwargs) if policy == "vllm"
                       else InterceptBackend(policy, {**kwargs, **intercept.engine_kwargs()}))
            with backend:
                backend.warm_up()
                result = replay(backend, trace, drain_s=3600.0)
            if not all(r.completed for r in result.records):
                raise RuntimeError(f"{policy}: not every request completed")
            metrics = compute_run_metrics(result.records, result.counters)
            tokens_per_s[policy].append(metrics.output_tokens_per_s)
    pairs = [ours / stock for ours, stock in zip(tokens_per_s["min-waste"], tokens_per_s["vllm"])]
    report = {
        "num_requests": len(trace.requests),
        "output_tokens": sum(r.output_tokens for r in trace.requests),
        "kv_cache_tokens": kv_cache_tokens,
        "output_tokens_per_s": tokens_per_s,
        "throughput_ratio_of_medians": (statistics.median(tokens_per_s["min-waste"])
                                        / statistics.median(tokens_per_s["vllm"])),
        "throughput_ratio_per_repeat": pairs,
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-quick")
    parser.add_argument("--out", type=Path, default=None, help="default: results/<preset>")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset].with_overrides(overhead_requests=args.requests,
                                                 threads=args.threads)
    from benchmarks.run import configure_process

    configure_process(preset.threads)
    report = measure_overhead(preset, args.out or Path("results") / preset.name, args.repeats)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
