"""InferCept's KV connector: swaps intercepted requests' KV to CPU and back.

A thin front over vLLM 0.32's `KVConnectorBase_V1`, as vLLM's own
`OffloadingConnector` is: the scheduler side (`SwapPlanner`, in the engine
core) decides which device blocks go to which CPU blocks; the worker side
(`SwapWorker`, in every worker, each moving its own tensor-parallel shard)
copies them with the torch-only `LayerwiseSwapper`.

The protocol, as vLLM's own asynchronous connectors follow it: a swap-out's save
is queued at the top of a step on its own stream and overlaps that and later
forward passes; its device blocks go back to vLLM only when every worker has
reported the save done (`get_finished` -> `finished_sending`). Loads wait per
layer (`wait_for_layer_load`), so CUDA graphs must stay piecewise.

Named by `kv_connector_module_path` in the engine's `kv_transfer_config`
(see `infercept.config`); the scheduler mixin talks to the scheduler side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from infercept.adapter.blocks import group_block_ids
from infercept.adapter.swap_metadata import SwapMetadata
from infercept.config import InterceptConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

    from infercept.adapter.swap_planner import SwapPlanner
    from infercept.adapter.swap_worker import SwapWorker


def num_layers(kv_cache_config: "KVCacheConfig") -> int:
    return sum(len(group.layer_names) for group in kv_cache_config.kv_cache_groups)


def block_bytes(kv_cache_config: "KVCacheConfig") -> int:
    """Bytes that one block id stands for, on one worker: its page in every KV cache
    tensor (with several groups, the groups' layers share tensors, and a block id
    belongs to one group at a time)."""
    if kv_cache_config.kv_cache_tensors and kv_cache_config.num_blocks:
        return sum(t.size for t in kv_cache_config.kv_cache_tensors) // kv_cache_config.num_blocks
    return sum(
        group.kv_cache_spec.page_size_bytes * len(group.layer_names)
        for group in kv_cache_config.kv_cache_groups
    )


def num_cpu_blocks(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> int:
    """CPU blocks that fit in the swap space; both sides compute the same number."""
    swap_space_bytes = InterceptConfig.from_vllm_config(vllm_config).swap_space_bytes
    return swap_space_bytes // max(1, block_bytes(kv_cache_config))


class InterceptConnector(KVConnectorBase_V1, SupportsHMA):
    """Declares `SupportsHMA`: models with several KV cache groups (sliding-window
    layers beside full attention) keep vLLM's hybrid KV cache manager, and every
    group's blocks are swapped (a sliding window's dropped blocks are not)."""

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig",
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        self.planner: SwapPlanner | None = None
        self.worker: SwapWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            from infercept.adapter.swap_planner import SwapPlanner

            self.planner = SwapPlanner(
                num_cpu_blocks(vllm_config, kv_cache_config),
                vllm_config.cache_config.block_size,
                block_bytes(kv_cache_config),
                emulating=InterceptConfig.from_vllm_config(vllm_config).emulate_async_copies > 0,
            )
        else:
            from infercept.adapter.swap_worker import SwapWorker

            self.worker = SwapWorker(
                num_cpu_blocks(vllm_config, kv_cache_config),
                kv_cache_config.num_blocks,
                InterceptConfig.from_vllm_config(vllm_config).emulate_async_copies,
            )

    @property
    def requires_kv_delivery(self) -> bool:
        """Read by vLLM's scheduler at start-up: False, nothing is handed off.

        Swapped KV is InferCept's own copy of a paused request, not a producer's
        hand-off, so a preemption keeps its in-flight tokens as stock vLLM does.
        """
        return False

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Read by vLLM's config: True, CUDA graphs stay piecewise.

        `wait_for_layer_load` runs between graph pieces; a full-graph replay would
        skip it and read blocks before their load lands.
        """
        return True

    # ---- worker side: each hook is called by vLLM's model runner ---------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Once, after the KV cache tensors are allocated."""
        self.worker.register(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Top of `execute_model`, before the batch update and the forward pass.

        Queues this step's saves, which overlap this and later forward passes: their
        blocks stay allocated until `get_finished` reports them.
        """
        assert isinstance(kv_connector_metadata, SwapMetadata)
        self.worker.save(kv_connector_metadata.saves, kv_connector_metadata.abandoned,
                         kv_connector_metadata.allocated)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Queue this step's loads: before the forward pass when it reads them (a
        resume: vLLM's synchronous load), after it for a prefetch."""
        metadata = self._get_connector_metadata()
        self.worker.load(metadata.tail_loads, metadata.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """On entry to each attention layer: wait for that layer's copies only."""
        self.worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        """Nothing: a paused request's KV is complete before the step that saves it,
        so its whole save is queued at once (`handle_preemptions`) on its own stream."""

    def wait_for_save(self) -> None:
        """End of every step: later steps wait for this step's loads (a prefetch is
        queued after the forward pass); saves go on, reported by `get_finished`."""
        self.worker.wait_loads()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, None]:
        """After every step: the paused requests whose save is done on this worker.

        vLLM's output aggregator reports an id once every worker has, and the
        scheduler then frees the device blocks the save read.
        """
        return self.worker.finished_saves() or None, None

    # ---- scheduler side: called by vLLM's scheduler ------------------------

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[int, bool]:
        """When a waiting request is admitted: tokens we can load beyond the local hit."""
        return self.planner.num_loadable_tokens(request.request_id, num_computed_tokens), False

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ) -> None:
        """After its blocks are allocated: plan the load into them.

        A CPU copy that the local prefix cache made unnecessary is dropped.
        """
        if num_external_tokens > 0:
            self.planner.plan_load(
                request.request_id, group_block_ids(blocks.blocks), num_external_tokens
            )
        else:
            self.planner.release(request.request_id)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> SwapMetadata:
        """End of `schedule()`: hand this step's copies to the workers."""
        step = self.planner.take_step()
        if self.planner.emulating:
            step.allocated = _fresh_block_ids(scheduler_output, self._kv_cache_manager.block_pool)
        return step

    def has_pending_block_frees(self) -> bool:
        """Asked by vLLM before it preempts: a save in flight will free blocks soon,
        so a request that needs them waits for the next step instead."""
        return self.planner.has_saves_in_flight()

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, None]:
        """A request finished or was aborted: drop anything it left on the CPU.

        True (vLLM keeps its device blocks until `get_finished` reports it) while a
        save still reads them.
        """
        saving = self.planner.is_saving(request.request_id)
        self.planner.release(request.request_id)
        return saving, None

    def request_finished_all_groups(
        self, request: "Request", block_ids: tuple[list[int], ...]
    ) -> tuple[bool, None]:
        """`request_finished`, as vLLM's hybrid KV cache manager calls it."""
        return self.request_finished(request, [])

    def get_loaded_kv_cache_group_ids(self, request: "Request") -> tuple[int, ...]:
        """A load restores the request's own blocks in every group."""
        return tuple(range(len(self._kv_cache_config.kv_cache_groups)))


def _fresh_block_ids(scheduler_output: "SchedulerOutput", block_pool) -> list[int]:
    """Device blocks this step hands to a request that is their only holder.

    Blocks shared through the prefix cache (a paused request's system prompt,
    say) are only read by their new holder, so a save may still read them too.
    """
    listed: list[int] = []
    for new in scheduler_output.scheduled_new_reqs:
        for group in new.block_ids:
            listed.extend(group)
    for groups in scheduler_output.scheduled_cached_reqs.new_block_ids:
        for group in groups or ():
            listed.extend(group)
    return [b for b in listed if block_pool.blocks[b].ref_cnt == 1 and not block_pool.blocks[b].is_null]
