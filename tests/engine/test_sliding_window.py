"""Models that mix sliding-window and full-attention layers (Gemma 3, gpt-oss): a tiny
random Llama whose first layer attends over a 64-token window, token-exact against stock
vLLM, which serves it with two KV cache groups (a sliding group whose blocks are dropped
as they leave the window, and a full-attention group).

- The policies that may swap (preserve, swap, min-waste, ttl) run InferCept's KV
  connector, which does not declare vLLM's hybrid KV cache manager (`SupportsHMA`): vLLM
  then serves the model with one KV cache group, every layer keeping all its blocks (the
  kernel still applies the window). Correct, at the memory cost of the sliding layers'
  old blocks.
- discard and vllm need no connector: the engine keeps both groups. A paused request's
  blocks are freed, handed on or counted in every group.
"""

from __future__ import annotations

import gc

import pytest
from kv_accounting import assert_all_free, scheduler_of
from scripted import check_equivalent, random_scripts, run_scripts

WINDOW = 64


@pytest.fixture(scope="module")
def swa_model(tmp_path_factory):
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-swa"), sliding_window=WINDOW,
                            layer_types=["sliding_attention", "full_attention"])


@pytest.fixture(scope="module")
def swa_stock(swa_model):
    from conftest import engine_kwargs
    from reference import StockReference

    reference = StockReference(engine_kwargs(swa_model))
    yield reference
    reference.close()


def scripts():
    # Contexts of 100 to 330 tokens: well past the window.
    return random_scripts(10, seed=4, prompt_tokens=(100, 200), result_tokens=(10, 60),
                          max_tokens=64)


def groups(llm):
    return scheduler_of(llm).kv_cache_config.kv_cache_groups


@pytest.mark.parametrize("policy", ["preserve", "swap", "min-waste"])
def test_connector_policies_serve_it_with_one_group(live_engine, swa_model, swa_stock, policy):
    llm = live_engine.get(swa_model, policy, kv_cache_bytes=4 << 20, swap_space_bytes=2 << 20)
    [group] = groups(llm)
    assert group.kv_cache_spec.sliding_window == WINDOW  # the window is still applied
    sessions = run_scripts(llm, scripts())
    assert check_equivalent(swa_stock, sessions) == 10 * 64
    assert_all_free(llm)


@pytest.mark.parametrize("policy", ["discard", "vllm"])
def test_without_the_connector_it_keeps_both_groups(live_engine, swa_model, swa_stock, policy):
    from conftest import engine_kwargs

    from infercept import LLM

    live_engine.close()  # one engine at a time: the next test rebuilds the shared one
    llm = LLM(**engine_kwargs(swa_model, 4 << 20), intercept_policy=policy)
    try:
        specs = sorted(type(g.kv_cache_spec).__name__ for g in groups(llm))
        assert specs == ["FullAttentionSpec", "SlidingWindowSpec"]
        sessions = run_scripts(llm, scripts())
        assert check_equivalent(swa_stock, sessions) == 10 * 64
        assert_all_free(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
