"""pytest plugin loaded into the gate's pytest subprocess (`-p gate_plugin`).

It runs vLLM 0.32.0's own scheduler tests (fetched by `gate_fetch.py`) in one of
two modes, chosen by environment variables that `gate_runner.py` sets:

- `INFERCEPT_GATE_MODE=stock`: the tests as they are, with vLLM's scheduler.
- `INFERCEPT_GATE_MODE=infercept` (and `INFERCEPT_GATE_POLICY`, one of
  `infercept.config.POLICIES`): every place the tests construct vLLM's
  `Scheduler` or `AsyncScheduler` by name constructs InferCept's instead. The
  names are replaced in vLLM's test modules after they are imported (the files
  are not edited): `tests.v1.core.utils` (`create_scheduler`) and the two test
  files (`create_scheduler_with_priority`, the encoder-decoder and hybrid Mamba
  helpers, two `object.__new__(Scheduler)` tests). Schedulers the tests build
  from another class (`DiffusionScheduler`, passed as `scheduler_cls`) stay
  vLLM's.

  InferCept's settings travel as in production, through
  `InterceptConfig.engine_kwargs`: `vllm_config.additional_config["infercept"]
  = {"policy": ..., "profile_at_startup": False, ...}`, and, for the policies
  that swap (min-waste, preserve, swap, ttl), InferCept's KV connector in
  `kv_transfer_config` when the test configured no connector of its own. A
  test's own connector (ExampleConnector, MockKVConnector, P/D roles) is kept:
  InferCept's scheduler then runs without its swap planner.

In both modes the tests' model names (facebook/opt-125m, llava-1.5) are
redirected to local stand-ins through vLLM's own `VLLM_MODEL_REDIRECT_PATH`
(set by the runner), and each test's outcome is written to
`INFERCEPT_GATE_RESULTS` (JSON) for the runner to compare.
"""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

MODE = os.environ.get("INFERCEPT_GATE_MODE", "stock")
POLICY = os.environ.get("INFERCEPT_GATE_POLICY", "min-waste")
RESULTS = os.environ.get("INFERCEPT_GATE_RESULTS")

# Modules of vLLM's tests whose `Scheduler` / `AsyncScheduler` names are replaced.
PATCHED_MODULES = (
    "tests.v1.core.utils",
    "tests.v1.core.test_scheduler",
    "tests.v1.core.test_async_scheduler",
)

_outcomes: dict[str, dict] = {}
_current: str | None = None
_built: dict[str, list[str]] = {}  # test node id -> InferCept classes it constructed
_patched: list[str] = []


# ---- InferCept's scheduler, configured as the engine configures it --------


def _configure(vllm_config, kv_cache_config) -> None:
    from vllm.config import KVTransferConfig

    from infercept.config import InterceptConfig

    # CPU swap space twice the test's device cache. The default (1 GiB) in the
    # tests' 128-byte blocks (one head of size one) would be 8M CPU blocks,
    # whose free list costs seconds per scheduler built.
    block_bytes = sum(group.kv_cache_spec.page_size_bytes * len(group.layer_names)
                      for group in kv_cache_config.kv_cache_groups)
    swap_space_bytes = 2 * kv_cache_config.num_blocks * block_bytes
    config = InterceptConfig(policy=POLICY, profile_at_startup=False,
                             swap_space_bytes=swap_space_bytes)
    kwargs = config.engine_kwargs({"additional_config": vllm_config.additional_config})
    vllm_config.additional_config = kwargs["additional_config"]
    if "kv_transfer_config" in kwargs and vllm_config.kv_transfer_config is None:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

        transfer = KVTransferConfig(**kwargs["kv_transfer_config"])
        vllm_config.kv_transfer_config = transfer
        # The test's VllmConfig was built without a connector: apply the rule
        # VllmConfig.__post_init__ applies to one built with it (the engine's
        # case), which turns the hybrid KV cache manager off for a connector
        # without HMA support. (None of these tests sets that flag itself.)
        if not KVConnectorFactory.supports_hma_config(transfer):
            vllm_config.scheduler_config.disable_hybrid_kv_cache_manager = True


def _gate_classes():
    from infercept.adapter.scheduler import AsyncInterceptScheduler, InterceptScheduler

    class GateInterceptScheduler(InterceptScheduler):
        """InterceptScheduler with its settings put into the test's VllmConfig."""

        def __new__(cls, *args, **kwargs):
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            kv_cache_config = kwargs.get("kv_cache_config", args[1] if len(args) > 1 else None)
            _configure(vllm_config, kv_cache_config)
            # What InterceptScheduler.__new__ does for the class vLLM names.
            if cls is GateInterceptScheduler and vllm_config.scheduler_config.async_scheduling:
                cls = GateAsyncInterceptScheduler
            return object.__new__(cls)

        def __init__(self, *args, **kwargs):
            name = ("AsyncInterceptScheduler" if isinstance(self, AsyncInterceptScheduler)
                    else "InterceptScheduler")
            _built.setdefault(_current or "<collection>", []).append(name)
            super().__init__(*args, **kwargs)

    class GateAsyncInterceptScheduler(GateInterceptScheduler, AsyncInterceptScheduler):
        pass

    return GateInterceptScheduler, GateAsyncInterceptScheduler


def _patch_modules() -> None:
    import sys

    sync_cls, async_cls = _gate_classes()
    for name in PATCHED_MODULES:
        module = sys.modules.get(name)
        if module is None:
            continue
        for attr, cls in (("Scheduler", sync_cls), ("AsyncScheduler", async_cls)):
            if attr in vars(module):
                setattr(module, attr, cls)
                _patched.append(f"{name}.{attr}")


# ---- hooks ------------------------------------------------------------------


def pytest_configure(config):
    for marker in ("cpu_test", "slow_test", "skip_global_cleanup", "core_model",
                   "hybrid_model", "cpu_model", "split", "distributed", "optional"):
        config.addinivalue_line("markers", f"{marker}: vLLM's marker")


def pytest_collection_finish(session):
    if MODE == "infercept":
        _patch_modules()
        if not _patched:
            raise pytest.UsageError("vllm gate: no Scheduler name found to replace")


def pytest_report_header(config):
    what = f"InferCept's scheduler, policy {POLICY}" if MODE == "infercept" else "vLLM's scheduler"
    return f"vllm gate: {what}"


def pytest_runtest_setup(item):
    global _current
    _current = item.nodeid


def pytest_runtest_logreport(report):
    entry = _outcomes.setdefault(report.nodeid, {"outcome": "passed", "duration": 0.0})
    entry["duration"] += report.duration
    if report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        entry["message"] = _crash_line(report)
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        if isinstance(report.longrepr, tuple):
            entry["message"] = str(report.longrepr[2])


def _crash_line(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return f"{os.path.basename(crash.path)}:{crash.lineno}: {crash.message}"[:2000]
    return str(report.longrepr).strip().splitlines()[-1][:2000] if report.longrepr else ""


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS:
        return
    for nodeid, classes in _built.items():
        if nodeid in _outcomes:
            _outcomes[nodeid]["infercept_schedulers"] = classes
    with open(RESULTS, "w") as f:
        json.dump({
            "mode": MODE,
            "policy": POLICY if MODE == "infercept" else None,
            "patched": _patched,
            "finished_at": time.time(),
            "tests": _outcomes,
        }, f, indent=1, sort_keys=True)


# ---- the one fixture of vLLM's top-level tests/conftest.py these files use --


@pytest.fixture()
def caplog_vllm(caplog):
    """As vLLM's tests/conftest.py: vLLM's log records reach caplog."""
    logger = logging.getLogger("vllm")
    previous = logger.propagate
    logger.propagate = True
    try:
        with caplog.at_level(logging.INFO):
            yield caplog
    finally:
        logger.propagate = previous
