"""Abort in every state frees everything; text triggers cut at the exact token."""

from __future__ import annotations

import pytest
from kv_accounting import drain, free_device_blocks, scheduler_of, total_device_blocks
from vllm import SamplingParams

from infercept.adapter.interception import InterceptSpec
from infercept.entrypoints.sessions import SessionEngine, SessionState
from infercept.policy import Location

PARAMS = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def pause_one(llm, spec=InterceptSpec(intercept_after=6), prompt=None):
    engine = SessionEngine(llm.llm_engine)
    session = engine.start(prompt or list(range(40, 140)), PARAMS.clone(), spec)
    for _ in range(100):
        engine.step()
        if session.state is SessionState.INTERCEPTED:
            return engine, session
    raise AssertionError("never intercepted")


@pytest.mark.parametrize(
    "policy, location",
    [("preserve", Location.DEVICE), ("swap", Location.CPU), ("discard", Location.NONE)],
)
def test_abort_paused_request_in_each_state(intercept_llm, policy, location):
    llm = intercept_llm(policy)
    engine, session = pause_one(llm)
    drain(llm)  # lets the policy act on the paused request
    paused = scheduler_of(llm).intercepts[session.engine_request_id]
    assert paused.location is location
    if location is Location.DEVICE:
        assert free_device_blocks(llm) < total_device_blocks(llm)
    engine.abort(session)
    assert session.state is SessionState.FINISHED
    # The fixture then checks that device blocks and CPU swap space are all free.


@pytest.mark.parametrize("policy", ["preserve", "swap", "discard"])
def test_abort_resumed_request_while_running(intercept_llm, policy):
    llm = intercept_llm(policy)
    engine, session = pause_one(llm)
    drain(llm)
    engine.resume(session, token_ids=[9, 8, 7])
    engine.step()
    assert session.state is SessionState.RUNNING
    engine.abort(session)


def test_abort_before_the_policy_acts(intercept_llm):
    llm = intercept_llm("swap")
    engine, session = pause_one(llm)
    engine.abort(session)


def test_resume_names_an_unknown_request_recomputes(intercept_llm, stock):
    """A resume whose paused request is gone (aborted, expired) is a fresh request."""
    llm = intercept_llm("preserve")
    engine, session = pause_one(llm)
    scheduler_of(llm).finish_requests(session.engine_request_id, _aborted())
    engine.resume(session, token_ids=[5, 6])
    while engine.has_unfinished():
        engine.step()
    want = stock.generate([session.token_ids[: len(session.token_ids) - len(session.segments[1])]],
                          [40 - 6])[0]
    assert session.segments[1] == want


def _aborted():
    from vllm.v1.request import RequestStatus

    return RequestStatus.FINISHED_ABORTED


def test_text_trigger_pauses_on_the_completing_token(intercept_llm, stock):
    """A trigger string pauses the request exactly at the token that completes it."""
    llm = intercept_llm("preserve")
    prompt = list(range(60, 160))
    reference = stock.generate([prompt], 30)[0]
    tokenizer = llm.get_tokenizer()
    # A trigger that spans the end of one token and the next, and that the
    # text before that next token does not contain.
    for cut in range(8, 30):
        before = tokenizer.decode(reference[: cut - 1], skip_special_tokens=False)
        upto = tokenizer.decode(reference[:cut], skip_special_tokens=False)
        trigger = upto[len(before) - 2:]
        if len(upto) > len(before) and "\ufffd" not in trigger and trigger not in before:
            break
    else:
        pytest.skip("no clean trigger in this model's output")
    engine, session = pause_one(llm, InterceptSpec(triggers=(trigger,)), prompt=prompt)
    assert session.segments[0] == reference[:cut]
    engine.resume(session, text="=42")
    while engine.has_unfinished():
        engine.step()
    assert session.appended[0] == tokenizer.encode("=42", add_special_tokens=False)
    assert session.num_generated == 40
    context = session.token_ids[: len(prompt) + cut + len(session.appended[0])]
    assert session.segments[1] == stock.generate([context], 40 - cut)[0]
