"""Shared fixtures: a tiny model, one live InferCept engine, the stock reference.

Engines run in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) with two OpenMP
threads, so the suite stays fast on two cores. vLLM keeps one KV connector
per process, so at most one InferCept engine lives at a time: `intercept_llm`
reuses it across tests and rebuilds it only when a test needs other engine
settings; its policy can change between tests. Stock vLLM, the oracle, runs in
a child process (`tests/reference.py`).
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_model  # noqa: E402

BLOCK_SIZE = 32
MAX_MODEL_LEN = 2048
# Every InferCept engine of the suite runs the CPU emulation of the GPU's ordering:
# a swap-out's save completes this many steps after it is queued, reading the
# device blocks only then, and loads land only at their layer's wait.
EMULATE_LAG = 2


def engine_kwargs(model: Path, kv_cache_bytes: int = 32 << 20, **overrides) -> dict:
    kwargs = dict(
        model=str(model),
        dtype="float32",
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=kv_cache_bytes,
        max_model_len=MAX_MODEL_LEN,
        enforce_eager=True,
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def stock(tiny_model):
    from reference import StockReference

    reference = StockReference(engine_kwargs(tiny_model))
    yield reference
    reference.close()


class LiveEngine:
    """The one InferCept engine of this process."""

    def __init__(self):
        self.llm = None
        self.key = None

    def get(self, model: Path, policy: str, kv_cache_bytes: int, swap_space_bytes: int,
            max_model_len: int = MAX_MODEL_LEN):
        from infercept import LLM  # vllm.LLM with InferCept's engine arguments

        key = (str(model), kv_cache_bytes, swap_space_bytes, max_model_len)
        if self.key != key:
            self.close()
            # Built with a policy that needs the swap connector; any policy,
            # `vllm` and `discard` included, can then be set per test.
            # Copies run as late as a GPU may run them (tests/conftest.EMULATE_LAG).
            self.llm = LLM(**engine_kwargs(model, kv_cache_bytes, max_model_len=max_model_len),
                           intercept_policy="swap", swap_space_bytes=swap_space_bytes,
                           emulate_async_copies=EMULATE_LAG)
            self.key = key
        self.scheduler.policy_driver.set_policy(policy)
        return self.llm

    @property
    def scheduler(self):
        return self.llm.llm_engine.engine_core.engine_core.scheduler

    def close(self):
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            self.key = None
            gc.collect()


_LIVE = LiveEngine()


@pytest.fixture(scope="session")
def live_engine():
    yield _LIVE
    _LIVE.close()


@pytest.fixture
def intercept_llm(tiny_model, live_engine):
    """`intercept_llm(policy, kv_cache_bytes=..., swap_space_bytes=...)` -> live vllm.LLM.

    After the test, every device block and CPU swap block is free again.
    """
    from kv_accounting import assert_all_free

    def get(policy: str, kv_cache_bytes: int = 32 << 20, swap_space_bytes: int = 64 << 20,
            max_model_len: int = MAX_MODEL_LEN):
        return live_engine.get(tiny_model, policy, kv_cache_bytes, swap_space_bytes, max_model_len)

    yield get
    if live_engine.llm is not None:
        assert_all_free(live_engine.llm)
