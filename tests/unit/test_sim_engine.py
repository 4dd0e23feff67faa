"""Tiny simulated runs worked out by hand.

Profile TINY: blocks of 4 tokens, 16 blocks (64 tokens) on the device and 16 on CPU;
forward(x) = 10 ms + 1 ms per token beyond 4 tokens; swap 0.1 ms per token; at most 16
tokens and 4 sequences per iteration.

ONE request: a 9-token prompt, generates 3 tokens, calls a tool for 1 s that returns 2
tokens, then generates 2 more. Before the tool call, every policy runs the same:
  iteration 0: prefill 9 tokens, forward(9) = 15 ms -> t = 0.015, token 1 sampled
  iteration 1: decode, 10 ms -> t = 0.025, token 2
  iteration 2: decode, 10 ms -> t = 0.035, token 3: pause. 12 tokens, 11 with KV, held in
               3 blocks (2 full, 1 partial). The tool returns at t = 1.035: 14 tokens.
After it (resume at 1.035), by what survives:
  all 11 tokens' KV (preserve; swap, loaded back): prefill 3 (forward 10 ms) -> 1.045,
      decode -> 1.055. Normalized latency (1.055 - 0 - 1.0) / 5 tokens = 11 ms/token.
  the 2 full blocks in the prefix cache (stock vLLM; discard with prefix caching):
      prefill 6, recomputing 3 tokens (forward 12 ms) -> 1.047, decode -> 1.057.
  nothing (discard without prefix caching): prefill 14, recomputing 11 (forward 20 ms)
      -> 1.055, decode -> 1.065.
"""

import dataclasses

import pytest

from infercept.bench.metrics import compute_run_metrics
from infercept.bench.workload import Request, Segment, Trace
from infercept.policy import CostModel
from infercept.sim.engine import Engine
from infercept.sim.profiles import HardwareProfile
from infercept.sim.runner import SimConfig, simulate

KV_BYTES = 100
TINY = HardwareProfile(
    "tiny", CostModel(fwd_base_s=0.010, fwd_per_token_s=0.001, saturation_tokens=4,
                      swap_s_per_token=0.0001, kv_bytes_per_token=KV_BYTES, block_size_tokens=4,
                      device_capacity_tokens=64, cpu_capacity_tokens=64),
    max_num_seqs=4, max_num_batched_tokens=16, slo_p90_s_per_token=0.1)


def trace(*requests: Request) -> Trace:
    return Trace("hand", 0, 1.0, 1.0, 1.0, tuple(requests))


ONE = trace(Request("r0", "qa", 0.0, (Segment(9, 3, tool_s=1.0, tool_return_tokens=2),
                                      Segment(0, 2))))


def run(policy: str, prefix_caching: bool = True, the_trace: Trace = ONE):
    return simulate(the_trace, TINY, policy,
                    SimConfig(prefix_caching=prefix_caching, check_invariants=True))


@pytest.mark.parametrize("policy, prefix_caching, end_s, recomputed, iterations", [
    ("preserve", True, 1.055, 0, 5),
    ("unbounded", True, 1.055, 0, 5),
    ("min-waste", True, 1.055, 0, 5),  # nothing learned yet: remaining 0 s, preserve
    ("ttl", True, 1.055, 0, 5),  # no time-to-live known yet: preserve
    ("swap", False, 1.055, 0, 6),  # + the swap-out step while idle (1.1 ms)
    ("vllm", True, 1.057, 3, 5),
    ("discard", True, 1.057, 3, 5),
    ("vllm", False, 1.065, 11, 5),
    ("discard", False, 1.065, 11, 5),
])
def test_one_interception(policy, prefix_caching, end_s, recomputed, iterations):
    result = run(policy, prefix_caching)
    (record,) = result.records
    assert record.completed
    assert record.end_s == pytest.approx(end_s)
    assert result.counters.recomputed_tokens == recomputed
    assert result.counters.forwarded_tokens == 9 + 2 + (14 - 11 + recomputed) + 1
    assert result.stats["iterations"] == iterations
    metrics = compute_run_metrics(result.records, result.counters)
    assert metrics.normalized_latency_mean_s_per_token == pytest.approx((end_s - 1.0) / 5)


def test_preserve_holds_the_blocks_during_the_tool_call():
    result = run("preserve")
    # 11 tokens idle from the pause (0.035) to the resume (1.035), then none.
    assert result.counters.idle_kv_events == ((0.035, 11), (1.035, 0))
    metrics = compute_run_metrics(result.records, result.counters)
    assert metrics.idle_kv_token_s == pytest.approx(11.0)
    assert metrics.memory_waste_fraction == pytest.approx(11.0 / (64 * 1.055))


def test_discard_frees_at_the_pause_and_recomputes_exactly_the_context():
    result = run("discard", prefix_caching=False)
    assert result.stats["decisions"] == {"discard": 1}
    assert result.counters.idle_kv_events == ((0.035, 0),)  # freed at the first plan
    assert result.counters.recomputed_tokens == 11
    # forward time of the resume iteration (20 ms) is all recompute but 3 of 14 tokens.
    assert result.counters.recompute_forward_s == pytest.approx(0.020 * 11 / 14)


def test_swap_moves_the_kv_out_and_back():
    result = run("swap", prefix_caching=False)
    assert result.stats["decisions"] == {"swap_out": 1}
    assert result.counters.swapped_out_bytes == 11 * KV_BYTES
    assert result.counters.swapped_in_bytes == 11 * KV_BYTES
    # The swap-out runs in an otherwise idle step: 1.1 ms unhidden; the swap-in hides
    # under the 10 ms resume iteration.
    assert result.stats["swap_stall_s"] == pytest.approx(0.0011)


def test_swap_loads_only_what_the_prefix_cache_lost():
    result = run("swap", prefix_caching=True)
    assert result.counters.swapped_out_bytes == 11 * KV_BYTES
    assert result.counters.swapped_in_bytes == 3 * KV_BYTES  # 2 full blocks were cached
    assert result.records[0].end_s == pytest.approx(1.055)


def test_preemption_recomputes_what_the_prefix_cache_lost():
    """Two requests of a 7-token prompt that generate 6 tokens each, 16 tokens of KV.
    it 0: both prefill (14 tokens, 20 ms) -> 0.020, 2 blocks each, none free.
    it 1: both decode position 7 -> 0.030.
    it 2: both cross into a new block; A's allocation fails, the last admitted (B, 8
          tokens computed) is preempted: 2 full blocks cached, and A's new block evicts
          one of them -> 0.040.
    it 3-5: A decodes alone (B needs 3 blocks with a 1-block hit; 1 free) -> A ends at 0.070
          with 3 blocks, all cached.
    it 6: B hits 1 block (4 tokens), prefills 5 (positions 4-8, recomputing 4-7): 11 ms
          -> 0.081; it 7-9: decodes its last 3 tokens -> 0.111.
    """
    requests = tuple(Request(name, "qa", 0.0, (Segment(7, 6),)) for name in ("a", "b"))
    tiny = TINY.with_cost(device_capacity_tokens=16)
    result = simulate(trace(*requests), tiny, "vllm", SimConfig(check_invariants=True))
    a, b = result.records
    assert (a.end_s, b.end_s) == (pytest.approx(0.070), pytest.approx(0.111))
    assert result.stats["preemptions"] == 1
    assert result.counters.recomputed_tokens == 4
    assert result.stats["iterations"] == 10


@pytest.mark.parametrize("policy, end_a_s, end_c_s", [("discard", 0.071, 0.085),
                                                      ("vllm", 0.085, 0.063)])
def test_a_resumed_request_keeps_its_first_arrival(policy, end_a_s, end_c_s):
    """One sequence at a time. A runs 0-0.035, then calls a 10 ms tool; B (arrived 0.001)
    runs 0.035-0.049 (8-token prefill, 14 ms). At 0.049 A (back at 0.045) and C (arrived
    0.002) wait. InferCept's A keeps its first arrival (0.0) and goes first: prefill 6
    (2 blocks cached) 12 ms -> 0.061, decode -> 0.071; then C -> 0.085. Stock vLLM's A is
    a new request of 0.045, behind C: C -> 0.063, A -> 0.075 -> 0.085."""
    one_seq = HardwareProfile("one-seq", TINY.cost, max_num_seqs=1, max_num_batched_tokens=16,
                              slo_p90_s_per_token=0.1)
    a = Request("a", "qa", 0.0, (Segment(9, 3, tool_s=0.010, tool_return_tokens=2),
                                 Segment(0, 2)))
    b = Request("b", "qa", 0.001, (Segment(8, 1),))
    c = Request("c", "qa", 0.002, (Segment(8, 1),))
    result = simulate(trace(a, b, c), one_seq, policy, SimConfig(check_invariants=True))
    record_a, record_b, record_c = result.records
    assert record_b.end_s == pytest.approx(0.049)
    assert record_a.end_s == pytest.approx(end_a_s)
    assert record_c.end_s == pytest.approx(end_c_s)


def test_the_engine_refuses_an_unknown_policy():
    with pytest.raises(ValueError, match="unknown policy"):
        Engine(TINY, "keep-everything")


def test_attention_reads_add_time_per_context_token():
    """With 1 ms per context token read: iteration 0 reads 9 tokens' KV (15 + 9 ms), 1 and 2
    read 10 and 11 (10 + 10, 10 + 11 ms): the pause comes at 0.065 instead of 0.035."""
    slow = dataclasses.replace(TINY, attention_s_per_kv_token=0.001)
    result = simulate(ONE, slow, "preserve", SimConfig(check_invariants=True))
    assert result.counters.idle_kv_events[0] == (pytest.approx(0.065), 11)
    with pytest.raises(ValueError, match="no KV read time"):
        TINY.with_attention()
