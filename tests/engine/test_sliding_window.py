"""Models that mix sliding-window and full-attention layers (Gemma 3, gpt-oss): a tiny
random Llama whose first layer attends over a 64-token window, token-exact against stock
vLLM. vLLM's hybrid KV cache manager serves it with two KV cache groups: a sliding group
whose blocks are dropped (replaced by the null block) as they leave the window, and a
full-attention group. InferCept's connector declares `SupportsHMA`, so every policy
keeps both groups: a swap copies each group's blocks that are still there, a resume
hands both groups' blocks on.
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
def test_policies_with_the_connector_keep_both_groups(live_engine, swa_model, swa_stock,
                                                      policy, monkeypatch):
    llm = live_engine.get(swa_model, policy, kv_cache_bytes=4 << 20, swap_space_bytes=2 << 20)
    specs = {type(g.kv_cache_spec).__name__: g.kv_cache_spec for g in groups(llm)}
    assert set(specs) == {"FullAttentionSpec", "SlidingWindowSpec"}
    assert specs["SlidingWindowSpec"].sliding_window == WINDOW
    swap = scheduler_of(llm).policy_driver.swap
    saved = []
    original = swap.swap_out

    def swap_out(key, device_blocks, num_tokens, first_block=0):
        done = original(key, device_blocks, num_tokens, first_block)
        if done:
            saved.append((device_blocks, num_tokens, swap.bytes_swapped_out))
        return done

    monkeypatch.setattr(swap, "swap_out", swap_out)
    sessions = run_scripts(llm, scripts())
    assert check_equivalent(swa_stock, sessions) == 10 * 64
    if policy == "swap":
        assert saved
        names = [type(g.kv_cache_spec).__name__ for g in groups(llm)]
        for device_blocks, num_tokens, _ in saved:
            by_name = dict(zip(names, device_blocks))
            full, sliding = by_name["FullAttentionSpec"], by_name["SlidingWindowSpec"]
            # The window's dropped blocks are not there to copy.
            assert None not in full and (num_tokens <= 2 * WINDOW or None in sliding)
    assert_all_free(llm)


@pytest.mark.parametrize("policy", ["discard", "vllm"])
def test_policies_without_the_connector_keep_both_groups(live_engine, swa_model, swa_stock,
                                                         policy):
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
