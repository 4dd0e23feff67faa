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

On CUDA all copies run on the swapper's own side stream, which first waits for
the caller's current (compute) stream, and each layer records an event when its
copies are queued. `wait_layer(i)` makes the current stream wait on layer i's
event only, so layer i's attention can run while later layers still copy; no
call blocks the host except `synchronize()`. On CPU every copy is synchronous.

Callers own the block ids: a device block that was swapped out must not be
overwritten, nor a CPU block reused, before the copy is done (`wait_all()` for
the device side, `synchronize()` or `query()` for the host side).
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

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
    `pin_memory` defaults to True when the layers live on CUDA.
    """

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        block_dims: int | Sequence[int],
        num_cpu_blocks: int,
        pin_memory: bool | None = None,
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
        self._is_cuda = self.device.type == "cuda"
        if self._is_cuda:
            self._stream = torch.cuda.Stream(device=self.device)
            self._layer_events = [torch.cuda.Event() for _ in layers]
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

    def swap_out(self, device_block_ids: Sequence[int], cpu_block_ids: Sequence[int]) -> None:
        """Queues device -> host copies of the paired blocks for every layer, in layer order."""
        with self._side_stream():
            plan = self._plan("out", device_block_ids, cpu_block_ids, min(self.num_device_blocks))
            for layer_idx in range(self.num_layers):
                self._queue_out(layer_idx, plan)

    def swap_in(self, cpu_block_ids: Sequence[int], device_block_ids: Sequence[int]) -> None:
        """Queues host -> device copies of the paired blocks for every layer, in layer order."""
        with self._side_stream():
            plan = self._plan("in", device_block_ids, cpu_block_ids, min(self.num_device_blocks))
            for layer_idx in range(self.num_layers):
                self._queue_in(layer_idx, plan)

    def swap_out_layer(
        self, layer_idx: int, device_block_ids: Sequence[int], cpu_block_ids: Sequence[int]
    ) -> None:
        """Queues one layer's device -> host copies (from a connector's `save_kv_layer`).

        On CUDA the copy starts only after the work already queued on the current
        stream, e.g. this layer's attention writing the blocks.
        """
        layer_idx = self._checked_layer(layer_idx)
        with self._side_stream():
            plan = self._plan("out", device_block_ids, cpu_block_ids, self.num_device_blocks[layer_idx])
            self._queue_out(layer_idx, plan)

    def swap_in_layer(
        self, layer_idx: int, cpu_block_ids: Sequence[int], device_block_ids: Sequence[int]
    ) -> None:
        """Queues one layer's host -> device copies; pair with `wait_layer(layer_idx)`."""
        layer_idx = self._checked_layer(layer_idx)
        with self._side_stream():
            plan = self._plan("in", device_block_ids, cpu_block_ids, self.num_device_blocks[layer_idx])
            self._queue_in(layer_idx, plan)

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
        self._record(layer_idx)

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
        self._record(layer_idx)

    # ---- waiting ---------------------------------------------------------

    def wait_layer(self, layer_idx: int) -> None:
        """Makes the current stream wait for every copy queued so far for this layer.

        On CUDA this queues a wait on the layer's event (the host does not block);
        on CPU copies are already done.
        """
        layer_idx = self._checked_layer(layer_idx)
        if self._is_cuda:
            torch.cuda.current_stream(self.device).wait_event(self._layer_events[layer_idx])

    def wait_all(self) -> None:
        """Makes the current stream wait for every copy queued so far (no host block)."""
        if self._is_cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def synchronize(self) -> None:
        """Blocks the host until every queued copy is done (host buffers readable)."""
        if self._is_cuda:
            self._stream.synchronize()

    def query(self) -> bool:
        """True when every queued copy is done; never blocks."""
        return self._stream.query() if self._is_cuda else True

    # ---- helpers ---------------------------------------------------------

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[None]:
        if not self._is_cuda:
            yield
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            yield

    def _record(self, layer_idx: int) -> None:
        if self._is_cuda:
            self._layer_events[layer_idx].record(self._stream)

    def _checked_layer(self, layer_idx: int) -> int:
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer index {layer_idx} outside [0, {self.num_layers})")
        return layer_idx

    def _plan(
        self, direction: str, device_ids: Sequence[int], cpu_ids: Sequence[int], num_device_blocks: int
    ) -> _CopyPlan:
        """Validates a swap's ids and builds its plan; repeated per-layer calls reuse it.

        Must run on the side stream: the index tensor is uploaded there.
        """
        device_ids, cpu_ids = tuple(device_ids), tuple(cpu_ids)
        key = (device_ids, cpu_ids, num_device_blocks)
        cached = self._last_plans.get(direction)
        if cached is not None and cached[0] == key:
            return cached[1]
        if len(device_ids) != len(cpu_ids):
            raise ValueError(f"{len(device_ids)} device block ids vs {len(cpu_ids)} CPU block ids")
        swapping_in = direction == "in"
        device_ids = _checked_ids("device_block_ids", device_ids, num_device_blocks, unique=swapping_in)
        cpu_ids = _checked_ids("cpu_block_ids", cpu_ids, self.num_cpu_blocks, unique=not swapping_in)
        index = torch.tensor(device_ids, dtype=torch.int64)
        if self._is_cuda and device_ids:
            index = index.pin_memory().to(self.device, non_blocking=True)
        plan = _CopyPlan(len(device_ids), index, _cpu_runs(cpu_ids))
        self._last_plans[direction] = (key, plan)
        return plan


def bytes_per_block(layers: Sequence[torch.Tensor], block_dims: int | Sequence[int]) -> int:
    """KV bytes one block takes summed over layers (without building a swapper)."""
    if isinstance(block_dims, int):
        block_dims = [block_dims] * len(layers)
    return sum(math.prod(_per_block_shape(t, d)) * t.element_size() for t, d in zip(layers, block_dims))
