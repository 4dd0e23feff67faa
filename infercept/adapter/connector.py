"""InferCept's KV connector: swaps intercepted requests' KV to CPU and back.

A thin front over vLLM 0.32's `KVConnectorBase_V1`, as vLLM's own
`OffloadingConnector` is: the scheduler side (`SwapPlanner`, in the engine
core) decides which device blocks go to which CPU blocks; the worker side
(`SwapWorker`, in every worker, each moving its own tensor-parallel shard)
copies them layer by layer with the torch-only `LayerwiseSwapper`.

Named by `kv_connector_module_path` in the engine's `kv_transfer_config`
(see `infercept.config`); the scheduler mixin talks to the scheduler side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

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


@dataclass
class BlockCopies:
    """Paired block ids: `src[i]` is copied to `dst[i]`."""

    src: list[int]
    dst: list[int]


@dataclass
class SwapMetadata(KVConnectorMetadata):
    """One step's transfers, built in the scheduler and run in every worker.

    Saves (device -> CPU) run before the step's batch update and forward pass,
    while the freed device blocks are still intact; loads (CPU -> device) run
    before the layers that read them.
    """

    saves: list[BlockCopies] = field(default_factory=list)
    loads: list[BlockCopies] = field(default_factory=list)


def num_layers(kv_cache_config: "KVCacheConfig") -> int:
    return sum(len(group.layer_names) for group in kv_cache_config.kv_cache_groups)


def block_bytes(kv_cache_config: "KVCacheConfig") -> int:
    """Bytes of one block across all layers, on one worker."""
    return sum(
        group.kv_cache_spec.page_size_bytes * len(group.layer_names)
        for group in kv_cache_config.kv_cache_groups
    )


def num_cpu_blocks(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> int:
    """CPU blocks that fit in the swap space; both sides compute the same number."""
    swap_space_bytes = InterceptConfig.from_vllm_config(vllm_config).swap_space_bytes
    return swap_space_bytes // max(1, block_bytes(kv_cache_config))


class InterceptConnector(KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig",
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise NotImplementedError(
                "InferCept's swap connector supports models with one KV cache "
                "group (full attention); use --intercept-policy discard otherwise."
            )
        self.planner: SwapPlanner | None = None
        self.worker: SwapWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            from infercept.adapter.swap_planner import SwapPlanner

            self.planner = SwapPlanner(
                num_cpu_blocks(vllm_config, kv_cache_config),
                vllm_config.cache_config.block_size,
                block_bytes(kv_cache_config),
            )
        else:
            from infercept.adapter.swap_worker import SwapWorker

            self.worker = SwapWorker(
                num_cpu_blocks(vllm_config, kv_cache_config),
                kv_cache_config.num_blocks,
            )

    # ---- worker side: each hook is called by vLLM's model runner ---------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Once, after the KV cache tensors are allocated."""
        self.worker.register(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Top of `execute_model`, before the batch update: queue this step's saves."""
        assert isinstance(kv_connector_metadata, SwapMetadata)
        self.worker.save(kv_connector_metadata.saves)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Before the forward pass (synchronous loads): queue this step's loads."""
        self.worker.load(self._get_connector_metadata().loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """On entry to each attention layer: wait for that layer's copies only."""
        self.worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        """Saves happen at the pause, not per forward: nothing to do here."""

    def wait_for_save(self) -> None:
        """End of the step: no copy of this step may outlive it."""
        self.worker.wait_all()

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
                request.request_id, blocks.get_block_ids()[0], num_external_tokens
            )
        else:
            self.planner.release(request.request_id)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> SwapMetadata:
        """End of `schedule()`: hand this step's copies to the workers."""
        return self.planner.take_step()

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, None]:
        """A request finished or was aborted: drop anything it left on the CPU."""
        self.planner.release(request.request_id)
        return False, None
