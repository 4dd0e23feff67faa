"""Faults on the engine side: swap space and device cache that run out, tools that hang.

Each test ends with every device block and CPU swap block free (the
`intercept_llm` fixture checks), and every token the model generated equals
stock vLLM's continuation of the same context.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
from kv_accounting import scheduler_of
from scripted import Call, Script, check_equivalent, random_scripts, run_scripts
from test_interception import BLOCK_BYTES
from test_llm import PARAMS, check_against_stock, markers, random_prompts  # noqa: F401 (fixture)
from test_state_machine import ENGINE

from infercept import Augmentation
from infercept.entrypoints.tools import ToolTimeoutError
from infercept.policy import Location

BLOCK_TOKENS = 32
DEVICE_BLOCKS = ENGINE["kv_cache_bytes"] // BLOCK_BYTES - 1  # one is vLLM's null block
CPU_BLOCKS = ENGINE["swap_space_bytes"] // BLOCK_BYTES


def _blocks(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


class PausedWatch:
    """`run_scripts`' on_step hook: what the paused requests held, step by step."""

    def __init__(self, llm):
        self.scheduler = scheduler_of(llm)
        self.max_paused_blocks = 0  # the most blocks the paused requests' contexts needed at once
        self.both_at_once = False  # some swapped while others were discarded for want of CPU space

    def __call__(self, engine, step) -> None:
        paused = list(self.scheduler.intercepts.values())
        self.max_paused_blocks = max(self.max_paused_blocks, sum(_blocks(p.num_kv_tokens) for p in paused))
        where = {p.location for p in paused}
        self.both_at_once |= {Location.CPU, Location.NONE} <= where


def test_swap_space_that_runs_out_falls_back_to_discard(intercept_llm, stock):
    """Under the swap policy, paused requests that no longer fit in CPU memory are discarded.

    The device cache holds them all: only the CPU swap space runs out. None
    is lost: every session generates all its tokens, equal to stock vLLM.
    """
    llm = intercept_llm("swap", **ENGINE)
    # Six sessions of 3-4 blocks each paused together for many steps: 12 CPU
    # blocks take three of them at most.
    scripts = [Script(list(range(20 + k, 120 + k)), [Call(4, [7, 8, 9], 30), Call(3, [5], 2)], 16)
               for k in range(6)]
    assert sum(_blocks(104) for _ in scripts) > CPU_BLOCKS
    assert sum(_blocks(108) for _ in scripts) <= DEVICE_BLOCKS
    stats = scheduler_of(llm).policy_driver.stats
    before = stats.decisions.copy()
    watch = PausedWatch(llm)
    sessions = run_scripts(llm, scripts, on_step=watch)
    decisions = stats.decisions - before
    assert decisions["swap_out"] >= 1 and decisions["discard"] >= 1, decisions
    assert watch.both_at_once
    assert [s.num_generated for s in sessions] == [16] * len(scripts)
    assert check_equivalent(stock, sessions) == 16 * len(scripts)


@pytest.mark.parametrize("policy", ["preserve", "swap", "min-waste"])
def test_device_cache_too_small_for_all_paused_requests(intercept_llm, stock, policy):
    """More paused context than the whole device cache: no deadlock, every request finishes."""
    llm = intercept_llm(policy, **ENGINE)
    # Tools take 15-40 steps, so most sessions are paused at the same time.
    scripts = random_scripts(12, seed=7, prompt_tokens=(120, 220), calls=(1, 2), result_tokens=(0, 20),
                             steps=(15, 40), max_tokens=24)
    watch = PausedWatch(llm)
    sessions = run_scripts(llm, scripts, max_steps=5000, on_step=watch)
    assert watch.max_paused_blocks > DEVICE_BLOCKS  # the scenario happened
    assert [s.num_generated for s in sessions] == [s.max_tokens for s in scripts]
    check_equivalent(stock, sessions)


# ---- tools that hang (infercept.LLM) -------------------------------------------------------


@pytest.fixture
def release():
    """An event that hung tools wait on; set at the end so no thread outlives the test.

    Tools wait on it for a minute at most: without a working timeout the
    tests fail slowly rather than hang.
    """
    event = threading.Event()
    yield event
    event.set()


# The timeout of a tool that sometimes hangs and otherwise returns at once. A call
# that returns at once must never time out however late this shared two-core
# machine runs its thread, so the bound is far above any scheduling delay; each
# hanging call waits it out, so it also sets how long the test runs.
SOMETIMES_HANGS_TIMEOUT_S = 5.0


@pytest.mark.parametrize("policy", ["preserve", "swap", "discard"])
def test_a_hanging_tool_times_out_and_the_request_goes_on(intercept_llm, stock, markers, release, policy):
    llm = intercept_llm(policy, **ENGINE)
    start, end = markers
    calls = []

    def sometimes_hangs(args: str) -> str:
        calls.append(args)
        if len(calls) % 3 == 1:
            release.wait(60)
        return f"<ok{len(calls)}>"

    aug = Augmentation("hangs", start, end, sometimes_hangs, timeout_s=SOMETIMES_HANGS_TIMEOUT_S,
                       on_error=lambda exc: f"[{type(exc).__name__}]")
    outputs = llm.generate([{"prompt_token_ids": p} for p in random_prompts(4, seed=21)], PARAMS, [aug],
                           use_tqdm=False)
    records = [r for o in outputs for r in o.interceptions if r.args is not None]
    timed_out = [r for r in records if r.error]
    assert timed_out and len(timed_out) < len(records)
    for record in timed_out:
        assert record.error.startswith(
            f"ToolTimeoutError: the tool did not return within {SOMETIMES_HANGS_TIMEOUT_S:g} s")
        assert record.result == "[ToolTimeoutError]" and record.result_tokens > 0
    check_against_stock(stock, outputs)


def test_a_hanging_tool_with_on_error_raise_aborts_everything(intercept_llm, markers, release):
    llm = intercept_llm("swap", **ENGINE)
    start, end = markers
    aug = Augmentation("hangs", start, end, lambda args: release.wait(60), timeout_s=0.2, on_error="raise")
    with pytest.raises(ToolTimeoutError):
        llm.generate([{"prompt_token_ids": p} for p in random_prompts(3, seed=22)], PARAMS, [aug],
                     use_tqdm=False)
    # The fixture then checks that no request and no block is left.


def test_a_hanging_async_tool_is_cancelled(intercept_llm, stock, markers):
    llm = intercept_llm("preserve", **ENGINE)
    start, end = markers
    cancelled = threading.Event()

    async def never_returns(args: str) -> str:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "unreachable"

    aug = Augmentation("never", start, end, never_returns, timeout_s=0.2)  # on_error "skip"
    outputs = llm.generate([{"prompt_token_ids": p} for p in random_prompts(2, seed=23)], PARAMS, [aug],
                           use_tqdm=False)
    records = [r for o in outputs for r in o.interceptions if r.args is not None]
    assert records and all(r.error.startswith("ToolTimeoutError") and r.result_tokens == 0 for r in records)
    assert cancelled.wait(120)  # at once, unless the machine is very slow: a bound, not a timing
    check_against_stock(stock, outputs)


def test_the_llms_intercept_timeout_bounds_tools_by_default(intercept_llm, stock, markers, release):
    llm = intercept_llm("preserve", **ENGINE)
    start, end = markers
    assert llm.intercept_config.intercept_timeout_s == 600.0  # the documented default
    aug = Augmentation("hangs", start, end, lambda args: release.wait(60))
    saved = llm.intercept_config
    llm.intercept_config = dataclasses.replace(saved, intercept_timeout_s=0.2)
    try:
        [output] = llm.generate([{"prompt_token_ids": random_prompts(1, seed=24)[0]}], PARAMS, [aug],
                                use_tqdm=False)
    finally:
        llm.intercept_config = saved
    records = [r for r in output.interceptions if r.args is not None]
    assert records and all(r.error == "ToolTimeoutError: the tool did not return within 0.2 s" for r in records)
    check_against_stock(stock, [output])


def test_augmentation_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s"):
        Augmentation("x", "<", ">", str, timeout_s=0)
