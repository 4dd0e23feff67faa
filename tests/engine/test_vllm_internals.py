"""Fails loudly, in one place, when the vLLM internals InferCept relies on change.

InferCept overrides and calls parts of vLLM 0.32.0 that are not its public API:
scheduler methods, `Request` fields, the KV cache manager's per-request
bookkeeping, KV connector hooks, the engine core's utility calls, and a few
private attributes the server and `infercept.LLM` reach. Each is listed below
with the InferCept code that depends on it; a vLLM upgrade that changes one
fails here, naming what to revisit, instead of silently misbehaving (an
assignment to a `Request` field that no longer exists does nothing; an
override whose name or parameters changed is never called).

Almost every check reads vLLM's classes and source only, or builds vLLM objects
directly (a `Request`, a `KVCacheManager`): no engine. The last tests use a
live engine for what only a running scheduler shows.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import inspect
import textwrap
import typing

import pytest
from kv_accounting import scheduler_of

import infercept
from infercept.adapter import blocks
from infercept.adapter.version import UnsupportedVllmVersion, check_vllm_version, installed_vllm_version

# ---- what InferCept relies on: the one list to keep in sync ------------------------------

# Fields of vLLM's `Request` that InferCept assigns. `InterceptSchedulerMixin._pause`
# (infercept/adapter/scheduler.py) rewinds a stopped request into a paused one with
# them, as vLLM's own `Scheduler._handle_stopped_request` does for a resumable
# request; `_resume`, `_update_request_with_output` and the policy driver
# (infercept/adapter/policy_driver.py) assign some too.
REQUEST_FIELDS_ASSIGNED = (
    "num_computed_tokens",
    "num_output_placeholders",
    "spec_token_ids",
    "drop_stale_output",
    "num_stale_output_tokens",
    "num_in_flight_tokens",
    "status",
    "arrival_time",
    "stop_reason",
    "last_sched_seq",  # _resume: vLLM's in-flight fence follows the blocks
)

# Fields of `Request` that InferCept only reads (scheduler, policy driver, interception).
REQUEST_FIELDS_READ = (
    "request_id",
    "prompt_token_ids",
    "all_token_ids",
    "output_token_ids",
    "num_prompt_tokens",
    "num_tokens",
    "num_output_tokens",
    "sampling_params",
    "block_hashes",  # ResumeIndex: paused prompts filed under vLLM's chained block hashes
)

# `RequestStatus` members InferCept uses (scheduler: pause, trigger stop, abort).
REQUEST_STATUSES = ("WAITING_FOR_STREAMING_REQ", "FINISHED_STOPPED", "FINISHED_ABORTED")

# vLLM `Scheduler` methods InferCept overrides or calls: parameter names, and the
# InferCept code to revisit if they change.
SCHEDULER_METHODS = {
    "add_request": (["self", "request"], "InterceptSchedulerMixin.add_request"),
    "schedule": (["self", "throttle_prefills"], "InterceptSchedulerMixin.schedule"),
    "finish_requests": (["self", "request_ids", "finished_status"],
                        "InterceptSchedulerMixin.finish_requests"),
    "_update_request_with_output": (["self", "request", "new_token_ids", "is_stale"],
                                    "InterceptSchedulerMixin._update_request_with_output"),
    "_handle_stopped_request": (["self", "request"], "InterceptSchedulerMixin._handle_stopped_request"),
    "_preempt_request": (["self", "request", "timestamp", "drop_stale_output"],
                         "InterceptSchedulerMixin._preempt_request"),
    "_update_after_schedule": (["self", "scheduler_output"], "InterceptSchedulerMixin._update_after_schedule"),
    "_free_request": (["self", "request", "delay_free_blocks"], "InterceptSchedulerMixin._free_request"),
    "_free_blocks": (["self", "request"], "InterceptSchedulerMixin._free_request (vLLM frees through it)"),
    "_connector_finished": (["self", "request"], "InterceptConnector.request_finished (vLLM calls it here)"),
    "_update_from_kv_xfer_finished": (["self", "kv_connector_output"],
                                      "InterceptSchedulerMixin._update_from_kv_xfer_finished "
                                      "(finished saves free paused requests' blocks)"),
    "_free_request_blocks": (["self", "request"], "PolicyDriver._free_device (swap out, discard)"),
    "_request_blocks_can_be_freed": (["self", "request"],
                                     "InterceptSchedulerMixin._free_blocks_after_inflight"),
    "_enqueue_waiting_request": (["self", "request"], "InterceptSchedulerMixin._enqueue_by_arrival"),
    "_holds_kv_blocks": (["request"], "InterceptSchedulerMixin._enqueue_by_arrival"),
    "has_requests": (["self"], "InterceptSchedulerMixin.has_requests"),
    "has_finished_requests": (["self"], "InterceptSchedulerMixin.has_finished_requests"),
    "get_request_counts": (["self"], "InterceptSchedulerMixin.has_finished_requests"),
}

# Tuples vLLM returns that InferCept unpacks: method -> number of elements.
SCHEDULER_RETURN_TUPLES = {
    "_free_request": 2,  # (kv_transfer_params, ec_transfer_params): InterceptSchedulerMixin._free_request
    "_connector_finished": 2,  # (delay_free, kv_transfer_params)
    "_update_request_with_output": 2,  # (new_token_ids, stopped)
}

# Attributes that vLLM's `Scheduler.__init__` sets and InferCept reads or changes.
SCHEDULER_ATTRIBUTES = {
    "_inflight_prefills": "InterceptSchedulerMixin._pause (discards the paused request)",
    "kv_holding_waiting": "InterceptSchedulerMixin._enqueue_by_arrival, PolicyDriver._batch_state",
    "waiting": "InterceptSchedulerMixin._enqueue_by_arrival, PolicyDriver._batch_state",
    "running": "PolicyDriver (batch state, allocate_slots)",
    "requests": "InterceptSchedulerMixin._resume (re-keys the paused request)",
    "finished_req_ids": "InterceptSchedulerMixin._pause, has_finished_requests",
    "kv_cache_manager": "infercept/adapter/blocks.py, PolicyDriver",
    "connector": "InterceptSchedulerMixin.__init__ (the swap planner), _resume",
    "block_size": "InterceptSchedulerMixin._resume, PolicyDriver",
    "max_num_scheduled_tokens": "PolicyDriver._batch_state",
    # vLLM admits a prompt only if it fits whole: the policy counts it so (and the
    # simulator admits so).
    "scheduler_reserve_full_isl": "PolicyDriver._batch_state, infercept/sim/engine.py _admit",
    "requires_kv_delivery": "InterceptConnector.requires_kv_delivery (read once, at start-up)",
    "deferred_frees": "InterceptSchedulerMixin._free_blocks_after_inflight",
    "sched_step_seq": "InterceptSchedulerMixin._free_blocks_after_inflight",
    "scheduler_config": "InterceptSchedulerMixin.schedule (long_prefill_token_threshold)",
    "vllm_config": "InterceptSchedulerMixin.__init__",
    "kv_cache_config": "PolicyDriver (cost model)",
    "hash_block_size": "InterceptSchedulerMixin.__init__ (ResumeIndex: requests' block_hashes granularity)",
    "cache_config": "InterceptSchedulerMixin.__init__ (ResumeIndex: prefix caching on, its hash function)",
}

# The KV cache manager's calls InferCept makes: parameter names that must be there.
KV_CACHE_MANAGER_CALLS = {
    "allocate_slots": (["request", "num_new_tokens", "delay_cache_blocks", "has_scheduled_reqs"],
                       "PolicyDriver._prefetch"),
    "get_block_ids": (["request_id"], "infercept/adapter/blocks.py block_ids"),
    "free": (["request"], "PolicyDriver._apply"),
}

# Every dict of vLLM's full-attention single-type KV manager. All are keyed by
# request id, and `blocks.transfer` re-keys every one of them from the paused
# request to the resuming one: a dict added here must be re-keyed too (or, if not
# keyed by request id, left alone by `_per_request_dicts`).
KV_MANAGER_REQUEST_DICTS = frozenset({"req_to_blocks", "num_cached_block", "_partial_hit_reqs"})

# KV connector hooks (`KVConnectorBase_V1`, vllm/distributed/kv_transfer/kv_connector/v1/base.py)
# that InterceptConnector (infercept/adapter/connector.py) implements or relies on the
# default of: kind and parameter names.
CONNECTOR_HOOKS = {
    # worker side
    "register_kv_caches": ("method", ["self", "kv_caches"]),
    "handle_preemptions": ("method", ["self", "kv_connector_metadata"]),
    "start_load_kv": ("method", ["self", "forward_context", "kwargs"]),
    "wait_for_layer_load": ("method", ["self", "layer_name"]),
    "save_kv_layer": ("method", ["self", "layer_name", "kv_layer", "attn_metadata", "kwargs"]),
    "wait_for_save": ("method", ["self"]),
    "get_finished": ("method", ["self", "finished_req_ids"]),
    # scheduler side
    "get_num_new_matched_tokens": ("method", ["self", "request", "num_computed_tokens"]),
    "update_state_after_alloc": ("method", ["self", "request", "blocks", "num_external_tokens"]),
    "build_connector_meta": ("method", ["self", "scheduler_output"]),
    "request_finished": ("method", ["self", "request", "block_ids"]),
    "get_loaded_kv_cache_group_ids": ("method", ["self", "request"]),
    "on_new_request": ("method", ["self", "request"]),  # InterceptSchedulerMixin._resume calls it
    # configuration
    "requires_piecewise_for_cudagraph": ("classmethod", ["cls", "extra_config"]),
    "requires_kv_delivery": ("property", []),
    "has_pending_block_frees": ("method", ["self"]),  # vLLM asks before it preempts
    # used inside InterceptConnector.start_load_kv
    "_get_connector_metadata": ("method", ["self"]),
}


def params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def assigned_self_attributes(function) -> set[str]:
    """Names `self.<name>` is assigned in a function's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name) and node.value.id == "self"
    }


def new_request(request_id: str = "probe", num_tokens: int = 40):
    """A `Request` built with vLLM's own constructor, as the engine core builds one."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(request_id, list(range(num_tokens)), SamplingParams(max_tokens=4), None)


def new_kv_cache_manager(num_blocks: int = 10, block_size: int = 16):
    """vLLM's KV cache manager for one full-attention group, no engine."""
    import torch
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=8, dtype=torch.float32)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    return KVCacheManager(config, max_model_len=num_blocks * block_size, scheduler_block_size=block_size,
                          hash_block_size=block_size, enable_caching=True)


# ---- version -----------------------------------------------------------------------------


def test_pinned_vllm_version():
    assert installed_vllm_version() == infercept.VLLM_VERSION
    with pytest.raises(UnsupportedVllmVersion, match="pinned to vLLM 0.32.0"):
        check_vllm_version("0.33.0")


# ---- the scheduler -----------------------------------------------------------------------


def test_scheduler_hooks_exist_with_the_signatures_we_override():
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    for name, (expected, revisit) in SCHEDULER_METHODS.items():
        assert hasattr(Scheduler, name), f"vLLM's Scheduler has no {name}: revisit {revisit}"
        assert params(getattr(Scheduler, name)) == expected, (
            f"vLLM's Scheduler.{name}{inspect.signature(getattr(Scheduler, name))} changed: revisit {revisit}")
        # AsyncInterceptScheduler puts the mixin over AsyncScheduler: its overrides must match too.
        if name in vars(AsyncScheduler):
            assert params(getattr(AsyncScheduler, name)) == expected, f"AsyncScheduler.{name}: revisit {revisit}"
    assert isinstance(inspect.getattr_static(Scheduler, "_holds_kv_blocks"), staticmethod)


def test_scheduler_returns_the_tuples_we_unpack():
    from vllm.v1.core.sched.scheduler import Scheduler

    for name, size in SCHEDULER_RETURN_TUPLES.items():
        returned = typing.get_type_hints(getattr(Scheduler, name))["return"]
        assert typing.get_origin(returned) is tuple and len(typing.get_args(returned)) == size, (
            f"vLLM's Scheduler.{name} now returns {returned}: revisit InterceptSchedulerMixin.{name}")
    assert typing.get_type_hints(Scheduler._handle_stopped_request)["return"] is bool


def test_our_overrides_take_the_parameters_vllm_passes():
    """Each override in the mixin accepts what vLLM's caller passes (by name, or *args/**kwargs)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from infercept.adapter.scheduler import InterceptSchedulerMixin

    overridden = [n for n in vars(InterceptSchedulerMixin) if n in vars(Scheduler) and not n.startswith("__")]
    assert set(overridden) <= set(SCHEDULER_METHODS), (
        f"the mixin overrides {sorted(set(overridden) - set(SCHEDULER_METHODS))}: pin them in SCHEDULER_METHODS")
    for name in overridden:
        ours = inspect.signature(getattr(InterceptSchedulerMixin, name)).parameters
        variadic = {p.kind for p in ours.values()} & {inspect.Parameter.VAR_POSITIONAL,
                                                     inspect.Parameter.VAR_KEYWORD}
        missing = [p for p in SCHEDULER_METHODS[name][0] if p not in ours]
        assert not missing or variadic, f"InterceptSchedulerMixin.{name} lacks vLLM's {missing}"


def test_scheduler_attributes_we_use_are_set_by_its_constructor():
    from vllm.config import SchedulerConfig
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue
    from vllm.v1.core.sched.scheduler import Scheduler

    assigned = assigned_self_attributes(Scheduler.__init__)
    for name, revisit in SCHEDULER_ATTRIBUTES.items():
        assert name in assigned, f"vLLM's Scheduler.__init__ no longer sets {name}: revisit {revisit}"
    assert "long_prefill_token_threshold" in {f.name for f in dataclasses.fields(SchedulerConfig)}, (
        "revisit InterceptSchedulerMixin.schedule (it caps long_prefill_token_threshold)")
    # _enqueue_by_arrival re-inserts a resumed request by arrival with deque's remove/insert.
    assert issubclass(FCFSRequestQueue, collections.deque)
    # vLLM clears finished_req_ids by rebinding it in _update_after_schedule, after which
    # InterceptSchedulerMixin._update_after_schedule's super() call must come last.
    assert "self.finished_req_ids = set()" in inspect.getsource(Scheduler._update_after_schedule)


# ---- Request -----------------------------------------------------------------------------


def test_request_has_every_field_we_assign_or_read():
    """On a real `Request`: assigning a field it no longer has would silently do nothing."""
    from vllm.v1.request import Request

    request = new_request()
    fields = vars(request)
    for name in REQUEST_FIELDS_ASSIGNED:
        settable = isinstance(getattr(Request, name, None), property) and getattr(Request, name).fset
        assert name in fields or settable, (
            f"vLLM's Request has no field {name!r}: revisit InterceptSchedulerMixin._pause "
            "(infercept/adapter/scheduler.py) and the other assignments REQUEST_FIELDS_ASSIGNED lists")
    for name in REQUEST_FIELDS_READ:
        assert hasattr(request, name), f"vLLM's Request has no {name!r}: revisit infercept/adapter"
    # The rewind _pause copies from vLLM's resumable-request path assigns the same fields.
    from vllm.v1.core.sched.scheduler import Scheduler

    source = inspect.getsource(Scheduler._handle_stopped_request)
    for name in ("num_computed_tokens", "spec_token_ids", "drop_stale_output", "num_stale_output_tokens",
                 "num_output_placeholders"):
        assert f"request.{name} =" in source, (
            f"vLLM's _handle_stopped_request no longer sets request.{name}: revisit InterceptSchedulerMixin._pause")


def test_resume_index_hashes_token_lists_as_vllm_hashes_requests():
    """A front end's token list (the data-parallel locate) must meet a paused request's
    `block_hashes`: the index chains vLLM's `hash_block_tokens` with the engine core's
    hash function as EngineCore builds its request block hasher."""
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.request import Request

    from infercept.adapter.resume_index import chained_block_hashes

    source = inspect.getsource(EngineCore.__init__)
    assert "enable_prefix_caching or kv_connector is not None" in source, (
        "EngineCore hashes requests' blocks under another condition: revisit InterceptSchedulerMixin.__init__")
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    tokens = list(range(100, 170))
    request = Request("hashed", tokens, SamplingParams(max_tokens=4), None,
                      block_hasher=get_request_block_hasher(16, hash_fn))
    assert len(request.block_hashes) == 4
    assert list(chained_block_hashes(tokens, 16, hash_fn)) == request.block_hashes


def test_the_request_fields_the_adapter_assigns_are_all_listed():
    """Any `request.<field> = ...` in the scheduler mixin or the policy driver is in REQUEST_FIELDS_ASSIGNED."""
    from infercept.adapter import policy_driver, scheduler

    stored = set()
    for module in (scheduler, policy_driver):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            target = node.value if isinstance(node, ast.Attribute) else None
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                    and isinstance(target, ast.Name) and target.id in ("request", "old")):
                stored.add(node.attr)
    assert stored, "no request field assignment found: has the adapter moved?"
    unlisted = stored - set(REQUEST_FIELDS_ASSIGNED)
    assert not unlisted, f"the adapter assigns Request.{sorted(unlisted)}: add to REQUEST_FIELDS_ASSIGNED"


def test_request_statuses_we_use():
    from vllm.v1.request import RequestStatus

    for name in REQUEST_STATUSES:
        assert hasattr(RequestStatus, name), f"vLLM's RequestStatus has no {name}: revisit the scheduler mixin"
    assert RequestStatus.is_finished(RequestStatus.FINISHED_STOPPED)
    assert not RequestStatus.is_finished(RequestStatus.WAITING_FOR_STREAMING_REQ)


# ---- the KV cache manager (infercept/adapter/blocks.py, the policy driver) ----------------


def test_kv_cache_manager_calls_we_make():
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    for name, (expected, revisit) in KV_CACHE_MANAGER_CALLS.items():
        found = params(getattr(KVCacheManager, name))
        assert set(expected) <= set(found), f"KVCacheManager.{name}{found} lacks {expected}: revisit {revisit}"
    assert params(BlockPool.free_blocks) == ["self", "ordered_blocks"], "revisit blocks.truncate"
    assert hasattr(BlockPool, "get_num_free_blocks"), "revisit PolicyDriver._batch_state"
    # blocks.num_shared_blocks reads every block's ref count and null flag.
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    fields = {f.name for f in dataclasses.fields(KVCacheBlock)}
    assert {"ref_cnt", "is_null"} <= fields, "revisit blocks.num_shared_blocks"
    assert params(KVCacheManager.get_computed_blocks) == ["self", "request"], (
        "revisit PolicyDriver._prefetch and InterceptSchedulerMixin._resume")


def test_single_type_manager_dicts_are_exactly_the_ones_transfer_rekeys():
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, SingleTypeKVCacheManager

    manager = new_kv_cache_manager()
    [single] = manager.coordinator.single_type_managers
    assert type(single) is FullAttentionManager
    found = {name for name, value in vars(single).items() if isinstance(value, dict)}
    assert found == KV_MANAGER_REQUEST_DICTS, (
        f"vLLM's single-type KV manager's dicts are now {sorted(found)}: revisit blocks.transfer and "
        "blocks._per_request_dicts (infercept/adapter/blocks.py), which re-key them from request to request")
    # Keyed by request id, as their annotations in vLLM's constructors say.
    annotations = {}
    for cls in (SingleTypeKVCacheManager, FullAttentionManager):
        if "__init__" not in vars(cls):
            continue
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute):
                annotations[node.target.attr] = ast.unparse(node.annotation)
    for name in KV_MANAGER_REQUEST_DICTS:
        assert annotations.get(name, "").split("[")[0] in ("dict", "defaultdict"), (name, annotations.get(name))
        assert annotations[name].split("[", 1)[1].startswith("str,"), (
            f"{name} is annotated {annotations[name]}, not keyed by request id: revisit blocks.transfer")


def test_transfer_and_truncate_on_vllms_own_kv_cache_manager():
    """`blocks.transfer`/`truncate`/`block_ids` against a real vLLM KV cache manager, no engine."""
    manager = new_kv_cache_manager(num_blocks=10, block_size=16)
    [single] = manager.coordinator.single_type_managers
    paused, resumed = new_request("paused", 40), new_request("resumed", 40)
    # As PolicyDriver._prefetch allocates.
    assert manager.allocate_slots(paused, 40, delay_cache_blocks=True, has_scheduled_reqs=False) is not None
    assert set(single.req_to_blocks) == {"paused"}, "req_to_blocks is not keyed by request id"
    ids = blocks.block_ids(manager, "paused")
    assert len(ids) == 1 and len(ids[0]) == 3 and manager.get_block_ids("paused") == (ids[0],)
    # Every per-request dict holds the paused request (vLLM fills the last two while it runs).
    single.num_cached_block["paused"] = 1
    single._partial_hit_reqs["paused"] = (0, single.req_to_blocks["paused"][0])
    free = manager.block_pool.get_num_free_blocks()

    assert blocks.transfer(manager, "paused", "resumed") == 3
    for name in KV_MANAGER_REQUEST_DICTS:
        table = getattr(single, name)
        assert "paused" not in table and "resumed" in table, f"{name} was not re-keyed"
    assert blocks.block_ids(manager, "resumed") == ids
    assert manager.block_pool.get_num_free_blocks() == free  # nothing freed, nothing copied
    with pytest.raises(RuntimeError, match="already holds blocks"):
        blocks.transfer(manager, "resumed", "resumed")

    # truncate keeps the block where the prefix ends if no one else reads it: not in
    # the prefix cache (block_hash None) and not shared (ref_cnt 1).
    last = single.req_to_blocks["resumed"][1]
    assert last.block_hash is None and last.ref_cnt == 1
    kept, tail = blocks.truncate(manager, "resumed", 20, 16)
    assert kept == 20 and [b.block_id for b in tail] == ids[0][2:]
    assert blocks.block_ids(manager, "resumed") == [ids[0][:2]]
    manager.block_pool.free_blocks(reversed(tail))  # as the scheduler does, past vLLM's fence
    assert manager.block_pool.get_num_free_blocks() == free + 1
    del single._partial_hit_reqs["resumed"]
    manager.free(resumed)
    assert manager.block_pool.get_num_free_blocks() == free + 3
    assert not any(getattr(single, name) for name in KV_MANAGER_REQUEST_DICTS)


# ---- the KV connector (infercept/adapter/connector.py) -----------------------------------


def _hook_kind(cls, name: str) -> str:
    attribute = inspect.getattr_static(cls, name)
    if isinstance(attribute, property):
        return "property"
    if isinstance(attribute, classmethod):
        return "classmethod"
    if isinstance(attribute, staticmethod):
        return "staticmethod"
    return "method"


def _hook_params(cls, name: str) -> list[str]:
    attribute = inspect.getattr_static(cls, name)
    if isinstance(attribute, property):
        return []
    if isinstance(attribute, (classmethod, staticmethod)):
        return params(attribute.__func__)
    return params(attribute)


def test_connector_hooks_keep_the_signatures_we_implement():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from infercept.adapter.connector import InterceptConnector

    for name, (kind, expected) in CONNECTOR_HOOKS.items():
        assert hasattr(KVConnectorBase_V1, name), (
            f"KVConnectorBase_V1 has no {name}: revisit InterceptConnector (infercept/adapter/connector.py)")
        assert (_hook_kind(KVConnectorBase_V1, name), _hook_params(KVConnectorBase_V1, name)) == (kind, expected), (
            f"KVConnectorBase_V1.{name} changed: revisit InterceptConnector.{name}")
        if name in vars(InterceptConnector):
            ours = (_hook_kind(InterceptConnector, name), _hook_params(InterceptConnector, name))
            assert ours == (kind, expected), f"InterceptConnector.{name} {ours} does not match vLLM's hook"
    overridden = {n for n in vars(InterceptConnector)
                  if hasattr(KVConnectorBase_V1, n) and not n.startswith(("__", "_abc"))}
    assert overridden <= set(CONNECTOR_HOOKS), (
        f"InterceptConnector overrides {sorted(overridden - set(CONNECTOR_HOOKS))}: pin them in CONNECTOR_HOOKS")
    assert not InterceptConnector.__abstractmethods__, (
        f"vLLM added abstract connector hooks: {sorted(InterceptConnector.__abstractmethods__)}")


def test_vllm_calls_request_finished_all_groups_of_an_hma_connector():
    """With `SupportsHMA`, vLLM calls `request_finished_all_groups(request, block_ids)`
    (one list per KV cache group) and keeps its hybrid KV cache manager on."""
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole, SupportsHMA
    from vllm.v1.core.sched.scheduler import Scheduler

    from infercept.adapter.connector import InterceptConnector

    assert issubclass(InterceptConnector, SupportsHMA)
    assert params(SupportsHMA.request_finished_all_groups) == ["self", "request", "block_ids"]
    assert params(InterceptConnector.request_finished_all_groups) == ["self", "request", "block_ids"]
    assert "self.connector.request_finished_all_groups(" in inspect.getsource(
        Scheduler._connector_finished), (
        "vLLM no longer calls request_finished_all_groups: revisit InterceptConnector")
    assert "supports_hma_config" in inspect.getsource(VllmConfig), (
        "vLLM's hybrid-manager switch for connectors changed: revisit InterceptConnector")
    assert {KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER} <= set(KVConnectorRole)


# ---- the engine core (patches/engine_core_utility.py) and its clients --------------------


def test_engine_core_utility_calls_reach_a_method_by_name():
    """The front-end's utility call finds `EngineCore.infercept` by name, with our argument shapes."""
    import types

    from vllm.v1.engine.core import EngineCore, EngineCoreProc

    import infercept.patches.engine_core_utility as patch

    assert "scheduler" in assigned_self_attributes(EngineCore.__init__), "revisit patches/engine_core_utility.py"
    assert "getattr(self, method_name)" in inspect.getsource(EngineCoreProc._handle_client_request), (
        "vLLM no longer looks utility methods up by name: revisit patches/engine_core_utility.py")
    # vLLM maps the call's arguments onto the method's parameters (at most as many as
    # it declares): `infercept(method, args)` takes the method name and one list.
    scheduler = types.SimpleNamespace(infercept_cancel=lambda key, ended_as: (key, ended_as))
    bound = types.MethodType(patch._infercept, types.SimpleNamespace(scheduler=scheduler))
    args = EngineCoreProc._convert_msgspec_args(bound, ("cancel", ["k1", None]))
    assert bound(*args) == ("k1", None)
    with pytest.raises(AssertionError):  # why the arguments travel as one list
        EngineCoreProc._convert_msgspec_args(bound, ("cancel", "k1", None))


def test_engine_core_clients_we_call():
    """The server's and infercept.LLM's calls into vLLM's engine-core clients."""
    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.v1.engine.core_client import (
        AsyncMPClient, DPLBAsyncMPClient, EngineCoreClient, InprocClient, MPClient, SyncMPClient)
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.engine.output_processor import OutputProcessor

    # infercept/server/service.py InterceptService.call / call_all: one engine by its
    # identity (its data-parallel rank, 2 bytes little-endian), or all in rank order.
    assert params(AsyncMPClient._call_utility_async) == ["self", "method", "args", "engine"]
    assert params(AsyncMPClient.call_utility_all_async) == ["self", "method", "args"]
    assert "rank.to_bytes(2, \"little\")" in inspect.getsource(MPClient.__init__)
    assert {"core_engines", "engine_ranks_managed"} <= assigned_self_attributes(MPClient.__init__)
    # infercept/server/plugin.py: the first API server process (client 0) publishes metrics.
    assert "client_index" in assigned_self_attributes(AsyncMPClient.__init__)
    # infercept/server/routes.py _pinned: vLLM's header that pins a request to an engine,
    # an index into the client's engines (infercept/server/service.py engine_index).
    assert 'headers.get("X-data-parallel-rank")' in inspect.getsource(
        GenerateBaseServing._get_data_parallel_rank)
    assert "self.core_engines[eng_index]" in inspect.getsource(
        DPLBAsyncMPClient.get_core_engine_for_request)
    # infercept/adapter/profiler.py engine_call
    assert params(SyncMPClient.call_utility) == ["self", "method", "args"]
    assert "engine_core" in assigned_self_attributes(InprocClient.__init__)
    # infercept/entrypoints/sessions.py SessionEngine.abort / _submit
    assert params(EngineCoreClient.abort_requests) == ["self", "request_ids"]
    assert params(OutputProcessor.abort_requests) == ["self", "request_ids", "internal"]
    assert {"engine_core", "output_processor"} <= assigned_self_attributes(LLMEngine.__init__)


def test_llm_and_server_reach_ins():
    """What `infercept.LLM` and the server use of vLLM beyond its public API (patches/README.md)."""
    import vllm
    from vllm.entrypoints.openai.chat_completion import api_router as chat
    from vllm.entrypoints.openai.completion import api_router as completion
    from vllm.plugins.endpoint_plugins.interface import attach_endpoint_plugins
    from vllm.renderers.inputs.preprocess import conversation_to_seq, prompt_to_seq
    from vllm.tool_parsers import ToolParserManager
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    # infercept/entrypoints/llm.py LLM.generate / LLM.chat
    assert params(vllm.LLM._preprocess_cmpl)[:3] == ["self", "prompts", "tokenization_kwargs"]
    assert params(vllm.LLM._params_to_seq) == ["self", "params", "num_requests"]
    assert {"llm_engine", "request_counter"} <= assigned_self_attributes(vllm.LLM.__init__)
    assert callable(prompt_to_seq) and callable(conversation_to_seq)
    # infercept/server/plugin.py keeps vLLM's endpoint functions and calls them itself
    # (infercept/server/routes.py _run); vLLM then drops the routes ours replace.
    assert params(completion.create_completion) == ["request", "raw_request"]
    assert params(chat.create_chat_completion) == ["request", "raw_request"]
    from vllm.entrypoints.anthropic import api_router as messages
    from vllm.entrypoints.openai.responses import api_router as responses

    assert params(messages.create_messages) == ["request", "raw_request"]
    assert params(responses.create_responses) == ["request", "raw_request"]
    assert "app.router.routes[:] = routes" in inspect.getsource(attach_endpoint_plugins)
    # infercept/entrypoints/llm.py _Chat
    assert ToolParserManager.get_tool_parser("hermes").tool_call_end_token == "</tool_call>"
    # infercept/adapter/profiler.py measure_on_worker
    assert {"num_tokens", "force_attention"} <= set(params(GPUModelRunner._dummy_run))


# ---- with a live engine ------------------------------------------------------------------


def test_live_scheduler_state_has_the_types_we_use(intercept_llm):
    from vllm.v1.core.sched.request_queue import RequestQueue

    scheduler = scheduler_of(intercept_llm("preserve"))
    assert isinstance(scheduler._inflight_prefills, set)
    assert isinstance(scheduler.finished_req_ids, set)
    assert isinstance(scheduler.kv_holding_waiting, RequestQueue) and isinstance(scheduler.waiting, RequestQueue)
    assert isinstance(scheduler.requests, dict) and isinstance(scheduler.running, list)
    assert scheduler.connector is not None and scheduler.connector.planner is not None


def test_block_transfer_moves_all_per_request_bookkeeping(intercept_llm):
    """`blocks.transfer` re-keys the KV manager's per-request state without freeing."""
    from test_abort_and_triggers import pause_one

    llm = intercept_llm("preserve")
    engine, session = pause_one(llm)
    manager = scheduler_of(llm).kv_cache_manager
    [single] = manager.coordinator.single_type_managers
    assert isinstance(single.req_to_blocks, dict) and isinstance(single.num_cached_block, dict)
    paused_id = session.engine_request_id
    holding = {name for name, value in vars(single).items() if isinstance(value, dict) and paused_id in value}
    assert {"req_to_blocks", "num_cached_block"} <= holding <= KV_MANAGER_REQUEST_DICTS
    ids = blocks.block_ids(manager, paused_id)
    free = manager.block_pool.get_num_free_blocks()
    assert blocks.transfer(manager, paused_id, "probe") == len(ids[0]) > 0
    assert blocks.block_ids(manager, "probe") == ids
    assert paused_id not in single.req_to_blocks and paused_id not in single.num_cached_block
    assert manager.block_pool.get_num_free_blocks() == free
    blocks.transfer(manager, "probe", paused_id)
    engine.abort(session)
