"""Interception inside the engine: every policy is token-exact against stock vLLM.

The oracle: after any number of interceptions, each segment of a session is
what stock vLLM generates for a fresh request whose prompt is the full token
sequence so far. After every test all device blocks and CPU swap blocks are
free (the `intercept_llm` fixture checks).
"""

from __future__ import annotations

import copy

import pytest
from scripted import Call, Script, check_equivalent, random_scripts, run_scripts

POLICIES = ["vllm", "preserve", "swap", "discard", "min-waste", "ttl"]
# The tiny model: 2 layers x (K, V) x 2 KV heads x head size 32 x 4 bytes.
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 32 * 4
BLOCK_BYTES = 32 * KV_BYTES_PER_TOKEN


def total_generated(sessions) -> list[int]:
    return [s.num_generated for s in sessions]


def stats_of(llm):
    return copy.deepcopy(llm.llm_engine.engine_core.engine_core.scheduler.policy_driver.stats)


@pytest.mark.parametrize("policy", POLICIES)
def test_single_request_several_interceptions(intercept_llm, stock, policy):
    llm = intercept_llm(policy)
    before = stats_of(llm)
    script = Script(
        prompt=list(range(10, 90)),
        calls=[Call(5, [11, 12, 13], 2), Call(9, [40] * 70, 0), Call(3, [7], 5), Call(12, [99, 98], 1)],
        max_tokens=48,
    )
    sessions = run_scripts(llm, [script])
    assert [len(seg) for seg in sessions[0].segments] == [5, 9, 3, 12, 19]
    assert check_equivalent(stock, sessions) == 48
    after = stats_of(llm)
    assert after.interceptions - before.interceptions == (0 if policy == "vllm" else 4)
    recomputed = after.recomputed_tokens - before.recomputed_tokens
    if policy in ("preserve", "swap"):
        assert recomputed == 0  # every resume continued from its kept KV
    if policy in ("vllm", "discard"):
        assert recomputed > 0  # partial blocks at least are recomputed


@pytest.mark.parametrize("policy", POLICIES)
def test_many_concurrent_requests(intercept_llm, stock, policy):
    llm = intercept_llm(policy)
    scripts = random_scripts(36, seed=1)
    sessions = run_scripts(llm, scripts)
    assert total_generated(sessions) == [s.max_tokens for s in scripts]
    check_equivalent(stock, sessions)


@pytest.mark.parametrize("policy", POLICIES)
def test_memory_pressure(intercept_llm, stock, policy):
    """A cache far smaller than the live contexts: paused requests must make room."""
    # 48 blocks of 32 tokens, and 20 sessions of 150-400 tokens each whose
    # tools take several steps, so many are paused at once.
    llm = intercept_llm(policy, kv_cache_bytes=48 * BLOCK_BYTES, swap_space_bytes=16 * BLOCK_BYTES,
                        max_model_len=1024)
    scripts = random_scripts(20, seed=2, prompt_tokens=(120, 300), calls=(2, 3),
                             result_tokens=(5, 40), steps=(3, 12), max_tokens=40)
    before = stats_of(llm).decisions
    sessions = run_scripts(llm, scripts)
    assert total_generated(sessions) == [s.max_tokens for s in scripts]
    check_equivalent(stock, sessions)
    decisions = stats_of(llm).decisions - before
    if policy in ("preserve", "min-waste"):
        # Preserved requests were evicted to make room.
        assert decisions["swap_out"] + decisions["discard"] > 0, decisions
    if policy == "swap":
        # CPU swap space is a third of the cache: some had to be discarded instead.
        assert decisions["swap_out"] > 0 and decisions["discard"] > 0, decisions


@pytest.mark.parametrize("policy", ["preserve", "swap", "discard"])
def test_empty_tool_output(intercept_llm, stock, policy):
    llm = intercept_llm(policy)
    script = Script(list(range(30, 75)), [Call(6, [], 0), Call(4, [], 3)], max_tokens=20)
    sessions = run_scripts(llm, [script])
    assert check_equivalent(stock, sessions) == 20


@pytest.mark.parametrize("policy", ["preserve", "swap", "discard", "vllm"])
def test_resume_with_changed_max_tokens(intercept_llm, stock, policy):
    llm = intercept_llm(policy)
    script = Script(list(range(50, 120)), [Call(8, [3, 4, 5], 1)], max_tokens=20,
                    max_tokens_after={0: 30})
    sessions = run_scripts(llm, [script])
    # max_tokens counts the model's own tokens across all segments.
    assert [len(seg) for seg in sessions[0].segments] == [8, 22]
    check_equivalent(stock, sessions)


@pytest.mark.parametrize("policy", ["preserve", "swap", "discard"])
@pytest.mark.parametrize("keep", [70, 96, 101])  # inside a block, at a boundary, past the prompt
def test_resume_whose_prompt_diverges(intercept_llm, stock, policy, keep):
    """A resume may re-render the conversation: the common prefix is reused, the rest recomputed."""
    from test_abort_and_triggers import pause_one
    from vllm import SamplingParams

    from infercept.adapter.interception import InterceptSpec

    llm = intercept_llm(policy)
    engine, session = pause_one(llm, InterceptSpec(intercept_after=8), prompt=list(range(40, 140)))
    engine.step()  # the policy acts on the paused request
    prompt = session.token_ids[:keep] + [7, 8, 9, 10, 11]
    resumed = engine.start(prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                           InterceptSpec(resume=session.engine_request_id), session_id="diverged")
    while engine.has_unfinished():
        engine.step()
    assert resumed.output_token_ids == stock.generate([prompt], 20)[0]
    assert not llm.llm_engine.engine_core.engine_core.scheduler.intercepts
