"""Shared prefixes in the simulator, worked out by hand on the TINY profile
(tests/unit/test_sim_engine.py: blocks of 4 tokens, 16 on the device and 16 on CPU, 16
tokens and 4 sequences per iteration).

Agents "a" and "b" arrive together; their 11-token prompts start with the same 8-token
system prompt (2 blocks). Each generates 3 tokens, calls a tool for 1 s that returns 2
tokens, then generates 2 more.
  iteration 0: "a" computes its whole prompt, the shared prefix's 2 blocks included; "b"
               finds them (a prefix-cache hit on a block another request holds) and
               computes only its own 3 tokens: 14 tokens forwarded, not 22.
  iterations 1-2: both decode; they pause with 13 tokens of KV in 4 blocks each, the
               first 2 shared.
"""

import dataclasses

import pytest
from test_sim_engine import KV_BYTES, TINY, trace

from infercept.bench.workload import Request, Segment
from infercept.sim.runner import SimConfig, simulate


def agent(request_id: str, arrival_s: float = 0.0, prefix: str | None = "sys") -> Request:
    return Request(request_id, "qa", arrival_s,
                   (Segment(11, 3, tool_s=1.0, tool_return_tokens=2), Segment(0, 2)),
                   shared_prefix_key=prefix, shared_prefix_tokens=8 if prefix else 0)


def run(policy: str, *requests: Request, prefix_caching: bool = True, **config):
    return simulate(trace(*requests), TINY, policy,
                    SimConfig(prefix_caching=prefix_caching, check_invariants=True, **config))


def test_a_shared_prefix_is_computed_once():
    shared = run("preserve", agent("a"), agent("b"))
    alone = run("preserve", agent("a", prefix=None), agent("b", prefix=None))
    assert all(r.completed for r in shared.records)
    # Only the first prompt computes the system prompt; the resumes keep their KV.
    assert alone.counters.forwarded_tokens - shared.counters.forwarded_tokens == 8
    # Without prefix caching nothing is shared.
    uncached = run("preserve", agent("a"), agent("b"), prefix_caching=False)
    assert uncached.counters.forwarded_tokens == alone.counters.forwarded_tokens


def test_a_swap_out_leaves_the_shared_prefix_on_the_device():
    """Both agents are swapped out in the same plan, each with the other still holding
    the system prompt: each copies its own 5 tokens (2 blocks), not 13. The prompt's
    blocks then stay cached; at the resume each finds them and its own full block in
    the prefix cache and loads only its partly filled block's 1 token."""
    result = run("swap", agent("a"), agent("b"))
    assert all(r.completed for r in result.records)
    assert result.stats["decisions"] == {"swap_out": 2}
    assert result.counters.swapped_out_bytes == 2 * 5 * KV_BYTES
    assert result.counters.swapped_in_bytes == 2 * 1 * KV_BYTES
    assert result.counters.recomputed_tokens == 0


def test_a_copy_whose_shared_prefix_was_evicted_is_recomputed():
    """While both agents are swapped out, a 56-token prompt ("c") takes 14 of the 16
    blocks and a 15th as it decodes: the free queue hands out the agents' cached own
    blocks and then the system prompt's last block. "a" resumes first: the prefix cache has 1 of the 2 prompt
    blocks, its copy (from block 2 on) cannot be loaded onto that, so it recomputes
    from token 4 (9 tokens it had) and lets the copy go; computing the prompt again,
    it makes the whole prefix available to "b" in the same iteration, which loads its
    5 tokens from its copy."""
    big = Request("c", "qa", 0.5, (Segment(56, 2),))
    result = run("swap", agent("a"), agent("b"), big)
    assert all(r.completed for r in result.records)
    assert result.counters.swapped_out_bytes == 2 * 5 * KV_BYTES
    assert result.counters.recomputed_tokens == 9
    assert result.counters.swapped_in_bytes == 5 * KV_BYTES


def test_the_policy_counts_only_what_a_paused_agent_alone_holds():
    """Both agents paused and preserved: 2 + 2 + 2 blocks in use, and each one's memory
    as the policy sees it is its own 5 tokens. Once "b" is discarded, "a" alone holds
    the system prompt: its whole 13 tokens are its own."""
    from infercept.policy import Location
    from infercept.sim.engine import Engine
    from infercept.sim.state import Session

    engine = Engine(TINY, "preserve", check_invariants=True)
    for request in (agent("a"), agent("b")):
        engine.submit(Session(request), 0.0)
    while len(engine.intercepts) < 2:
        engine.step()
    a, b = engine.intercepts["a"], engine.intercepts["b"]
    assert engine.pool.num_used_blocks == 6
    assert [engine.own_kv_tokens(r) for r in (a, b)] == [5, 5]
    engine.discard(b)
    assert b.location is Location.NONE and engine.pool.num_used_blocks == 4
    assert engine.own_kv_tokens(a) == 13
    engine.check()


def test_a_prompt_is_admitted_only_when_it_fits_whole():
    """vLLM 0.32 admits a waiting prompt only if all its blocks fit
    (`scheduler_reserve_full_isl`). With both agents paused and preserved (6 of 16
    blocks), a 48-token prompt (12 blocks) arrives: the policy counts all 12, not its
    first 16-token chunk's 4: 8 tokens short. It evicts the later arrival first ("b"),
    whose own tokens (5: the policy counts tokens, not the 2 blocks they fill) fall
    short, then "a". The prompt then runs without any preemption."""
    big = Request("c", "qa", 0.2, (Segment(48, 2),))
    result = run("preserve", agent("a"), agent("b"), big)
    assert all(r.completed for r in result.records)
    assert result.stats["decisions"] == {"swap_out": 2}
    assert result.stats["preemptions"] == 0
