"""Worker side of the swap connector: moves this worker's KV shard.

Each worker (one per tensor-parallel rank) swaps its own shard of every
block; block ids are the same on all workers, so one `SwapMetadata` serves
them all.
"""

from __future__ import annotations

import torch

from infercept.adapter.swap_metadata import BlockCopies
from infercept.swap.swapper import LayerwiseSwapper


def block_dim(tensor: torch.Tensor, num_blocks: int) -> int:
    """The dimension of a layer's KV tensor that indexes blocks.

    vLLM's CPU backend lays a layer out as [num_blocks, heads, block, 2*head];
    GPU backends as [2, num_blocks, ...]; both are found by size.
    """
    dims = [d for d, size in enumerate(tensor.shape) if size == num_blocks]
    if not dims:
        raise ValueError(f"no dimension of size {num_blocks} in KV shape {tuple(tensor.shape)}")
    if len(dims) > 1 and tensor.shape[0] == 2 and 1 in dims:
        return 1
    return dims[0]


class SwapWorker:
    def __init__(self, num_cpu_blocks: int, num_device_blocks: int, emulate_lag: int = 0):
        self.num_cpu_blocks = num_cpu_blocks
        self.num_device_blocks = num_device_blocks
        self.emulate_lag = emulate_lag
        self.swapper: LayerwiseSwapper | None = None
        self._layer_index: dict[str, int] = {}

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        tensors: list[torch.Tensor] = []
        by_storage: dict[int, int] = {}
        for name, tensor in kv_caches.items():
            # Layers that share a KV cache share its copies too.
            key = tensor.data_ptr()
            if key not in by_storage:
                by_storage[key] = len(tensors)
                tensors.append(tensor)
            self._layer_index[name] = by_storage[key]
        if self.num_cpu_blocks > 0:
            self.swapper = LayerwiseSwapper(
                tensors,
                [block_dim(t, self.num_device_blocks) for t in tensors],
                self.num_cpu_blocks,
                emulate_lag=self.emulate_lag,
            )

    def save(self, saves: list[BlockCopies], abandoned: list[str] = (),
             allocated: list[int] = ()) -> None:
        if self.swapper is None:
            return
        for copies in saves:
            self.swapper.swap_out(copies.src, copies.dst, tag=copies.tag)
        for tag in abandoned:
            self.swapper.abandon_save(tag)
        if allocated:
            # Emulation only: blocks handed on while a save (this step's too: the
            # forward pass is not ordered after it) has yet to read them.
            self.swapper.poison_reused(allocated)

    def load(self, tail_loads: list[BlockCopies], loads: list[BlockCopies]) -> None:
        """Partly filled blocks first, waited for before the forward pass (which writes
        new KV into them before any layer waits); full blocks then land layer by layer."""
        for copies in tail_loads:
            self.swapper.swap_in(copies.src, copies.dst)
        if tail_loads:
            self.swapper.wait_loads()
        for copies in loads:
            self.swapper.swap_in(copies.src, copies.dst)

    def wait_layer(self, layer_name: str) -> None:
        if self.swapper is not None and layer_name in self._layer_index:
            self.swapper.wait_layer(self._layer_index[layer_name])

    def wait_loads(self) -> None:
        if self.swapper is not None:
            self.swapper.wait_loads()

    def finished_saves(self) -> set[str]:
        return set(self.swapper.finished_saves()) if self.swapper is not None else set()
