"""Fails loudly when the vLLM internals InferCept relies on change.

Everything here is touched only through `infercept.adapter`; these checks pin
the shapes of what it touches in vLLM 0.32.0.
"""

from __future__ import annotations

import inspect

import pytest
from kv_accounting import scheduler_of

import infercept
from infercept.adapter import blocks
from infercept.adapter.version import UnsupportedVllmVersion, check_vllm_version, installed_vllm_version


def test_pinned_vllm_version():
    assert installed_vllm_version() == infercept.VLLM_VERSION
    with pytest.raises(UnsupportedVllmVersion, match="pinned to vLLM 0.32.0"):
        check_vllm_version("0.33.0")


def test_scheduler_hooks_exist_with_the_signatures_we_override():
    from vllm.v1.core.sched.scheduler import Scheduler

    expected = {
        "add_request": ["self", "request"],
        "schedule": ["self", "throttle_prefills"],
        "finish_requests": ["self", "request_ids", "finished_status"],
        "_update_request_with_output": ["self", "request", "new_token_ids", "is_stale"],
        "_handle_stopped_request": ["self", "request"],
        "_enqueue_waiting_request": ["self", "request"],
        "_holds_kv_blocks": ["request"],
        "has_requests": ["self"],
        "has_finished_requests": ["self"],
        "get_request_counts": ["self"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(Scheduler, name)).parameters) == params, name


def test_block_transfer_moves_all_per_request_bookkeeping(intercept_llm):
    """`blocks.transfer` re-keys the KV manager's per-request state without freeing."""
    from test_abort_and_triggers import pause_one

    llm = intercept_llm("preserve")
    engine, session = pause_one(llm)
    manager = scheduler_of(llm).kv_cache_manager
    [single] = manager.coordinator.single_type_managers
    assert isinstance(single.req_to_blocks, dict) and isinstance(single.num_cached_block, dict)
    paused_id = session.engine_request_id
    ids = blocks.block_ids(manager, paused_id)
    free = manager.block_pool.get_num_free_blocks()
    assert blocks.transfer(manager, paused_id, "probe") == len(ids) > 0
    assert blocks.block_ids(manager, "probe") == ids
    assert paused_id not in single.req_to_blocks and paused_id not in single.num_cached_block
    assert manager.block_pool.get_num_free_blocks() == free
    blocks.transfer(manager, "probe", paused_id)
    engine.abort(session)
