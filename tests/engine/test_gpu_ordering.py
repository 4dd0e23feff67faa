"""The GPU's orderings, exercised on CPU through the asynchronous-copy emulation.

Every InferCept engine of the suite runs with `emulate_async_copies`: a save reads
its device blocks only when it is reported done, a load lands only at its layer's
wait, and a block handed to another request while a save has yet to read it is
poisoned. These tests pin the protocol that makes that safe (a swapped-out request's
blocks return to vLLM only when every worker reports its save) and show that the
emulation catches the ordering that is wrong on a GPU (blocks freed when the save is
queued).
"""

from __future__ import annotations

import pytest
from conftest import EMULATE_LAG
from kv_accounting import drain, free_device_blocks, scheduler_of
from test_abort_and_triggers import pause_one
from test_interception import BLOCK_BYTES
from vllm import SamplingParams

from infercept.adapter.connector import InterceptConnector
from infercept.adapter.interception import InterceptSpec
from infercept.adapter.policy_driver import PolicyDriver
from infercept.policy import Location

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def worker_swapper(llm):
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group().worker.swapper


def test_connector_declares_piecewise_graphs_and_no_kv_delivery(intercept_llm):
    assert InterceptConnector.requires_piecewise_for_cudagraph({}) is True
    connector = scheduler_of(intercept_llm("swap")).connector
    assert connector.requires_kv_delivery is False
    assert scheduler_of(intercept_llm("swap")).requires_kv_delivery is False


def test_swapped_blocks_stay_allocated_until_every_worker_reports_the_save(intercept_llm, stock):
    llm = intercept_llm("swap")
    engine, session = pause_one(llm, InterceptSpec(intercept_after=6), prompt=list(range(40, 140)))
    scheduler = scheduler_of(llm)
    paused = scheduler.intercepts[session.engine_request_id]
    held = free_device_blocks(llm)
    engine.step()  # the policy swaps it out; its save is queued
    assert paused.location is Location.CPU and paused.saving
    steps = 0
    while paused.saving:  # the save still reads its blocks
        assert free_device_blocks(llm) == held
        engine.step()
        steps += 1
    assert steps == EMULATE_LAG - 1  # reported by the step that ran it
    assert free_device_blocks(llm) > held  # vLLM has them back
    assert scheduler.policy_driver.idle_device_tokens() == 0
    engine.resume(session, token_ids=[5, 6, 7])
    while engine.has_unfinished():
        engine.step()
    prompt = session.token_ids[: len(session.token_ids) - len(session.segments[-1])]
    assert session.segments[-1] == stock.generate([prompt], 40 - 6)[0]
    assert worker_swapper(llm).num_poisoned_blocks == 0


def test_resume_while_the_save_runs_takes_the_intact_device_blocks(intercept_llm, stock):
    llm = intercept_llm("swap")
    engine, session = pause_one(llm, InterceptSpec(intercept_after=6), prompt=list(range(40, 140)))
    engine.step()
    paused = scheduler_of(llm).intercepts[session.engine_request_id]
    assert paused.saving
    engine.resume(session, token_ids=[5, 6, 7])
    while engine.has_unfinished():
        engine.step()
    prompt = session.token_ids[: len(session.token_ids) - len(session.segments[-1])]
    assert session.segments[-1] == stock.generate([prompt], 40 - 6)[0]
    drain(llm)  # the abandoned save lands and frees its CPU blocks


def _contend(llm):
    """Pause A (swap), then admit B, which fits only in A's blocks; then resume A.

    Returns A's resumed segment, its prompt, and the blocks the emulation poisoned.
    """
    from infercept.entrypoints.sessions import SessionEngine

    engine, a = pause_one(llm, InterceptSpec(intercept_after=6), prompt=list(range(40, 130)))
    poisoned_before = worker_swapper(llm).num_poisoned_blocks
    b = SessionEngine.start(engine, [10 + i % 300 for i in range(270)], GREEDY.clone(), InterceptSpec())
    for _ in range(3 * EMULATE_LAG):
        engine.step()
    engine.resume(a, token_ids=[5, 6, 7])
    while engine.has_unfinished():
        engine.step()
    assert b.num_generated == 12
    prompt = a.token_ids[: len(a.token_ids) - len(a.segments[-1])]
    return a.segments[-1], prompt, worker_swapper(llm).num_poisoned_blocks - poisoned_before


@pytest.mark.parametrize("free_at_queue", [False, True], ids=["protocol", "early-free"])
def test_the_emulation_catches_blocks_freed_when_the_save_is_queued(
        intercept_llm, stock, monkeypatch, free_at_queue):
    """Mutation check: the ordering of the first version (free the device blocks when
    the save is queued) gives wrong tokens under the emulation; the protocol does not."""
    # 11 usable blocks: A holds 3, B needs 9.
    llm = intercept_llm("swap", kv_cache_bytes=12 * BLOCK_BYTES, max_model_len=352)
    monkeypatch.setattr(PolicyDriver, "free_blocks_at_queue", free_at_queue)
    segment, prompt, poisoned = _contend(llm)
    expected = stock.generate([prompt], 40 - 6)[0]
    if free_at_queue:
        assert poisoned > 0
        assert segment != expected
    else:
        assert poisoned == 0
        assert segment == expected
