"""Issue 8's benchmark in one command: every policy, a sweep of request rates, one summary.

    python -m benchmarks.run --preset cpu-quick --out results/cpu-quick
    python -m benchmarks.run --preset cpu-quick --quick --policies vllm,min-waste
    python -m benchmarks.run --preset cpu-quick --backend http --rates 1,2

For each policy one engine is built (one at a time: vLLM keeps one KV connector per
process), warmed up, and serves the rates in increasing order; the prefix cache is emptied
between runs, while InferCept's duration estimator keeps what it learned, as a long-running
server's would. A policy's sweep stops at its first rate that misses the SLO (every request
completed, p90 normalized latency under the preset's bound): higher rates cannot count
toward its sustainable rate.

Writes into --out: summary.json and summary.md (infercept.bench.metrics), headline.json (the
ratios of min-waste to the others), runs/<policy>-<rate>.json (each run's metrics, counters,
engine diagnostics and records), runs/<policy>-engine.json (an InferCept engine's cost model
and its source), traces/ (the replayed traces), setup.json, and the plots
latency_vs_rate.png and recompute_waste.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from benchmarks.driver import RunResult, replay, replay_http
from benchmarks.presets import POLICIES, PRESETS, Preset, live_context_tokens
from benchmarks.random_model import build_random_model, special_token_ids
from infercept.bench.metrics import (RunMetrics, compute_run_metrics, meets_slo, summarize,
                                     write_summary)
from infercept.bench.workload import Trace

FIXED_POLICIES = ("discard", "preserve", "swap")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-quick")
    parser.add_argument("--out", type=Path, default=None, help="default: results/<preset>")
    parser.add_argument("--quick", action="store_true", help="two rates, half the window")
    parser.add_argument("--rates", type=_floats, default=None, help="e.g. 1,2,4 (requests/s)")
    parser.add_argument("--policies", type=_names, default=None,
                        help="comma-separated, of: " + ", ".join(POLICIES))
    parser.add_argument("--duration", type=float, default=None, help="arrival window (s)")
    parser.add_argument("--threads", type=int, default=None, help="OpenMP threads per engine")
    parser.add_argument("--backend", choices=("inprocess", "http"), default="inprocess")
    parser.add_argument("--full-sweep", action="store_true",
                        help="run every rate, also past a policy's first SLO miss")
    parser.add_argument("--from-runs", action="store_true",
                        help="run nothing: rewrite the summary and plots from --out's runs/")
    return parser.parse_args(argv)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(sorted(float(x) for x in text.split(",") if x))


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def preset_from_args(args: argparse.Namespace) -> Preset:
    preset = PRESETS[args.preset]
    if args.quick:
        preset = preset.quick()
    preset = preset.with_overrides(rates=args.rates, policies=args.policies,
                                   duration_s=args.duration, threads=args.threads)
    unknown = set(preset.policies) - set(POLICIES)
    if unknown:
        raise SystemExit(f"unknown policies: {', '.join(sorted(unknown))}")
    return preset


def configure_process(threads: int) -> None:
    """Before vLLM is imported: engines in this process, ``threads`` OpenMP threads."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


class Sweep:
    """Every policy of ``preset`` at its rates; writes the outputs into ``out_dir``."""

    def __init__(self, preset: Preset, out_dir: Path, backend: str = "inprocess",
                 full_sweep: bool = False):
        self.preset, self.out_dir = preset, Path(out_dir)
        self.backend, self.full_sweep = backend, full_sweep
        self.results: dict[str, dict[float, RunMetrics]] = {}
        self.loads: dict[str, list[float]] = {}  # policy -> load averages seen by its runs

    def run(self) -> dict:
        from tqdm import tqdm

        self._prepare()
        rates = self.preset.rates
        with tqdm(total=len(self.preset.policies) * len(rates), unit="run") as bar:
            for policy in self.preset.policies:
                bar.set_description(policy)
                self.results[policy] = {}
                for rate, metrics in self._runs(policy):
                    self.results[policy][rate] = metrics
                    p90_s = metrics.normalized_latency_p90_s_per_token
                    bar.set_postfix(rate=rate, p90_ms=_ms(p90_s))
                    bar.update()
                bar.update(len(rates) - len(self.results[policy]))
        return self.write_outputs()

    def load_runs(self) -> None:
        """The metrics (and load averages) of the runs saved in ``out_dir/runs``."""
        paths = sorted((self.out_dir / "runs").glob("*.json"))
        bodies = [json.loads(p.read_text()) for p in paths if not p.stem.endswith("-engine")]
        order = {policy: i for i, policy in enumerate(self.preset.policies)}
        for body in sorted(bodies, key=lambda b: (order.get(b["policy"], len(order)), b["rate"])):
            policy = body["policy"]
            self.results.setdefault(policy, {})[body["rate"]] = RunMetrics(**body["metrics"])
            self.loads.setdefault(policy, []).extend(body["details"].get("load_average_1min", []))

    # ---- set-up ------------------------------------------------------------

    def _prepare(self) -> None:
        preset, out = self.preset, self.out_dir
        (out / "traces").mkdir(parents=True, exist_ok=True)
        (out / "runs").mkdir(exist_ok=True)
        self.model_path = str(build_random_model(out / "model", preset.model))
        vocab_size = json.loads((Path(self.model_path) / "config.json").read_text())["vocab_size"]
        excluded = special_token_ids(self.model_path)
        self.trace_paths = {}
        for rate in preset.rates:
            path = out / "traces" / f"{preset.workload}-{rate:g}.json"
            preset.trace(rate, vocab_size, excluded).save(path)
            self.trace_paths[rate] = path
        reference = preset.trace(preset.reference_rate, vocab_size, excluded)
        largest = preset.trace(max(preset.rates), vocab_size, excluded)
        self.kv_cache_tokens = preset.kv_cache_tokens(reference)
        self.unbounded_kv_cache_tokens = max(self.kv_cache_tokens,
                                             preset.unbounded_kv_cache_tokens(largest))
        setup = {
            "preset": dataclasses.asdict(preset), "backend": self.backend,
            "model_path": self.model_path, "vocab_size": vocab_size,
            "kv_cache_tokens": self.kv_cache_tokens,
            "unbounded_kv_cache_tokens": self.unbounded_kv_cache_tokens,
            "swap_space_bytes": preset.swap_space_bytes(self.kv_cache_tokens),
            "live_context_tokens_at_reference_rate": live_context_tokens(
                reference.requests, preset.reference_rate, preset.nominal_decode_s),
            "cpu_count": os.cpu_count(),
        }
        (out / "setup.json").write_text(json.dumps(setup, indent=2) + "\n")

    def engine_kwargs(self, policy: str) -> dict:
        tokens = self.unbounded_kv_cache_tokens if policy == "unbounded" else self.kv_cache_tokens
        kwargs = self.preset.engine_kwargs(self.model_path, tokens)
        if policy == "vllm":
            return kwargs
        from infercept.config import InterceptConfig

        config = InterceptConfig(policy=engine_policy(policy),
                                 swap_space_bytes=self.preset.swap_space_bytes(tokens))
        return {**kwargs, **config.engine_kwargs()}

    # ---- runs --------------------------------------------------------------

    def _runs(self, policy: str):
        """Yields (rate, metrics) per run, stopping after the first SLO miss."""
        runner = self._inprocess_runs if self.backend == "inprocess" else self._http_runs
        for result in runner(policy):
            metrics = compute_run_metrics(result.records, result.counters) if any(
                r.completed for r in result.records) else _empty_metrics(result)
            self._save_run(result, metrics)
            yield result.rate, metrics
            if not self.full_sweep and not meets_slo(metrics, self.preset.slo_p90_s_per_token):
                return

    def _inprocess_runs(self, policy: str):
        from benchmarks.backends import InterceptBackend, StockBackend

        kwargs = self.engine_kwargs(policy)
        backend = (StockBackend(kwargs) if policy == "vllm"
                   else InterceptBackend(policy, kwargs))
        with backend:
            backend.warm_up()
            self._save_engine_setup(policy, backend)
            for rate in self.preset.rates:
                backend.reset()
                load_before = os.getloadavg()[0]
                result = replay(backend, Trace.load(self.trace_paths[rate]),
                                drain_s=self.preset.drain_s)
                result.policy = policy
                result.details["load_average_1min"] = [load_before, os.getloadavg()[0]]
                self.loads.setdefault(policy, []).extend(result.details["load_average_1min"])
                yield result

    def _http_runs(self, policy: str):
        from benchmarks.http_replay import ServerProcess, engine_cli_flags

        kwargs = self.engine_kwargs(policy)
        flags = engine_cli_flags({k: v for k, v in kwargs.items()
                                  if k not in ("scheduler_cls", "additional_config",
                                               "kv_transfer_config")})
        if policy == "vllm":
            command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                       "--model", self.model_path, *flags, "--enable-prompt-tokens-details"]
        else:
            command = [str(Path(sys.executable).with_name("infercept")), "serve", self.model_path,
                       *flags, "--intercept-policy", engine_policy(policy),
                       "--swap-space-bytes", str(self.preset.swap_space_bytes(
                           self.unbounded_kv_cache_tokens if policy == "unbounded"
                           else self.kv_cache_tokens))]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.preset.threads)}
        with ServerProcess(command, self.out_dir / f"server-{policy}.log", env) as server:
            _warm_up_server(server.base_url, self.model_path)
            for rate in self.preset.rates:
                trace = Trace.load(self.trace_paths[rate])
                result = replay_http(server.base_url, self.model_path, policy, trace,
                                     drain_s=self.preset.drain_s)
                result.policy = policy
                yield result

    def _save_engine_setup(self, policy: str, backend) -> None:
        """The cost model an InferCept engine plans with, and where it came from."""
        if not hasattr(backend, "stats"):
            return
        body = {"cost_model": backend.stats()["cost_model"],
                "cost_model_source": backend.cost_model_source,
                "kv_capacity_tokens": backend.kv_capacity_tokens}
        path = self.out_dir / "runs" / f"{policy}-engine.json"
        path.write_text(json.dumps(body, indent=1) + "\n")

    def _save_run(self, result: RunResult, metrics: RunMetrics) -> None:
        counters = dataclasses.asdict(result.counters)
        counters["idle_kv_events"] = len(counters["idle_kv_events"])
        body = {"policy": result.policy, "rate": result.rate,
                "metrics": dataclasses.asdict(metrics), "counters": counters,
                "details": result.details,
                "records": [dataclasses.asdict(r) for r in result.records]}
        path = self.out_dir / "runs" / f"{result.policy}-{result.rate:g}.json"
        path.write_text(json.dumps(body, indent=1) + "\n")

    # ---- outputs -------------------------------------------------------------

    def write_outputs(self) -> dict:
        from infercept.bench.plots import plot_latency_vs_rate, plot_recompute_and_waste

        slo = self.preset.slo_p90_s_per_token
        write_summary(self.results, slo, self.out_dir)
        summary = summarize(self.results, slo)
        summary["headline"] = headline(summary)
        summary["headline"]["load_average_1min"] = {
            policy: [min(loads), max(loads)] for policy, loads in self.loads.items() if loads}
        head_json = json.dumps(summary["headline"], indent=2) + "\n"
        (self.out_dir / "headline.json").write_text(head_json)
        with open(self.out_dir / "summary.md", "a") as md:
            md.write("\n" + headline_markdown(summary["headline"]))
        title = f"{self.preset.name}: {self.preset.workload}, {self.backend}"
        plot_latency_vs_rate(summary, self.out_dir / "latency_vs_rate.png", title=title)
        plot_recompute_and_waste(summary, self.out_dir / "recompute_waste.png")
        return summary


def _warm_up_server(base_url: str, model: str) -> None:
    import httpx

    body = {"model": model, "prompt": [5 + i % 97 for i in range(96)], "max_tokens": 8,
            "temperature": 0.0, "ignore_eos": True}
    httpx.post(f"{base_url}/v1/completions", json=body, timeout=300.0).raise_for_status()


def engine_policy(policy: str) -> str:
    """The engine's policy: ``unbounded`` is ``preserve`` with a cache that never fills."""
    return "preserve" if policy == "unbounded" else policy


def _empty_metrics(result: RunResult) -> RunMetrics:
    """Metrics of a run in which nothing completed (so it misses any SLO)."""
    return RunMetrics(len(result.records), 0, result.details.get("elapsed_s", 0.0), None, None,
                      None, None, 0.0, 0.0, None, None, None, None, 0)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


# ---------------------------------------------------------------------------- headline

def headline(summary: dict) -> dict:
    """min-waste's sustainable rate against the others', and the shares at a common rate.

    A policy that misses the SLO at the lowest rate L has no sustainable rate; the ratio
    is then bounded: min-waste's rate / L from below (or L / the other's from above)."""
    policies = summary["policies"]
    rate = {name: entry["sustainable_rate"] for name, entry in policies.items()}
    lowest = min((run["rate"] for e in policies.values() for run in e["runs"]), default=None)
    ours = rate.get("min-waste")

    def compare(other: str | None) -> dict | None:
        if other is None or other not in rate or "min-waste" not in rate:
            return None
        theirs = rate[other]
        if ours and theirs:
            return {"ratio": ours / theirs}
        if ours:
            return {"ratio": None, "at_least": ours / lowest}
        if theirs:
            return {"ratio": None, "at_most": lowest / theirs}
        return {"ratio": None}

    fixed = {p: rate[p] or 0.0 for p in FIXED_POLICIES if p in rate}
    best = max(fixed.values(), default=None)
    tied = [p for p, value in fixed.items() if value == best]
    out = {"sustainable_rate": rate, "best_fixed_policies": tied,
           "min_waste_vs": {"vllm": compare("vllm"),
                            "best_fixed": compare(tied[0] if tied else None),
                            "ttl": compare("ttl"), "unbounded": compare("unbounded")}}
    from infercept.bench.plots import common_rate

    at = common_rate(summary)
    out["at_rate"] = at
    for key in ("recompute_share_of_forward_time", "recompute_share_of_forwarded_tokens",
                "memory_waste_fraction"):
        out[key] = _at(policies, at, key)
    return out


def _at(policies: dict, rate: float | None, key: str) -> dict:
    return {name: next((run[key] for run in entry["runs"] if run["rate"] == rate), None)
            for name, entry in policies.items()}


def headline_markdown(head: dict) -> str:
    def fmt(value, pattern="{:.2f}"):
        return "-" if value is None else pattern.format(value)

    def ratio(entry: dict | None) -> str:
        if not entry:
            return "-"
        if entry["ratio"] is not None:
            return fmt(entry["ratio"])
        if "at_least" in entry:
            return f"> {fmt(entry['at_least'])} (the other missed the SLO at the lowest rate)"
        if "at_most" in entry:
            return f"< {fmt(entry['at_most'])} (min-waste missed the SLO at the lowest rate)"
        return "- (both missed the SLO at the lowest rate)"

    lines = ["| min-waste vs | ratio of sustainable rates |", "|---|---|"]
    for name, entry in head["min_waste_vs"].items():
        label = name
        if name == "best_fixed":
            label = f"best fixed ({', '.join(head['best_fixed_policies'])})"
        lines.append(f"| {label} | {ratio(entry)} |")
    lines += ["", f"At {fmt(head['at_rate'], '{:g}')} req/s:", "",
              "| policy | recompute (time) | recompute (tokens) | memory waste | load average |",
              "|---|---|---|---|---|"]
    for name in head["recompute_share_of_forward_time"]:
        load = head.get("load_average_1min", {}).get(name)
        lines.append(f"| {name} | {fmt(head['recompute_share_of_forward_time'][name], '{:.1%}')} "
                     f"| {fmt(head['recompute_share_of_forwarded_tokens'][name], '{:.1%}')} "
                     f"| {fmt(head['memory_waste_fraction'][name], '{:.2%}')} "
                     f"| {'-' if load is None else f'{load[0]:.1f}-{load[1]:.1f}'} |")
    lines += ["", "Load average: the machine's 1-minute load over the policy's runs "
              "(min-max; this many runnable processes shared the cores)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = preset_from_args(args)
    configure_process(preset.threads)
    out_dir = args.out or Path("results") / preset.name
    sweep = Sweep(preset, out_dir, backend=args.backend, full_sweep=args.full_sweep)
    if args.from_runs:
        sweep.load_runs()
        sweep.write_outputs()
    else:
        sweep.run()
    print((out_dir / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
