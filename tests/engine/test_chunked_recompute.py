"""Chunked recompute schedules only recomputation in chunks, step by step.

min-waste feeds KV that a request had before (a discarded resume, a vLLM
preemption) in chunks that fill each step up to the profiled saturation point
together with the decodes; new prompts and resumes that recompute nothing are
scheduled as stock vLLM schedules them.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from kv_accounting import scheduler_of
from test_abort_and_triggers import pause_one
from vllm import SamplingParams

from infercept.adapter.interception import InterceptSpec
from infercept.policy import Action, Location

SATURATION_TOKENS = 64


@pytest.fixture
def recording(intercept_llm, monkeypatch):
    """min-waste with a 64-token saturation point; yields (llm, steps), where steps
    lists each step's {request id: scheduled tokens}."""
    llm = intercept_llm("min-waste")
    scheduler = scheduler_of(llm)
    driver = scheduler.policy_driver
    monkeypatch.setattr(driver, "cost", dataclasses.replace(driver.cost, saturation_tokens=SATURATION_TOKENS))
    steps: list[dict[str, int]] = []
    schedule = scheduler.schedule

    def recorded(*args, **kwargs):
        output = schedule(*args, **kwargs)
        steps.append(dict(output.num_scheduled_tokens))
        return output

    monkeypatch.setattr(scheduler, "schedule", recorded)
    yield llm, steps


def _run(engine, steps):
    while engine.has_unfinished():
        engine.step()
    return steps


def _tokens_of(steps, request_id):
    return [s[request_id] for s in steps if request_id in s]


def test_a_discarded_resume_recomputes_in_chunks_beside_a_new_prompt(recording):
    llm, steps = recording
    scheduler = scheduler_of(llm)
    engine, a = pause_one(llm, InterceptSpec(intercept_after=4), prompt=[10 + i % 300 for i in range(300)])
    paused = scheduler.intercepts[a.engine_request_id]
    scheduler.policy_driver._apply(paused, Action.DISCARD)
    assert paused.location is Location.NONE
    llm.reset_prefix_cache()  # nothing left to reuse: all 303 KV tokens recompute
    decoding = engine.start([7, 8, 9, 10, 11, 12, 13, 14, 15], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                            InterceptSpec())
    engine.step()  # the decoding request's prompt
    new = engine.start([20 + i for i in range(90)], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                       InterceptSpec())
    del steps[:]
    engine.resume(a, token_ids=[3, 4, 5])
    _run(engine, steps)
    # The new prompt (90 tokens) is scheduled whole, in the resume's first step.
    assert _tokens_of(steps, new.engine_request_id)[0] == 90
    total, mark, computed, chunks = 303 + 4, 303, 0, 0
    for step in steps:
        if a.engine_request_id not in step or computed >= total:
            continue
        others = {r: n for r, n in step.items() if r != a.engine_request_id}
        decodes = sum(n == 1 for n in others.values())
        longest_new_prefill = max((n for n in others.values() if n > 1), default=0)
        if computed < mark:  # recomputing: up to saturation with the decodes, never
            # below the longest prefill that recomputes nothing
            threshold = max(SATURATION_TOKENS - decodes, longest_new_prefill)
            assert step[a.engine_request_id] == min(threshold, total - computed), (step, computed)
            chunks += 1
        else:
            assert step[a.engine_request_id] == total - computed  # the rest, uncut
        computed += step[a.engine_request_id]
    assert computed == total and chunks >= 4  # 90 first (beside the new prompt), then ~62
    assert scheduler.policy_driver.stats.recomputed_tokens >= 303
    assert decoding.num_generated == 30 and new.num_generated == 2


def test_a_resume_that_recomputes_nothing_is_not_cut(recording, monkeypatch):
    llm, steps = recording
    driver = scheduler_of(llm).policy_driver
    monkeypatch.setattr(driver, "cost", dataclasses.replace(driver.cost, swap_s_per_token=math.inf))
    engine, a = pause_one(llm, InterceptSpec(intercept_after=4), prompt=[10 + i % 300 for i in range(100)])
    engine.step()  # min-waste preserves it: no memory pressure, no swapping
    assert scheduler_of(llm).intercepts[a.engine_request_id].location is Location.DEVICE
    decoding = engine.start([7, 8, 9, 10, 11, 12, 13, 14, 15], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                            InterceptSpec())
    engine.step()
    del steps[:]
    engine.resume(a, token_ids=[30 + i % 200 for i in range(200)])  # a 200-token tool result
    _run(engine, steps)
    assert _tokens_of(steps, a.engine_request_id)[0] == 200 + 1  # its last sampled token too
    assert decoding.num_generated == 30
