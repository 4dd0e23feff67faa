"""`infercept sim`: simulate policies over request rates at paper scale, without a GPU.

    infercept sim --profile gptj-6b-a100 --workload mix --rates 1,2,3,4,5 \\
        --duration-s 1800 --policies vllm,preserve,swap,min-waste --out results/sim-gptj

writes summary.json and summary.md (the real benchmark's format), sim_stats.json (per run:
wall time, iterations, preemptions, swap stalls, policy decisions), config.json, and the
plots latency_vs_rate.png and recompute_waste.png. ``--search`` also finds each policy's
sustainable rate by bisection (search.json). Imports nothing from vLLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from infercept.sim.profiles import PROFILES

    parser.add_argument("--profile", default="gptj-6b-a100",
                        help=f"one of {', '.join(PROFILES)}, or a profile JSON file (e.g. the "
                             "engine's measured cost model)")
    parser.add_argument("--workload", default="mix",
                        help="mix, or one augmentation: arithmetic, qa, virtual_env, chatbot, "
                             "image, tts; or agent (today's coding and tool agents: "
                             "infercept.bench.agents)")
    parser.add_argument("--trace", type=Path, help="replay this trace (infercept.bench.workload "
                        "Trace JSON), its arrivals rescaled to each rate")
    parser.add_argument("--rates", default="1,2,3,4,5,6",
                        help="request rates (req/s, whole cluster), comma-separated")
    parser.add_argument("--duration-s", type=float, default=1800.0,
                        help="arrivals span this long at every rate (rate x duration requests)")
    parser.add_argument("--policies", default="vllm,discard,preserve,swap,min-waste",
                        help="comma-separated: vllm, vllm-offload (stock vLLM with its CPU KV "
                             "offloading), discard, preserve, swap, min-waste, ttl, unbounded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--router", default="affinity",
                        choices=("affinity", "round-robin", "least-loaded"))
    parser.add_argument("--attention", action="store_true",
                        help="also time attention's KV reads (a built-in profile's roofline "
                             "estimate per context token of the batch)")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="turn off vLLM's prefix caching (the paper's vLLM 0.2 baseline)")
    parser.add_argument("--slo-ms", type=float,
                        help="p90 normalized latency SLO in ms/token (default: the profile's)")
    parser.add_argument("--full-runs", action="store_true",
                        help="run overloaded rates to the end instead of stopping once their "
                             "p90 surely misses the SLO")
    parser.add_argument("--search", action="store_true",
                        help="also search each policy's sustainable rate (bisection to 5%%)")
    parser.add_argument("--out", type=Path, help="output folder (default "
                        "results/sim-<profile>-<workload>)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from infercept.bench.metrics import write_summary
    from infercept.bench.workload import Trace
    from infercept.sim.profiles import load_profile
    from infercept.sim.runner import (POLICIES, SimConfig, find_sustainable_rate,
                                      rescaled_trace_maker, run_metrics, run_sweep,
                                      trace_maker)

    profile = load_profile(args.profile)
    if args.attention:
        profile = profile.with_attention()
    if args.slo_ms is not None:
        profile = dataclasses.replace(profile, slo_p90_s_per_token=args.slo_ms / 1e3)
    policies = _names(args.policies)
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise SystemExit(f"unknown policies {sorted(unknown)}; choose from {POLICIES}")
    rates = [float(r) for r in _names(args.rates)]
    if args.trace is not None:
        make_trace = rescaled_trace_maker(Trace.load(args.trace))
    else:
        make_trace = trace_maker(args.workload, args.duration_s, args.seed)
    config = SimConfig(replicas=args.replicas, router=args.router,
                       prefix_caching=not args.no_prefix_caching,
                       abort_over_slo=not args.full_runs)
    out = args.out or Path("results") / f"sim-{profile.name}-{args.workload}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                  if k != "dispatch"},
         "profile": profile.to_dict(), "sim_config": dataclasses.asdict(config)},
        indent=2) + "\n")

    results = run_sweep(profile, policies, rates, make_trace, config, progress=not args.quiet)
    json_path, md_path = write_summary(run_metrics(results), profile.slo_p90_s_per_token, out)
    stats = {policy: {f"{rate:g}": r.stats for rate, r in by_rate.items()}
             for policy, by_rate in results.items()}
    (out / "sim_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if args.search:
        found = {}
        for policy in policies:
            rate, runs = find_sustainable_rate(profile, policy, make_trace, config,
                                               start_rate=max(rates))
            found[policy] = {"sustainable_rate": rate, "rates_tried": sorted(runs)}
            print(f"{policy}: sustainable rate {rate}", flush=True)
        (out / "search.json").write_text(json.dumps(found, indent=2) + "\n")
    if not args.no_plots:
        _plot(json_path, out, f"{profile.name}, {args.workload}")
    print(md_path.read_text())
    print(f"wrote {out}")
    return 0


def _plot(summary_path: Path, out: Path, title: str) -> None:
    from infercept.bench.plots import plot_latency_vs_rate, plot_recompute_and_waste

    summary = json.loads(summary_path.read_text())
    plot_latency_vs_rate(summary, out / "latency_vs_rate.png", title=title)
    plot_recompute_and_waste(summary, out / "recompute_waste.png")


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infercept sim", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
