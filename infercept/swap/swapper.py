"""Layer-wise copies of KV-cache blocks between device tensors and host memory.

vLLM gives each attention layer one KV-cache tensor, with the block index in one
of its dimensions (dim 0 on the CPU backend, dim 1 in e.g. `[2, num_blocks,
block_size, heads, head]` on GPU backends), possibly as a strided view. The
swapper keeps, per layer, a block-major host buffer `[num_cpu_blocks,
*per_block_shape]` and moves blocks between the two:

    swap out:  device --index_select--> staging (device, block-major)
                      --one copy per run of consecutive CPU ids--> host
    swap in:   host --one copy per run--> staging (device)
                    --index_copy_--> device

so every device<->host transfer is between two contiguous buffers (on CUDA a
plain asynchronous memcpy from/to pinned memory), whatever the device layout.

When a queued copy runs is `infercept.swap.ordering`'s business: on CUDA saves and
loads run on two side streams that first wait for the caller's (compute) stream, and
each layer's loads record an event; `wait_layer(i)` makes the current stream wait on
layer i's event only, so layer i's attention can run while later layers still copy,
and a save tagged at `swap_out` is reported by `finished_saves()` once done. No call
blocks the host except `synchronize()`. On CPU every copy is synchronous, unless the
emulation of the GPU's worst case is on (`emulate_lag`), where each runs as late as
CUDA would allow.

Callers own the block ids: a device block that is being saved must not be handed to
another request, nor a CPU block reused, before the save is reported done
(`finished_saves()`), and a loaded block must not be read before `wait_layer` (or
`wait_loads()`) of its layer.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from infercept.swap.ordering import LOAD, SAVE, CudaOrdering, DeferredOrdering, ImmediateOrdering

# Copies go through same-width integer views, so they are bit-exact and work
# for every dtype of that width (fp8 included).
_BITS_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class _CopyPlan:
    """One validated swap: pair k moves between device_index[k] and a CPU block."""

    num_blocks: int
    device_index: torch.Tensor  # int64, on the layers' device, in pair order
    cpu_runs: tuple[tuple[int, int, int], ...]  # (first pair, first CPU id, length)


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    bits_dtype = _BITS_DTYPES.get(tensor.element_size())
    return tensor if bits_dtype is None else tensor.view(bits_dtype)


def _per_block_shape(layer: torch.Tensor, block_dim: int) -> torch.Size:
    block_dim %= layer.dim()
    return layer.shape[:block_dim] + layer.shape[block_dim + 1 :]


def _cpu_runs(cpu_ids: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """Splits CPU ids into runs of consecutive ids: (first pair, first id, length)."""
    runs = []
    start = 0
    for pos in range(1, len(cpu_ids) + 1):
        if pos == len(cpu_ids) or cpu_ids[pos] != cpu_ids[pos - 1] + 1:
            runs.append((start, cpu_ids[start], pos - start))
            start = pos
    return tuple(runs)


def _checked_ids(name: str, block_ids: Sequence[int], num_blocks: int, unique: bool) -> tuple[int, ...]:
    checked = []
    for block_id in block_ids:
        try:
            block_id = operator.index(block_id)
        except TypeError:
            raise ValueError(f"{name} must be integers, got {block_id!r}") from None
        if not 0 <= block_id < num_blocks:
            raise ValueError(f"{name}: block id {block_id} outside [0, {num_blocks})")
        checked.append(block_id)
    if unique and len(set(checked)) != len(checked):
        raise ValueError(f"{name} names a destination block more than once")
    return tuple(checked)


class LayerwiseSwapper:
    """Swaps KV blocks of a list of per-layer device tensors to and from host memory.

    `layers[i]` is layer i's KV-cache tensor (any dtype, shape and strides; layers
    may differ) and `block_dims[i]` (or one int for all) the index of its block
    dimension. The host side holds `num_cpu_blocks` blocks per layer, addressed by
    the same CPU block id in every layer (ids from `CpuBlockAllocator`).
    `pin_memory` defaults to True when the layers live on CUDA. `emulate_lag` > 0
    (CPU only) runs every copy as late as CUDA would allow (`DeferredOrdering`), tagged
    saves completing `emulate_lag` polls of `finished_saves` after they were queued.
    """

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        block_dims: int | Sequence[int],
        num_cpu_blocks: int,
        pin_memory: bool | None = None,
        emulate_lag: int = 0,
    ) -> None:
        if not layers or not all(isinstance(t, torch.Tensor) for t in layers):
            raise ValueError("layers must be a non-empty list of tensors")
        if num_cpu_blocks < 1:
            raise ValueError(f"num_cpu_blocks must be >= 1, got {num_cpu_blocks}")
        if isinstance(block_dims, int):
            block_dims = [block_dims] * len(layers)
        if len(block_dims) != len(layers):
            raise ValueError(f"{len(block_dims)} block dims for {len(layers)} layers")
        self.device = layers[0].device
        if any(layer.device != self.device for layer in layers):
            raise ValueError("all layers must be on one device")
        if pin_memory is None:
            pin_memory = self.device.type == "cuda"
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pinned host memory needs CUDA")
        self._is_cuda = self.device.type == "cuda"
        if emulate_lag and self._is_cuda:
            raise ValueError("the asynchronous-copy emulation is for CPU tensors")
        self.pin_memory = pin_memory
        self.num_cpu_blocks = num_cpu_blocks
        self._layers = tuple(layers)
        self._block_dims = tuple(self._checked_dim(t, d) for t, d in zip(layers, block_dims))
        self.num_device_blocks = tuple(t.shape[d] for t, d in zip(layers, self._block_dims))
        self._host_layers = tuple(self._new_host_layer(t, d) for t, d in zip(layers, self._block_dims))
        self.layer_bytes_per_block = tuple(h[0].numel() * h.element_size() for h in self._host_layers)
        self.bytes_per_block = sum(self.layer_bytes_per_block)
        self.bytes_swapped_out = 0
        self.bytes_swapped_in = 0
        self.num_poisoned_blocks = 0
        if self._is_cuda:
            self._ordering = CudaOrdering(self.device, len(layers))
        elif emulate_lag:
            self._ordering = DeferredOrdering(emulate_lag)
        else:
            self._ordering = ImmediateOrdering()
        self._last_plans: dict[str, tuple[tuple, _CopyPlan]] = {}

    @staticmethod
    def _checked_dim(layer: torch.Tensor, block_dim: int) -> int:
        if not -layer.dim() <= block_dim < layer.dim():
            raise ValueError(f"block dim {block_dim} out of range for shape {tuple(layer.shape)}")
        return block_dim % layer.dim()

    def _new_host_layer(self, layer: torch.Tensor, block_dim: int) -> torch.Tensor:
        return torch.empty(
            (self.num_cpu_blocks, *_per_block_shape(layer, block_dim)),
            dtype=layer.dtype,
            device="cpu",
            pin_memory=self.pin_memory,
        )

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def host_layer(self, layer_idx: int) -> torch.Tensor:
        """Layer `layer_idx`'s host buffer, block-major: `[num_cpu_blocks, *per_block_shape]`."""
        return self._host_layers[self._checked_layer(layer_idx)]

    # ---- queueing copies -------------------------------------------------

    def swap_out(self, device_block_ids: Sequence[int], cpu_block_ids: Sequence[int],
                 tag: object = None) -> None:
        """Queues device -> host copies of the paired blocks for every layer, in layer order.

        A `tag` is reported by `finished_saves()` once every layer's copy is done.
        """
        self._submit(SAVE, range(self.num_layers), device_block_ids, cpu_block_ids,
                     min(self.num_device_blocks), tag)

    def swap_in(self, cpu_block_ids: Sequence[int], device_block_ids: Sequence[int]) -> None:
        """Queues host -> device copies of the paired blocks for every layer, in layer order."""
        self._submit(LOAD, range(self.num_layers), device_block_ids, cpu_block_ids,
                     min(self.num_device_blocks))

    def swap_out_layer(
        self, layer_idx: int, device_block_ids: Sequence[int], cpu_block_ids: Sequence[int]
    ) -> None:
        """Queues one layer's device -> host copies (from a connector's `save_kv_layer`).

        On CUDA the copy starts only after the work already queued on the current
        stream, e.g. this layer's attention writing the blocks.
        """
        layer_idx = self._checked_layer(layer_idx)
        self._submit(SAVE, [layer_idx], device_block_ids, cpu_block_ids,
                     self.num_device_blocks[layer_idx])

    def swap_in_layer(
        self, layer_idx: int, cpu_block_ids: Sequence[int], device_block_ids: Sequence[int]
    ) -> None:
        """Queues one layer's host -> device copies; pair with `wait_layer(layer_idx)`."""
        layer_idx = self._checked_layer(layer_idx)
        self._submit(LOAD, [layer_idx], device_block_ids, cpu_block_ids,
                     self.num_device_blocks[layer_idx])

    def _submit(self, queue: str, layers: Sequence[int], device_ids: Sequence[int],
                cpu_ids: Sequence[int], num_device_blocks: int, tag: object = None) -> None:
        device_ids, cpu_ids = tuple(device_ids), tuple(cpu_ids)
        # Validate now, in the caller's frame, even when the copy runs later.
        self._check_ids(queue, device_ids, cpu_ids, num_device_blocks)
        queue_layer = self._queue_out if queue == SAVE else self._queue_in

        def copy_layer(layer_idx: int) -> None:
            queue_layer(layer_idx, self._plan(queue, device_ids, cpu_ids, num_device_blocks))

        self._ordering.submit(queue, device_ids, cpu_ids, layers, copy_layer, tag)

    def _queue_out(self, layer_idx: int, plan: _CopyPlan) -> None:
        if plan.num_blocks:
            layer, dim = _as_bits(self._layers[layer_idx]), self._block_dims[layer_idx]
            host = _as_bits(self._host_layers[layer_idx])
            staging = layer.index_select(dim, plan.device_index).movedim(dim, 0).contiguous()
            for pos, cpu_start, length in plan.cpu_runs:
                host[cpu_start : cpu_start + length].copy_(
                    staging[pos : pos + length], non_blocking=self._is_cuda
                )
        self.bytes_swapped_out += plan.num_blocks * self.layer_bytes_per_block[layer_idx]

    def _queue_in(self, layer_idx: int, plan: _CopyPlan) -> None:
        if plan.num_blocks:
            layer, dim = _as_bits(self._layers[layer_idx]), self._block_dims[layer_idx]
            host = _as_bits(self._host_layers[layer_idx])
            staging = torch.empty((plan.num_blocks, *host.shape[1:]), dtype=host.dtype, device=self.device)
            for pos, cpu_start, length in plan.cpu_runs:
                staging[pos : pos + length].copy_(
                    host[cpu_start : cpu_start + length], non_blocking=self._is_cuda
                )
            layer.index_copy_(dim, plan.device_index, staging.movedim(0, dim))
        self.bytes_swapped_in += plan.num_blocks * self.layer_bytes_per_block[layer_idx]

    # ---- completion and waiting ------------------------------------------

    def finished_saves(self) -> list:
        """Tags of saves done since the last call, in the order they were queued; never blocks."""
        return self._ordering.finished_saves()

    def abandon_save(self, tag: object) -> None:
        """The copy of save `tag` is no longer wanted: its blocks may be handed on (it is
        still reported by `finished_saves`)."""
        self._ordering.abandon_save(tag)

    def poison_reused(self, device_block_ids: Sequence[int]) -> int:
        """Emulation check: `device_block_ids` are being handed to new owners now.

        Any of them that a wanted save has yet to read is overwritten with garbage, so
        a save that was let go too early produces wrong tokens instead of passing by
        luck. Returns the number of (layer, block) pairs poisoned (0 off the emulation).
        """
        reads = self._ordering.pending_save_reads(device_block_ids)
        for layer_idx, block_id in reads:
            view = self._layers[layer_idx].select(self._block_dims[layer_idx], block_id)
            view.fill_(_POISON if view.is_floating_point() else -1)
        self.num_poisoned_blocks += len(reads)
        return len(reads)

    def wait_layer(self, layer_idx: int) -> None:
        """Makes the current stream wait for every load queued so far for this layer.

        On CUDA this queues a wait on the layer's event (the host does not block);
        on CPU copies are already done, or (emulation) run now.
        """
        self._ordering.wait_layer(self._checked_layer(layer_idx))

    def wait_loads(self) -> None:
        """Makes the current stream wait for every load queued so far (no host block)."""
        self._ordering.wait_loads()

    def wait_all(self) -> None:
        """Makes the current stream wait for every copy queued so far (no host block)."""
        self._ordering.wait_all()

    def synchronize(self) -> None:
        """Blocks the host until every queued copy is done (host buffers readable)."""
        self._ordering.synchronize()

    def query(self) -> bool:
        """True when every queued copy is done; never blocks."""
        return self._ordering.query()

    # ---- helpers ---------------------------------------------------------

    def _checked_layer(self, layer_idx: int) -> int:
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer index {layer_idx} outside [0, {self.num_layers})")
        return layer_idx

    def _check_ids(self, queue: str, device_ids: tuple, cpu_ids: tuple, num_device_blocks: int) -> None:
        if len(device_ids) != len(cpu_ids):
            raise ValueError(f"{len(device_ids)} device block ids vs {len(cpu_ids)} CPU block ids")
        swapping_in = queue == LOAD
        _checked_ids("device_block_ids", device_ids, num_device_blocks, unique=swapping_in)
        _checked_ids("cpu_block_ids", cpu_ids, self.num_cpu_blocks, unique=not swapping_in)

    def _plan(
        self, queue: str, device_ids: tuple, cpu_ids: tuple, num_device_blocks: int
    ) -> _CopyPlan:
        """A checked swap's plan; repeated per-layer calls reuse it.

        Runs on the queue's stream (on CUDA the index tensor is uploaded there).
        """
        key = (device_ids, cpu_ids, num_device_blocks)
        cached = self._last_plans.get(queue)
        if cached is not None and cached[0] == key:
            return cached[1]
        index = torch.tensor([operator.index(i) for i in device_ids], dtype=torch.int64)
        if self._is_cuda and device_ids:
            index = index.pin_memory().to(self.device, non_blocking=True)
        plan = _CopyPlan(len(device_ids), index, _cpu_runs([operator.index(i) for i in cpu_ids]))
        self._last_plans[queue] = (key, plan)
        return plan


# What a block handed to a new owner holds, under the emulation, while a save has yet
# to read it: finite (attention over garbage must stay finite), far from any real KV.
_POISON = 1.0e4


def bytes_per_block(layers: Sequence[torch.Tensor], block_dims: int | Sequence[int]) -> int:
    """KV bytes one block takes summed over layers (without building a swapper)."""
    if isinstance(block_dims, int):
        block_dims = [block_dims] * len(layers)
    return sum(math.prod(_per_block_shape(t, d)) * t.element_size() for t, d in zip(layers, block_dims))
