"""min-waste uses every action in the engine: preserve, swap out, prefetch, discard.

A scenario on a virtual clock (the scheduler's `clock`), so what the policy sees does
not depend on the machine's speed: three agents pause on a tool the client says takes
100 s, with CPU swap space for one of them. min-waste swaps one out and preserves the
others; just before the tool returns it prefetches the swapped one; then a long prompt
needs more memory than is free, and, with the swap space fitting one context, it swaps
one out and discards another. Every segment equals stock vLLM's, and the interception
records (returned with each request) show the four actions.
"""

from __future__ import annotations

import dataclasses

from kv_accounting import scheduler_of
from scripted import check_equivalent
from test_interception import BLOCK_BYTES
from vllm import SamplingParams

from infercept.adapter.interception import InterceptSpec
from infercept.entrypoints.sessions import SessionEngine, SessionState

TOOL_S = 100.0


class VirtualClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def _step_until(engine, done, max_steps=200):
    for _ in range(max_steps):
        if done():
            return
        engine.step()
    raise AssertionError("condition not reached")


def test_min_waste_preserves_swaps_prefetches_and_discards(intercept_llm, stock, monkeypatch):
    # 20 blocks of 32 tokens; swap space for one 3-block context.
    llm = intercept_llm("min-waste", kv_cache_bytes=20 * BLOCK_BYTES,
                        swap_space_bytes=4 * BLOCK_BYTES, max_model_len=512)
    scheduler = scheduler_of(llm)
    driver = scheduler.policy_driver
    clock = VirtualClock()
    monkeypatch.setattr(scheduler, "clock", clock)
    # 10 ms steps; one 128-token context's transfer hides under one.
    monkeypatch.setattr(driver, "cost", dataclasses.replace(
        driver.cost, fwd_base_s=0.01, fwd_per_token_s=1e-4, saturation_tokens=64,
        swap_s_per_token=0.01 / 128))
    engine = SessionEngine(llm.llm_engine)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    # The policy acts on engine steps: a request decodes in the background throughout.
    background = engine.start(list(range(5, 15)), SamplingParams(temperature=0.0, max_tokens=200,
                                                                 ignore_eos=True), InterceptSpec())
    spec = InterceptSpec(intercept_after=5, tool="build", expected_duration_s=TOOL_S)
    agents = [engine.start([10 + (7 * i + j) % 300 for j in range(90)], params.clone(), spec)
              for i in range(3)]
    _step_until(engine, lambda: all(a.state is SessionState.INTERCEPTED for a in agents))
    paused = [scheduler.intercepts[a.engine_request_id] for a in agents]
    _step_until(engine, lambda: any(p.location.value == "swapped" and not p.saving for p in paused))
    assert sorted(p.location.value for p in paused) == ["preserved", "preserved", "swapped"]

    clock.now_s += TOOL_S - 0.001  # the tool is about to return
    engine.step()
    assert [p.location.value for p in paused] == ["preserved"] * 3  # prefetched
    cpu = driver.swap.allocator
    _step_until(engine, lambda: cpu.num_free_blocks == cpu.num_blocks)  # its CPU copy is let go

    # A long prompt that does not fit beside the three paused contexts.
    long_prompt = engine.start([20 + j % 250 for j in range(400)], params.clone(), InterceptSpec())
    _step_until(engine, lambda: long_prompt.num_generated > 0)
    assert sorted(p.location.value for p in paused) == ["discarded", "preserved", "swapped"], [[(h["action"], h["reason"], h["at_s"]) for h in p.history] for p in paused]

    for i, agent in enumerate(agents):
        engine.resume(agent, token_ids=[40 + i, 41, 42])
    _step_until(engine, lambda: not engine.has_unfinished(), max_steps=2000)
    records = [r for a in agents
               for r in a.last_output.kv_transfer_params["infercept"]["interceptions"]]
    actions = {d["action"] for r in records for d in r["decisions"]}
    assert actions == {"preserve", "swap_out", "swap_in", "discard"}, actions
    assert check_equivalent(stock, [*agents, long_prompt, background]) == 4 * 16 + 200
