"""The experiments behind docs/simulator.md, reproducible and resumable.

    python -m infercept.sim.experiments paper --out results/sim-paper
    python -m infercept.sim.experiments scaling --out results/sim-scaling

``paper``: for each profile and workload, each policy's sustainable rate (bisection to
``--tolerance``) at the profile's SLO, and min-waste's ratios to the baselines.
``scaling``: the same for N replicas behind each router (rates are per cluster).
``table``: rewrite ``table.md`` from the searches in ``results.jsonl`` (finished or not).
``load``: N replicas behind each router at a fixed load per replica (``--rate-per-replica``),
one run per policy: whether each meets the SLO, its p90, completed requests per second
per replica, the follow-ups that landed away from their KV, and the recompute share.
Every finished search is appended to ``results.jsonl`` in the output folder and skipped
when the command runs again; ``table.md`` is rewritten from all of them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Iterable

from infercept.bench.workload import AUGMENTATIONS, MIX
from infercept.sim.profiles import PROFILES, load_profile
from infercept.sim.runner import (SimConfig, find_sustainable_rate, passes, simulate,
                                  trace_maker)

BASELINES = ("vllm", "preserve", "swap")
# Start each search near the answer: per profile, a rate (req/s, one replica) around
# where the mixed workload saturates.
START_RATE = {"gptj-6b-a100": 3.0, "vicuna-13b-2xa100": 2.0, "llama3-70b-4xa100": 1.0,
              "llama3-8b-h100": 8.0, "llama31-8b-h100-128k": 8.0}
# The agent workload's tasks carry ~50x the mix's tokens and last minutes.
START_RATE_FACTOR = {"agent": 1 / 500}


def search(profile_name: str, workload: str, policy: str, *, duration_s: float, seed: int,
           replicas: int = 1, router: str = "affinity", prefix_caching: bool = True,
           tolerance: float = 0.05, start_rate: float | None = None,
           step: float = 2.0) -> dict[str, Any]:
    profile = _profile(profile_name)
    config = SimConfig(replicas=replicas, router=router, prefix_caching=prefix_caching,
                       abort_over_slo=True)
    start = start_rate or (START_RATE.get(profile_name.partition("+")[0], 1.0)
                           * START_RATE_FACTOR.get(workload, 1.0) * replicas)
    started = time.perf_counter()
    rate, runs = find_sustainable_rate(profile, policy, trace_maker(workload, duration_s, seed),
                                       config, start_rate=start, rel_tol=tolerance,
                                       step=step)
    best = runs.get(rate) if rate is not None else None
    return {
        "profile": profile_name, "workload": workload, "policy": policy,
        "replicas": replicas, "router": router, "prefix_caching": prefix_caching,
        "duration_s": duration_s, "seed": seed, "tolerance": tolerance,
        "slo_p90_s_per_token": profile.slo_p90_s_per_token,
        "sustainable_rate": rate,
        "completed_requests_per_s": best.metrics.completed_requests_per_s if best else None,
        "p90_s_per_token": best.metrics.normalized_latency_p90_s_per_token if best else None,
        "recompute_share": best.metrics.recompute_share_of_forward_time if best else None,
        "memory_waste": best.metrics.memory_waste_fraction if best else None,
        "runs": {f"{r:.4g}": {"passes": passes(x, profile.slo_p90_s_per_token),
                              "wall_s": round(x.stats["wall_s"], 2),
                              "iterations": x.stats["iterations"]}
                 for r, x in sorted(runs.items())},
        "wall_s": round(time.perf_counter() - started, 1),
    }


def load_point(profile_name: str, workload: str, policy: str, *, replicas: int, router: str,
               rate_per_replica: float, duration_s: float, seed: int) -> dict[str, Any]:
    """One run of ``replicas`` engines at ``rate_per_replica`` each (stopped once it surely
    misses the SLO)."""
    profile = _profile(profile_name)
    rate = rate_per_replica * replicas
    result = simulate(trace_maker(workload, duration_s, seed)(rate), profile, policy,
                      SimConfig(replicas=replicas, router=router, abort_over_slo=True))
    metrics, ok = result.metrics, passes(result, profile.slo_p90_s_per_token)
    return {
        "profile": profile_name, "workload": workload, "policy": policy,
        "replicas": replicas, "router": router, "rate_per_replica": rate_per_replica,
        "duration_s": duration_s, "seed": seed, "meets_slo": ok,
        "p90_s_per_token": metrics.normalized_latency_p90_s_per_token if metrics else None,
        "completed_requests_per_s_per_replica": (metrics.completed_requests_per_s / replicas
                                                 if metrics and ok else None),
        "recompute_share": metrics.recompute_share_of_forward_time if metrics else None,
        "migrations": result.stats["migrations"], "aborted": result.stats["aborted"],
        "wall_s": round(result.stats["wall_s"], 1),
    }


def load_table(entries: list[dict]) -> str:
    lines = ["| replicas | router | policy | meets SLO | p90 (ms/token) | completed req/s "
             "per replica | follow-ups away from their KV | recompute share |",
             "|---|---|---|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: (e["replicas"], e["router"], e["policy"])):
        p90 = "-" if e["p90_s_per_token"] is None else f"{e['p90_s_per_token'] * 1e3:.0f}"
        done = e["completed_requests_per_s_per_replica"]
        share = e["recompute_share"]
        lines.append(f"| {e['replicas']} | {e['router']} | {e['policy']} | "
                     f"{'yes' if e['meets_slo'] else 'no (stopped)'} | {p90} | "
                     f"{_rate(done)} | {e['migrations']} | "
                     f"{'-' if share is None else f'{share:.0%}'} |")
    return "\n".join(lines) + "\n"


def run_load(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "load.jsonl"
    entries = _load(path)
    fields = ("profile", "workload", "policy", "replicas", "router", "rate_per_replica",
              "duration_s", "seed")
    done = {tuple(e[f] for f in fields) for e in entries}
    for profile in split(args.profiles):
        for n in (int(n) for n in split(args.replicas)):
            for router in split(args.routers):
                if n == 1 and router != "affinity":
                    continue
                for policy in split(args.policies):
                    seed = int(split(args.seeds)[0])
                    key = (profile, split(args.workloads)[0], policy, n, router,
                           args.rate_per_replica, args.duration_s, seed)
                    if key in done:
                        continue
                    entry = load_point(profile, key[1], policy, replicas=n, router=router,
                                       rate_per_replica=args.rate_per_replica,
                                       duration_s=args.duration_s, seed=seed)
                    entries.append(entry)
                    with path.open("a") as f:
                        f.write(json.dumps(entry) + "\n")
                    print(f"{profile} x{n} {router} {policy}: meets SLO {entry['meets_slo']} "
                          f"({entry['wall_s']} s)", flush=True)
    table = load_table(entries)
    (args.out / "load.md").write_text(table)
    print(table)


def _profile(name: str):
    """A built-in profile; ``NAME+attention`` for it with attention's KV reads timed."""
    base, _, extra = name.partition("+")
    if extra not in ("", "attention"):
        raise ValueError(f"unknown profile variant {name!r}")
    profile = load_profile(base)
    return profile.with_attention() if extra else profile


_KEY_FIELDS = ("workload", "policy", "replicas", "router", "prefix_caching", "duration_s",
               "seed")


def _key(profile: str, fields: dict[str, Any]) -> tuple:
    return (profile, *(fields[name] for name in _KEY_FIELDS))


def _load(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _start_rate(entries: list[dict], job: dict[str, Any]) -> float | None:
    """Where a search starts: this policy's rate on one replica times the replicas, else
    the last rate found for the same setup (another policy), else the profile's default."""
    same = [e for e in entries if e["profile"] == job["profile_name"]
            and e["workload"] == job["workload"] and e["sustainable_rate"] is not None
            and e["prefix_caching"] == job["prefix_caching"]
            and e["duration_s"] == job["duration_s"]]
    for e in reversed(same):
        if e["policy"] == job["policy"] and e["replicas"] == 1:
            return e["sustainable_rate"] * job["replicas"]
    for e in reversed(same):
        if e["replicas"] == job["replicas"] and e["router"] == job["router"]:
            return e["sustainable_rate"]
    return None


def run_all(jobs: Iterable[dict[str, Any]], out: Path, *, tolerance: float,
            step: float) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    entries = _load(results_path)
    done = {_key(e["profile"], e) for e in entries}
    for job in jobs:
        if _key(job["profile_name"], job) in done:
            continue
        entry = search(**job, tolerance=tolerance, step=step,
                       start_rate=_start_rate(entries, job))
        entries.append(entry)
        with results_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"{entry['profile']} {entry['workload']} {entry['policy']} x{entry['replicas']} "
              f"{entry['router']}: {entry['sustainable_rate']} ({entry['wall_s']} s)", flush=True)
    return entries


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


PAPER_POLICIES = ("vllm", "vllm-offload", "ttl", "discard", "preserve", "swap", "min-waste",
                  "unbounded")


def _spread(values: list[float], num_seeds: int | None = None) -> str:
    """Mean, and the range over seeds when there are several: "2.41 (2.30-2.55)"; with
    fewer values than the row's ``num_seeds``, how many: "8.35 [1 seed]"."""
    if not values:
        return "-"
    mean = sum(values) / len(values)
    text = f"{mean:.3g}" if len(values) == 1 else (
        f"{mean:.3g} ({min(values):.3g}-{max(values):.3g})")
    if num_seeds is not None and len(values) < num_seeds:
        text += f" [{len(values)} seed{'s' if len(values) > 1 else ''}]"
    return text


def paper_table(entries: list[dict]) -> str:
    """Sustainable rate per policy (mean and range over the seeds run), and min-waste's
    rate divided by each other policy's, seed by seed (mean and range of the ratios). A
    policy that met the SLO at no rate tried counts as missing."""
    rows: dict[tuple, dict[str, dict[int, float | None]]] = {}
    for e in entries:
        if e["replicas"] == 1:
            key = (e["profile"], e["workload"], e["prefix_caching"], e["duration_s"])
            rows.setdefault(key, {}).setdefault(e["policy"], {})[e["seed"]] = e["sustainable_rate"]
    present = {p for by_policy in rows.values() for p in by_policy}
    policies = [p for p in PAPER_POLICIES if p in present] + sorted(present - set(PAPER_POLICIES))
    peers = [p for p in policies if p != "min-waste"]
    lines = ["| profile | workload | APC | seeds | " + " | ".join(policies) + " | "
             + " | ".join(f"min-waste / {p}" for p in peers) + " |",
             "|---|---|---|---|" + "---|" * (len(policies) + len(peers))]
    for (profile, workload, apc, _), by_policy in sorted(rows.items()):
        seeds = sorted({s for by_seed in by_policy.values() for s in by_seed})
        cells = [profile, workload, "on" if apc else "off", ",".join(map(str, seeds))]
        for p in policies:
            cells.append(_spread([r for r in by_policy.get(p, {}).values() if r is not None],
                                 len(seeds)))
        ours = by_policy.get("min-waste", {})
        for p in peers:
            theirs = by_policy.get(p, {})
            ratios = [ours[s] / theirs[s] for s in seeds
                      if ours.get(s) and theirs.get(s)]
            cells.append(_spread(ratios, len(seeds)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scaling_table(entries: list[dict]) -> str:
    rows: dict[tuple, dict[str, dict]] = {}
    for e in entries:
        rows.setdefault((e["profile"], e["workload"], e["router"], e["replicas"]),
                        {})[e["policy"]] = e
    lines = ["| profile | workload | router | replicas | vllm (req/s) | min-waste (req/s) "
             "| min-waste per replica | min-waste / vllm |", "|---|---|---|---|---|---|---|---|"]
    for (profile, workload, router, replicas), by_policy in sorted(rows.items()):
        vllm = by_policy.get("vllm", {}).get("sustainable_rate")
        ours = by_policy.get("min-waste", {}).get("sustainable_rate")
        per_replica = None if ours is None else ours / replicas
        lines.append(f"| {profile} | {workload} | {router} | {replicas} | {_rate(vllm)} | "
                     f"{_rate(ours)} | {_rate(per_replica)} | {_ratio(ours, vllm)} |")
    return "\n".join(lines) + "\n"


def split(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infercept.sim.experiments")
    parser.add_argument("experiment", choices=("paper", "scaling", "load", "table"),
                        help="table: rewrite table.md from the results.jsonl in --out")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--workloads", default=",".join((MIX, *AUGMENTATIONS)))
    parser.add_argument("--policies", default="vllm,discard,preserve,swap,min-waste")
    parser.add_argument("--replicas", default="1,2,4,8,16")
    parser.add_argument("--routers", default="affinity,round-robin,least-loaded")
    parser.add_argument("--duration-s", type=float, default=1800.0)
    parser.add_argument("--seeds", default="0", help="trace seeds, comma-separated: each cell "
                        "is searched once per seed and reported with its range")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--step", type=float, default=2.0,
                        help="factor between rates while bracketing the sustainable rate")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--rate-per-replica", type=float, default=4.0,
                        help="load: requests/s per replica")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.experiment == "table":
        table = paper_table(_load(args.out / "results.jsonl"))
        (args.out / "table.md").write_text(table)
        print(table)
        return
    if args.experiment == "load":
        run_load(args)
        return
    common = {"duration_s": args.duration_s, "prefix_caching": not args.no_prefix_caching}
    setups = [(1, "affinity")] if args.experiment == "paper" else [
        (int(n), router) for n in split(args.replicas) for router in split(args.routers)
        if int(n) > 1 or router == "affinity"]
    jobs = [{"profile_name": p, "workload": w, "policy": policy, "replicas": n,
             "router": router, "seed": int(seed), **common}
            for p in split(args.profiles) for w in split(args.workloads)
            for n, router in setups for seed in split(args.seeds)
            for policy in split(args.policies)]
    entries = run_all(jobs, args.out, tolerance=args.tolerance, step=args.step)
    table = paper_table(entries) if args.experiment == "paper" else scaling_table(entries)
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
