"""Whole simulated runs on small mixed traces: what must hold for every policy."""

import dataclasses

import pytest

from infercept.bench.workload import generate_trace
from infercept.policy import CostModel
from infercept.sim.profiles import HardwareProfile
from infercept.sim.runner import POLICIES, SimConfig, simulate

# Tight on purpose: 2048 tokens of KV for contexts of up to 1000, 1024 on CPU.
SMALL = HardwareProfile(
    "small", CostModel(fwd_base_s=0.010, fwd_per_token_s=1e-4, saturation_tokens=64,
                       swap_s_per_token=5e-5, kv_bytes_per_token=1000, block_size_tokens=16,
                       device_capacity_tokens=2048, cpu_capacity_tokens=1024),
    max_num_seqs=16, max_num_batched_tokens=256, slo_p90_s_per_token=0.05)


def small_trace(seed: int, num_requests: int = 40, rate: float = 4.0,
                shared_prefix_tokens: int = 0):
    """With ``shared_prefix_tokens``: two system prompts, each shared by half the requests."""
    return generate_trace("mix", num_requests, rate, seed, time_scale=0.05, length_scale=0.25,
                          max_context_tokens=1000, shared_prefix_tokens=shared_prefix_tokens,
                          shared_prefix_groups=2)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed, shared_prefix_tokens", [(0, 0), (1, 0), (0, 200)])
def test_every_request_completes_and_every_block_comes_back(policy, seed, shared_prefix_tokens):
    result = simulate(small_trace(seed, shared_prefix_tokens=shared_prefix_tokens), SMALL, policy,
                      SimConfig(check_invariants=True))
    assert all(record.completed for record in result.records)
    assert result.stats["device_blocks_in_use_at_end"] == 0
    assert result.stats["cpu_blocks_in_use_at_end"] == 0
    assert result.stats["intercepted_at_end"] == 0
    assert result.counters.idle_kv_events[-1][1] == 0 if result.counters.idle_kv_events else True


def test_the_trace_puts_the_cache_under_pressure():
    """So that the run above exercises preemption, eviction and swapping."""
    preserve = simulate(small_trace(0), SMALL, "preserve")
    assert preserve.stats["decisions"].get("swap_out", 0) + \
        preserve.stats["decisions"].get("discard", 0) > 0
    assert simulate(small_trace(0), SMALL, "vllm").stats["preemptions"] > 0
    min_waste = simulate(small_trace(0), SMALL, "min-waste").stats["decisions"]
    assert min_waste.get("swap_out", 0) > 0 and min_waste.get("swap_in", 0) > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_runs_are_deterministic(policy):
    first = simulate(small_trace(3), SMALL, policy)
    second = simulate(small_trace(3), SMALL, policy)
    assert first.records == second.records
    assert first.counters == second.counters


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "vllm"])
@pytest.mark.parametrize("cpu_tokens, shared_prefix_tokens", [(1024, 0), (256, 0), (1024, 200)])
def test_skipped_plans_change_nothing(policy, cpu_tokens, shared_prefix_tokens):
    """The driver skips planner calls whose answer it knows; planning every iteration
    for every intercepted request must give the very same run. On this trace min-waste
    swaps out, prefetches, evicts under pressure and discards swapped requests to make
    CPU room, with both CPU sizes, and with shared system prompts."""
    profile = SMALL.with_cost(cpu_capacity_tokens=cpu_tokens)
    trace = small_trace(5, num_requests=30, shared_prefix_tokens=shared_prefix_tokens)
    fast = simulate(trace, profile, policy)
    every = simulate(trace, profile, policy, SimConfig(plan_every_iteration=True))
    assert fast.records == every.records
    assert fast.counters == every.counters
    assert fast.stats["decisions"] == every.stats["decisions"]


def test_memory_is_never_over_committed_even_with_a_huge_batch():
    """The invariant checks run every iteration (blocks held == blocks allocated, within
    capacity); a big token budget admits many requests at once."""
    roomy = dataclasses.replace(SMALL, max_num_seqs=64, max_num_batched_tokens=4096)
    for policy in ("vllm", "preserve", "min-waste"):
        result = simulate(small_trace(2, rate=20.0), roomy, policy,
                          SimConfig(check_invariants=True))
        assert all(record.completed for record in result.records)


def test_shared_prompts_are_shared():
    """Two 200-token system prompts, each shared by 20 of the 40 requests, with memory to
    spare: preserve forwards 2 x 200 more tokens than without them, plus 8 for each of
    the 38 other requests (200 tokens are 12 full blocks and 8 tokens, and only full
    blocks are shared). The swap policy copies only what an agent alone holds."""
    roomy = SMALL.with_cost(device_capacity_tokens=400_000)
    plain, shared = small_trace(0), small_trace(0, shared_prefix_tokens=200)
    assert (sum(r.prompt_tokens for r in shared.requests)
            - sum(r.prompt_tokens for r in plain.requests)) == 40 * 200
    runs = {trace: simulate(trace, roomy, "preserve").counters for trace in (plain, shared)}
    assert runs[shared].forwarded_tokens - runs[plain].forwarded_tokens == 2 * 200 + 38 * 8
    assert runs[shared].recomputed_tokens == runs[plain].recomputed_tokens == 0
    swapped = {trace: simulate(trace, roomy, "swap").counters.swapped_out_bytes
               for trace in (plain, shared)}
    assert 0 < swapped[shared] < swapped[plain]


@pytest.mark.parametrize("policy", POLICIES)
def test_the_agent_workload_runs_to_the_end(policy):
    """Tens of turns on shared system prompts, scaled to the small profile."""
    trace = generate_trace("agent", 20, 2.0, 0, length_scale=0.02, time_scale=0.05,
                           max_context_tokens=1000)
    result = simulate(trace, SMALL, policy, SimConfig(check_invariants=True))
    assert all(record.completed for record in result.records)
    assert result.stats["device_blocks_in_use_at_end"] == 0
    assert result.stats["cpu_blocks_in_use_at_end"] == 0
