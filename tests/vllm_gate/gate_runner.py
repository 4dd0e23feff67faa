"""Run vLLM 0.32.0's own scheduler tests against InferCept's scheduler.

The gate: every test of vLLM's `tests/v1/core/test_scheduler.py` and
`tests/v1/core/test_async_scheduler.py` that passes with vLLM's own scheduler
("stock") must pass with InferCept's (`InterceptScheduler`,
`AsyncInterceptScheduler`), under each InferCept policy, except the tests
listed in `EXCEPTIONS` with their reasons.

vLLM's test files are fetched from the pinned sdist at run time (`gate_fetch.py`,
cached outside git); each mode runs in its own pytest subprocess with the
plugin `gate_plugin.py`. The stock run's outcomes are cached next to the
tests, keyed by everything they depend on (sdist, vLLM's version, the plugin,
the stand-in model), so a CI run costs one InferCept run once the cache is
warm.

Commands (from the repository root):

    scripts/vllm_gate.sh                        # min-waste (the CI default)
    scripts/vllm_gate.sh --policies all         # every policy, one after another
    scripts/vllm_gate.sh --policies swap,ttl -- -k preempt   # pytest args for both runs
    scripts/vllm_gate.sh --fresh-stock          # rerun the stock baseline too

or, through the suite's test, `INFERCEPT_GATE_POLICIES=all scripts/test.sh
tests/engine/test_vllm_scheduler_gate.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

GATE_DIR = Path(__file__).resolve().parent
REPO = GATE_DIR.parents[1]
sys.path[:0] = [str(GATE_DIR), str(REPO / "tests"), str(REPO)]

import gate_fetch as fetch  # noqa: E402

from infercept.config import POLICIES  # noqa: E402
CONNECTOR_POLICIES = ("min-waste", "preserve", "swap", "ttl")  # InferCept's connector installed
DEFAULT_POLICIES = ("min-waste",)

# The vLLM tests' model names, redirected (vLLM's VLLM_MODEL_REDIRECT_PATH) to a
# local stand-in: a tiny random Llama with a tokenizer (tests/tiny_model.py),
# with opt-125m's context length. What the scheduler tests read of the model:
# its context length (the scheduler's max_model_len when a test gives none), a
# tokenizer (the structured-output manager), a decoder-only architecture.
# llava-1.5 stands in as that text-only model too: vLLM's llava module imports
# torchvision, which this project's venv does not have (the CPU build's is
# CUDA-linked; scripts/setup.sh removes it), so the multimodal tests that need
# llava's image-token budget fail under stock here and are outside the gate; its
# text-only tests (EC connector, encoder-input errors) run and are gated.
REDIRECTED_MODELS = ("facebook/opt-125m", "llava-hf/llava-1.5-7b-hf")
STANDIN_MAX_POSITION_EMBEDDINGS = 2048


@dataclass(frozen=True)
class Excepted:
    """A test that may fail with InferCept's scheduler although it passes with
    vLLM's: why, and under which policies (keys of EXCEPTIONS are node ids, or
    node ids without their parameters, covering every parametrization)."""

    reason: str
    policies: tuple[str, ...] = CONNECTOR_POLICIES


_NO_CONNECTOR = (
    "written for a scheduler with no KV connector (or only vLLM's ExampleConnector); "
    "InferCept's swap policies install their own (InterceptConnector), as "
    "`infercept serve` does"
)
_ENC_DEC = (
    "encoder-decoder KV layout (a cross-attention KV cache group beside the "
    "self-attention one, built by _create_encoder_decoder_scheduler); vLLM asserts "
    "that no KV connector runs with an encoder-decoder model, so the swap policies "
    "cannot run such models"
)
_SCHED = "tests/v1/core/test_scheduler.py::"
EXCEPTIONS: dict[str, Excepted] = {
    _SCHED + "test_reset_connector_cache_no_connector_is_no_op_success": Excepted(
        _NO_CONNECTOR + ": asserts `scheduler.connector is None`"),
    _SCHED + "test_prefix_cache_stats_counted_once_for_retried_then_scheduled_request":
        Excepted(_NO_CONNECTOR + ": its helper _step_until_done reads "
                   "`kv_connector_metadata.requests` (ExampleConnector's metadata) "
                   "whenever a connector is present; InferCept's SwapMetadata has "
                   "saves and loads"),
    **{_SCHED + name: Excepted(_ENC_DEC) for name in (
        "test_cross_attn_blocks_not_over_allocated",
        "test_cross_attn_blocks_not_under_allocated",
        "test_cross_attn_zero_blocks_without_encoder_inputs",
        "test_variable_length_cross_attn_block_allocation",
    )},
}

# Failures under InferCept already diagnosed, printed with the diff (they still
# fail the gate until fixed or excepted).
KNOWN_CAUSES: dict[str, str] = {}


def _matches(nodeid: str, key: str) -> bool:
    return nodeid == key or nodeid.startswith(key + "[")


def exception_for(nodeid: str, policy: str) -> Excepted | None:
    for key, exc in EXCEPTIONS.items():
        if _matches(nodeid, key) and policy in exc.policies:
            return exc
    return None


def known_cause(nodeid: str) -> str | None:
    for key, cause in KNOWN_CAUSES.items():
        if _matches(nodeid, key):
            return cause
    return None


# ---- preparing a run ------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def standin_model() -> Path:
    """A tiny random Llama standing in for facebook/opt-125m (built once, cached)."""
    from tiny_model import build_tiny_model

    path = fetch.cache_root() / "models" / "opt-125m-standin"
    config_path = path / "config.json"
    if not config_path.exists():
        log(f"vllm gate: building the stand-in model in {path}")
    build_tiny_model(path)
    config = json.loads(config_path.read_text())
    if config.get("max_position_embeddings") != STANDIN_MAX_POSITION_EMBEDDINGS:
        config["max_position_embeddings"] = STANDIN_MAX_POSITION_EMBEDDINGS
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


@dataclass
class Prepared:
    tests_dir: Path
    redirect: Path
    ini: Path
    key: str  # what the stock outcomes depend on


def prepare() -> Prepared:
    tests_dir = fetch.fetch(log)
    model = standin_model()
    root = fetch.cache_root()
    redirect = root / "model-redirect.json"
    redirect.write_text(json.dumps({name: str(model) for name in REDIRECTED_MODELS}, indent=1))
    ini = root / "gate-pytest.ini"
    # pytest-timeout bounds each vLLM test; no cache provider writes into the tree.
    ini.write_text("[pytest]\naddopts = -p no:cacheprovider\ntimeout = 600\n")
    import vllm

    digest = hashlib.sha256()
    for part in (fetch.SDIST_SHA256, vllm.__version__, sys.version,
                 (GATE_DIR / "gate_plugin.py").read_text(), redirect.read_text(),
                 (model / "config.json").read_text(), (model / "tokenizer.json").read_text()):
        digest.update(part.encode())
    return Prepared(tests_dir, redirect, ini, digest.hexdigest()[:16])


# ---- one pytest subprocess ------------------------------------------------------


@dataclass
class Run:
    mode: str
    policy: str | None
    tests: dict[str, dict]
    wall_s: float
    log_path: Path
    patched: list[str] = field(default_factory=list)

    def ids(self, outcome: str) -> list[str]:
        return sorted(k for k, v in self.tests.items() if v["outcome"] == outcome)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for v in self.tests.values():
            counts[v["outcome"]] = counts.get(v["outcome"], 0) + 1
        return dict(sorted(counts.items()))

    def label(self) -> str:
        return "stock" if self.mode == "stock" else self.policy

    def __repr__(self) -> str:
        return f"Run({self.label()}, {self.counts()}, log={self.log_path})"


def run_tests(prep: Prepared, mode: str, policy: str | None = None,
              pytest_args: tuple[str, ...] = (), timeout_s: float = 3600) -> Run:
    label = "stock" if mode == "stock" else policy
    runs = fetch.cache_root() / "runs"
    runs.mkdir(exist_ok=True)
    results = runs / f"{label}.json"
    log_path = runs / f"{label}.log"
    results.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(GATE_DIR),
        INFERCEPT_GATE_MODE=mode,
        INFERCEPT_GATE_POLICY=policy or "",
        INFERCEPT_GATE_RESULTS=str(results),
        VLLM_MODEL_REDIRECT_PATH=str(prep.redirect),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_LOGGING_LEVEL="INFO",  # vLLM's default; a test reads INFO records
        TOKENIZERS_PARALLELISM="false",
    )
    command = [
        sys.executable, "-m", "pytest", "-p", "gate_plugin", "-c", str(prep.ini),
        "--rootdir", str(prep.tests_dir), "-q", "-rfE", *fetch.TEST_FILES, *pytest_args,
    ]
    log(f"vllm gate: running vLLM's scheduler tests, {label} (log: {log_path})")
    start = time.monotonic()
    with open(log_path, "w") as out:
        try:
            proc = subprocess.run(command, cwd=prep.tests_dir, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall_s = time.monotonic() - start
    if not results.exists():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"vllm gate: the {label} run wrote no results (exit {rc}, "
                           f"{wall_s:.0f} s); last lines of {log_path}:\n{tail}")
    data = json.loads(results.read_text())
    run = Run(mode, policy, data["tests"], wall_s, log_path, data.get("patched", []))
    log(f"vllm gate: {label}: {run.counts()} in {wall_s:.0f} s")
    return run


def stock_run(prep: Prepared, pytest_args: tuple[str, ...] = (), fresh: bool = False) -> Run:
    """The stock outcomes, from the cache when nothing they depend on changed."""
    cached = fetch.cache_root() / f"stock-{prep.key}.json"
    if not pytest_args and not fresh and cached.exists():
        data = json.loads(cached.read_text())
        log(f"vllm gate: stock outcomes from {cached} (measured in {data['wall_s']:.0f} s)")
        return Run("stock", None, data["tests"], 0.0, cached)
    run = run_tests(prep, "stock", pytest_args=pytest_args)
    if not pytest_args:
        cached.write_text(json.dumps({"wall_s": run.wall_s, "tests": run.tests}, indent=1))
    return run


# ---- the comparison ---------------------------------------------------------------


@dataclass
class Verdict:
    policy: str
    regressions: list[str]  # passed under stock, not under InferCept, not excepted
    excepted: list[str]  # the same, excepted (with a reason)
    newly_passing: list[str]  # failed under stock, pass under InferCept
    exercised: int  # tests that constructed an InferCept scheduler

    @property
    def ok(self) -> bool:
        return not self.regressions


def compare(stock: Run, gate: Run) -> Verdict:
    regressions, excepted = [], []
    for nodeid in stock.ids("passed"):
        if gate.tests.get(nodeid, {}).get("outcome") == "passed":
            continue
        (excepted if exception_for(nodeid, gate.policy) else regressions).append(nodeid)
    newly = [n for n in gate.ids("passed") if stock.tests.get(n, {}).get("outcome") != "passed"]
    exercised = sum(1 for v in gate.tests.values() if v.get("infercept_schedulers"))
    return Verdict(gate.policy, regressions, excepted, newly, exercised)


def describe(stock: Run, gate: Run, verdict: Verdict) -> str:
    stock_passed = stock.ids("passed")
    both = sum(1 for n in stock_passed if gate.tests.get(n, {}).get("outcome") == "passed")
    lines = [
        f"policy {gate.policy}: {len(stock_passed)} pass with vLLM's scheduler, {both} of them "
        f"with InferCept's ({gate.counts()} in all, {verdict.exercised} tests constructed "
        f"an InferCept scheduler, {gate.wall_s:.0f} s)",
    ]
    if verdict.regressions:
        lines.append("  FAIL with InferCept's scheduler, pass with vLLM's "
                     f"({len(verdict.regressions)}):")
        for nodeid in verdict.regressions:
            entry = gate.tests.get(nodeid, {"outcome": "not run"})
            lines.append(f"    {nodeid}  [{entry['outcome']}] {entry.get('message', '')}")
            cause = known_cause(nodeid)
            if cause:
                lines.append(f"        known cause: {cause}")
    if verdict.excepted:
        lines.append(f"  excepted ({len(verdict.excepted)}):")
        by_reason: dict[str, list[str]] = {}
        for nodeid in verdict.excepted:
            by_reason.setdefault(exception_for(nodeid, gate.policy).reason, []).append(nodeid)
        for reason, nodeids in by_reason.items():
            lines.extend(f"    {nodeid}" for nodeid in nodeids)
            lines.append(f"      because: {reason}")
    if verdict.newly_passing:
        lines.append(f"  pass only with InferCept's scheduler ({len(verdict.newly_passing)}): "
                     + ", ".join(verdict.newly_passing))
    lines.append(f"  log: {gate.log_path}")
    return "\n".join(lines)


def parse_policies(text: str | None) -> tuple[str, ...]:
    if not text:
        return DEFAULT_POLICIES
    if text.strip() == "all":
        return POLICIES
    policies = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)} or all")
    return policies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default=os.environ.get("INFERCEPT_GATE_POLICIES"),
                        help="comma-separated, or all (default: min-waste)")
    parser.add_argument("--fresh-stock", action="store_true",
                        help="rerun the stock baseline instead of reading its cache")
    parser.add_argument("--stock-only", action="store_true")
    parser.add_argument("pytest_args", nargs="*", help="passed to both pytest runs (after --)")
    args = parser.parse_args(argv)
    policies = parse_policies(args.policies)
    prep = prepare()
    stock = stock_run(prep, tuple(args.pytest_args), args.fresh_stock)
    print(f"stock: {stock.counts()}; failing with vLLM's own scheduler here: "
          + ", ".join(stock.ids("failed") + stock.ids("error")))
    if args.stock_only:
        return 0
    ok = True
    for policy in policies:
        gate = run_tests(prep, "infercept", policy, tuple(args.pytest_args))
        verdict = compare(stock, gate)
        print(describe(stock, gate, verdict), flush=True)
        ok &= verdict.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
