"""Host (CPU) block ids for swapped-out KV caches.

Pure Python, no torch: the scheduler side decides which CPU blocks a swap-out
writes to, and the worker side (`LayerwiseSwapper`) only copies.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable


class CpuBlocksExhaustedError(RuntimeError):
    """Raised by `CpuBlockAllocator.allocate` when too few blocks are free."""


class CpuBlockAllocator:
    """Hands out CPU block ids in [0, num_blocks).

    `allocate` raises `CpuBlocksExhaustedError` when short (check `can_allocate`
    first); it never hands out part of a request. The lowest free ids go first,
    so one request's blocks tend to form consecutive runs, which the swapper
    moves with one transfer per run. `free` validates every id before releasing
    any, so a bad call leaves the allocator unchanged.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free_ids = list(range(num_blocks))  # a sorted list is a valid heap
        self._used_ids: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_ids)

    @property
    def num_used_blocks(self) -> int:
        return len(self._used_ids)

    def can_allocate(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= len(self._free_ids)

    def allocate(self, num_blocks: int) -> list[int]:
        """Returns `num_blocks` distinct free ids, lowest first."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > len(self._free_ids):
            raise CpuBlocksExhaustedError(
                f"asked for {num_blocks} CPU blocks, "
                f"{len(self._free_ids)} of {self.num_blocks} free"
            )
        block_ids = [heapq.heappop(self._free_ids) for _ in range(num_blocks)]
        self._used_ids.update(block_ids)
        return block_ids

    def free(self, block_ids: Iterable[int]) -> None:
        """Returns ids to the pool; raises ValueError on unknown, free or repeated ids."""
        block_ids = list(block_ids)
        seen: set[int] = set()
        for block_id in block_ids:
            if block_id in seen:
                raise ValueError(f"CPU block {block_id} appears twice in one free()")
            if not (isinstance(block_id, int) and 0 <= block_id < self.num_blocks):
                raise ValueError(f"unknown CPU block id {block_id!r}")
            if block_id not in self._used_ids:
                raise ValueError(f"CPU block {block_id} is already free")
            seen.add(block_id)
        for block_id in block_ids:
            self._used_ids.remove(block_id)
            heapq.heappush(self._free_ids, block_id)
