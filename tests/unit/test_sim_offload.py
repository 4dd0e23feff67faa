"""vLLM's native CPU offloading in the simulator (the ``vllm-offload`` baseline), worked out
by hand on the TINY profile of tests/unit/test_sim_engine.py (blocks of 4 tokens, 16 on
the device and 16 in the CPU tier; a transfer takes 0.1 ms per token)."""

import pytest
from test_sim_engine import KV_BYTES, ONE, TINY, run, trace

from infercept.bench.workload import Request, Segment
from infercept.sim.offload import CpuTier


def test_the_tier_evicts_least_recent_runs_last_blocks_first():
    tier = CpuTier(5)
    assert tier.write("a", 0, 3) and tier.write("b", 0, 2)  # LRU order: a, b
    tier.touch(("a",))  # a request on "a" finished: b is now the least recent
    assert tier.write("c", 0, 2)
    assert (tier.blocks_of("a"), tier.blocks_of("b"), tier.blocks_of("c")) == (3, 0, 2)
    assert tier.write("d", 0, 1)  # a is least recent: its last block goes
    assert (tier.blocks_of("a"), tier.blocks_of("d")) == (2, 1)
    # All or nothing, and never a pinned run (one a load reads) nor the writer's own.
    assert not tier.write("e", 0, 5, pinned=("a", "c", "d"))
    assert tier.num_dropped_writes == 1 and tier.blocks_of("e") == 0
    assert not tier.write("a", 0, 4, pinned=("c", "d"))  # only a's own blocks: no room
    assert tier.write("a", 0, 3, pinned=("c",))  # d's block makes room for a's third
    assert (tier.blocks_of("a"), tier.blocks_of("d"), tier.num_used_blocks) == (3, 0, 5)
    tier.check()


def test_a_run_grows_only_at_its_end():
    tier = CpuTier(10)
    assert tier.write("a", 0, 2)
    assert tier.write("a", 3, 5)  # past a gap: not kept
    assert tier.blocks_of("a") == 2
    assert tier.write("a", 2, 4) and tier.blocks_of("a") == 4
    assert tier.write("a", 0, 3) and tier.num_written_blocks == 4  # already there


@pytest.mark.parametrize("tier_tokens, loaded, recomputed, end_s",
                         [(128, 8, 3, 1.0358 + 0.012 + 0.010), (64, 4, 7, 1.0354 + 0.016 + 0.010)])
def test_a_prompt_evicted_from_the_device_is_loaded_back_from_the_tier(tier_tokens, loaded,
                                                                       recomputed, end_s):
    """ONE's prompt (9 tokens) writes its 2 full blocks to the tier in iteration 0. During
    the tool call a 60-token prompt ("c") takes 15 blocks and a 16th as it decodes, which
    evicts the session's cached blocks from the device: stock vLLM recomputes all 11
    tokens of KV at the follow-up (14 tokens). With the tier, the follow-up finds its
    blocks there and loads them (after the step that admits it, 0.1 ms a token).
    - A 32-block tier holds everything: 2 blocks (8 tokens) loaded, tokens 8-10 (3)
      recomputed.
    - The 16-block tier fills as "c" writes its 15 prompt blocks: the least recent run,
      the finished session's, gives up its last block first; 1 block (4 tokens) loaded,
      7 recomputed.
    Timing: the follow-up arrives at 1.035 and starts its load in a step with nothing to
    run; the load lands 0.8 (0.4) ms later; then it prefills 6 (10) tokens, 12 (16) ms,
    and decodes its last token, 10 ms."""
    from infercept.sim.runner import SimConfig, simulate

    big = Request("c", "qa", 0.5, (Segment(60, 2),))
    the_trace = trace(*ONE.requests, big)
    profile = TINY.with_cost(cpu_capacity_tokens=tier_tokens)
    stock = simulate(the_trace, profile, "vllm", SimConfig(check_invariants=True))
    offload = simulate(the_trace, profile, "vllm-offload", SimConfig(check_invariants=True))
    assert all(r.completed for r in offload.records)
    assert stock.counters.recomputed_tokens == 11
    assert offload.counters.recomputed_tokens == recomputed
    assert offload.counters.swapped_in_bytes == loaded * KV_BYTES
    assert offload.counters.forwarded_tokens == stock.counters.forwarded_tokens - loaded
    assert offload.records[0].end_s == pytest.approx(end_s)


def test_without_pressure_the_tier_is_not_read():
    """With the device's prefix cache still holding the prompt, nothing is loaded: the
    offload baseline runs exactly as stock vLLM."""
    stock, offload = run("vllm"), run("vllm-offload")
    assert offload.counters.swapped_in_bytes == 0
    assert offload.records == stock.records and offload.counters.forwarded_tokens == \
        stock.counters.forwarded_tokens


@pytest.mark.parametrize("prefix_caching", [True])
def test_the_tier_holds_what_fits(prefix_caching):
    """A tier of 2 blocks: the second request's write evicts the first's."""
    small = TINY.with_cost(cpu_capacity_tokens=8)
    from infercept.sim.runner import SimConfig, simulate

    requests = [Request(f"r{i}", "qa", 0.1 * i, (Segment(9, 1),)) for i in range(2)]
    result = simulate(trace(*requests), small, "vllm-offload", SimConfig(check_invariants=True))
    assert all(r.completed for r in result.records)


def test_with_an_empty_tier_it_is_stock_vllm():
    """Its device side is stock vLLM's (which tests/engine/test_sim_validation.py checks
    against the real engine to the token): with no CPU tier the runs are identical."""
    from test_sim_properties import SMALL, small_trace

    from infercept.sim.runner import simulate

    for shared_prefix_tokens in (0, 200):
        the_trace = small_trace(0, shared_prefix_tokens=shared_prefix_tokens)
        profile = SMALL.with_cost(cpu_capacity_tokens=0)
        stock = simulate(the_trace, profile, "vllm")
        offload = simulate(the_trace, profile, "vllm-offload")
        assert offload.records == stock.records and offload.counters == stock.counters
        # With the profile's tier it loads what the device lost. (Whether it recomputes
        # less depends: on this thrashing profile the blocks a load holds while it waits
        # change who is preempted, and recomputation moves by a few percent either way.)
        assert simulate(the_trace, SMALL, "vllm-offload").counters.swapped_in_bytes > 0
