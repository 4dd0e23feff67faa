"""The waste equations on hand-worked numbers (DESIGN.md section 2)."""

import math

import pytest

from infercept.policy import (CostModel, byte_seconds, recompute_chunk_tokens,
                              recompute_chunks, waste_chunked_discard, waste_discard,
                              waste_preserve, waste_swap)

# forward: 0.5 s up to 256 tokens, +1/1024 s per token beyond; swap: 1/4096 s per token.
COST = CostModel(fwd_base_s=0.5, fwd_per_token_s=1 / 1024, saturation_tokens=256,
                 swap_s_per_token=1 / 4096, kv_bytes_per_token=1000, block_size_tokens=16,
                 device_capacity_tokens=100_000, cpu_capacity_tokens=50_000)


def test_preserve_holds_the_context_for_the_whole_interception():
    # 1000 tokens held for 2 s
    assert waste_preserve(1000, 2.0) == 2000.0
    assert waste_preserve(1000, 0.0) == 0.0


def test_discard_recomputes_in_one_pass():
    # T_fwd(1280) = 0.5 + 1024/1024 = 1.5 s; 1.5*1280 + 1.5*3000 = 1920 + 4500
    assert waste_discard(COST, 1280, 3000) == 6420.0


def test_chunked_discard_with_many_small_chunks():
    # n = ceil(1280/156) = 9 chunks of 142.2 tokens, each T_fwd = 0.5 s (flat region)
    # 1.5*1280/2 + 9*0.5*3000 = 960 + 13500
    assert waste_chunked_discard(COST, 1280, 3000, chunk_tokens=156) == 14460.0


def test_chunked_discard_with_chunks_beyond_saturation():
    # n = 2 chunks of 640 tokens: T_fwd(640) = 0.5 + 384/1024 = 0.875 s
    # 1.5*1280/2 + 2*0.875*3000 = 960 + 5250
    assert waste_chunked_discard(COST, 1280, 3000, chunk_tokens=640) == 6210.0


def test_chunked_discard_alone_in_the_batch_costs_half_the_recompute():
    # nobody else waits: only T_fwd(1280)*1280/2 = 1.5*640
    assert waste_chunked_discard(COST, 1280, 0, chunk_tokens=640) == 960.0


def test_recompute_chunks():
    assert recompute_chunks(1280, 156) == 9
    assert recompute_chunks(1280, 640) == 2
    assert recompute_chunks(1281, 640) == 3
    assert recompute_chunks(0, 16) == 1
    with pytest.raises(ValueError):
        recompute_chunks(10, 0)


def test_swap_stalls_the_batch_twice_unless_hidden():
    # T_swap(4096) = 1 s; out and back in: 2*1*3000
    assert waste_swap(COST, 4096, 3000) == 6000.0
    assert waste_swap(COST, 4096, 3000, budget_tokens=4095) == 6000.0
    assert waste_swap(COST, 4096, 3000, budget_tokens=4096) == 0.0


def test_impossible_swap_is_infinite_waste_but_never_nan():
    no_swap = CostModel(0.5, 0.0, 256, math.inf, 1000, 16, 10, 10)
    assert waste_swap(no_swap, 100, 3000) == math.inf
    assert waste_swap(no_swap, 100, 0) == 0.0
    assert waste_swap(no_swap, 0, 3000) == 0.0


def test_recompute_chunk_fills_the_iteration_up_to_saturation():
    assert recompute_chunk_tokens(COST, 100) == 156   # 256 - 100
    assert recompute_chunk_tokens(COST, 250) == 16    # 6 left: at least one block
    assert recompute_chunk_tokens(COST, 1000) == 16


def test_byte_seconds():
    # 2.5 token*s at 1000 bytes per token
    assert byte_seconds(COST, 2.5) == 2500.0
