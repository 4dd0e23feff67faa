"""Scheduler side of the swap connector: which blocks move where, each step.

Pure Python (no torch): it owns the CPU block allocator and turns the
scheduler's decisions (swap this paused request out, load that resuming one
back) into the block copies of one step's `SwapMetadata`.

A save is asynchronous: its device blocks stay with the paused request, and its
CPU blocks stay allocated, until every worker reports it done (`save_done`). A
load's CPU blocks are reused only from the step after the one that reads them,
when every later step is ordered after the load.

A request's device blocks come as one list per KV cache group (sliding-window
layers beside full attention), None where a sliding window dropped a block (vLLM's
null block). Every group's blocks are ids in the same pages (vLLM's hybrid manager
gives each group a share of one set of tensors), so a copy of block b moves b's
page whichever group owns it, and one `BlockCopies` serves all groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from infercept.adapter.swap_metadata import BlockCopies, SwapMetadata
from infercept.swap.allocator import CpuBlockAllocator


GroupBlockIds = list[list["int | None"]]  # per KV cache group, per block position


@dataclass
class SwappedKV:
    """A paused request's CPU copy of its first `num_tokens` tokens: `cpu[g][i]` holds
    block i of group g, None where nothing was copied (a sliding window's dropped
    block, or one of the first `first_block` blocks, which were shared with other
    requests when it was swapped out and come back through the prefix cache, or the
    copy is let go). `truncated`: a resume kept only part of it."""

    cpu: GroupBlockIds
    num_tokens: int
    first_block: int = 0
    truncated: bool = False

    @property
    def cpu_block_ids(self) -> list[int]:
        return [c for group in self.cpu for c in group if c is not None]


def _num_blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class SwapPlanner:
    def __init__(self, num_cpu_blocks: int, block_size: int, block_bytes: int,
                 emulating: bool = False):
        self.allocator = CpuBlockAllocator(num_cpu_blocks)
        self.emulating = emulating
        self.block_size = block_size
        self.block_bytes = block_bytes
        self.bytes_swapped_out = 0
        self.bytes_swapped_in = 0
        self._swapped: dict[str, SwappedKV] = {}
        self._local_hits: dict[str, int] = {}
        self._step = SwapMetadata()
        self._free_after_step: list[int] = []
        self._free_now: list[int] = []
        # Saves the workers have not reported done: key -> CPU blocks to free then
        # (empty while the copy is still wanted).
        self._saving: dict[str, list[int]] = {}

    @property
    def num_free_cpu_tokens(self) -> int:
        return self.allocator.num_free_blocks * self.block_size

    def holds(self, key: str) -> bool:
        return key in self._swapped

    def num_swapped_tokens(self, key: str) -> int:
        swapped = self._swapped.get(key)
        return swapped.num_tokens if swapped else 0

    def num_uncopied_tokens(self, key: str) -> int:
        """Tokens at the front of `key`'s KV that its CPU copy leaves to the prefix cache."""
        swapped = self._swapped.get(key)
        return swapped.first_block * self.block_size if swapped else 0

    def swap_out(self, key: str, device_blocks: GroupBlockIds, num_tokens: int,
                 first_block: int = 0) -> bool:
        """Copy each group's blocks of the first `num_tokens` tokens to CPU, from block
        `first_block` on (the blocks before it are shared and stay resident), from
        this step on; False, with nothing done, when the CPU space is short.

        The caller keeps the device blocks until `save_done(key)`: the copy may
        run alongside this and later steps' forward passes.
        """
        if key in self._swapped or key in self._saving:
            raise RuntimeError(f"{key} is already swapped out")
        num_blocks = _num_blocks(num_tokens, self.block_size)
        if not 0 <= first_block <= num_blocks:
            raise ValueError(f"first_block {first_block} outside 0..{num_blocks}")
        wanted = [[i for i in range(first_block, min(num_blocks, len(ids))) if ids[i] is not None]
                  for ids in device_blocks]
        count = sum(len(positions) for positions in wanted)
        if not self.allocator.can_allocate(count):
            return False
        fresh = iter(self.allocator.allocate(count))
        cpu: GroupBlockIds = []
        src, dst = [], []
        for ids, positions in zip(device_blocks, wanted):
            group: list[int | None] = [None] * num_blocks
            for i in positions:
                group[i] = next(fresh)
                src.append(ids[i])
                dst.append(group[i])
            cpu.append(group)
        self._step.saves.append(BlockCopies(src, dst, tag=key))
        self._swapped[key] = SwappedKV(cpu, num_tokens, first_block)
        self._saving[key] = []
        self.bytes_swapped_out += count * self.block_bytes
        return True

    def is_saving(self, key: str) -> bool:
        """Whether a save of `key`'s blocks is queued and not yet reported done."""
        return key in self._saving

    def has_saves_in_flight(self) -> bool:
        return bool(self._saving)

    def save_done(self, key: str) -> bool:
        """Every worker finished `key`'s save; False if it was not ours."""
        abandoned = self._saving.pop(key, None)
        if abandoned is None:
            return False
        if abandoned:
            self.allocator.free(abandoned)
        return True

    def rekey(self, key: str, new_key: str, num_valid_tokens: int) -> None:
        """A resuming request takes over a paused one's CPU copy.

        Only its first `num_valid_tokens` tokens are loadable (the common
        prefix of the old and new token sequences).
        """
        swapped = self._swapped.pop(key)
        if num_valid_tokens < swapped.num_tokens:
            swapped.num_tokens, swapped.truncated = num_valid_tokens, True
        self._swapped[new_key] = swapped

    def num_loadable_tokens(self, key: str, num_computed_tokens: int) -> int:
        """Tokens of `key`'s copy to load after a local prefix-cache hit of
        `num_computed_tokens`; 0 when the hit stops short of the copy (the shared
        blocks it left on the device were evicted meanwhile): vLLM's computed
        tokens are a prefix, so the request recomputes from the hit instead."""
        swapped = self._swapped.get(key)
        if swapped is None or num_computed_tokens < swapped.first_block * self.block_size:
            return 0
        if swapped.truncated and len(swapped.cpu) > 1:
            # A sliding window's blocks before the new end may have been dropped
            # before the copy was made: it cannot restore them.
            return 0
        self._local_hits[key] = num_computed_tokens
        return max(0, swapped.num_tokens - num_computed_tokens)

    def plan_load(self, key: str, device_blocks: GroupBlockIds, num_tokens: int) -> None:
        """Load `num_tokens` tokens after the local hit into each group's blocks.

        A device block with no copy is one a sliding window had dropped before the
        save: it lies out of the window of every token still to compute, and is
        never read (vLLM drops it again at the request's next allocation)."""
        swapped = self._swapped.pop(key)
        start_tokens = self._local_hits.pop(key, 0)
        first = start_tokens // self.block_size  # local hits are whole blocks
        full = (start_tokens + num_tokens) // self.block_size
        last = _num_blocks(start_tokens + num_tokens, self.block_size)
        if first < swapped.first_block:
            raise RuntimeError(f"{key}: loading from block {first}, its copy starts at "
                               f"{swapped.first_block}")
        moved = 0
        # A partly filled last block is also written by the step: it lands first.
        for queue, begin, end in ((self._step.loads, first, full),
                                  (self._step.tail_loads, full, last)):
            src, dst = [], []
            for cpu, device in zip(swapped.cpu, device_blocks):
                for i in range(begin, min(end, len(cpu), len(device))):
                    if cpu[i] is not None and device[i] is not None:
                        src.append(cpu[i])
                        dst.append(device[i])
            if src:
                queue.append(BlockCopies(src, dst))
            moved += len(src)
        self.bytes_swapped_in += moved * self.block_bytes
        self._free_after_step.extend(swapped.cpu_block_ids)

    def prefetch(self, key: str, device_blocks: GroupBlockIds, num_computed_tokens: int = 0) -> int:
        """Load a paused request's CPU copy into `device_block_ids` now, after the
        `num_computed_tokens` that the prefix cache gave back; returns the tokens
        its blocks then hold."""
        swapped = self._swapped[key]
        self._local_hits[key] = num_computed_tokens
        self.plan_load(key, device_blocks, max(0, swapped.num_tokens - num_computed_tokens))
        return max(swapped.num_tokens, num_computed_tokens)

    def release(self, key: str) -> None:
        """Forget a request's CPU copy (finished, aborted or discarded)."""
        self._local_hits.pop(key, None)
        swapped = self._swapped.pop(key, None)
        if swapped is None:
            return
        if key in self._saving:
            # A save still writes them: reuse them once it is done.
            self._saving[key] = swapped.cpu_block_ids
            self._step.abandoned.append(key)
        else:
            self._free_after_step.extend(swapped.cpu_block_ids)

    def take_step(self) -> SwapMetadata:
        """This step's copies; CPU blocks read or written by the last step are freed."""
        if self._free_now:
            self.allocator.free(self._free_now)
        self._free_now, self._free_after_step = self._free_after_step, []
        step, self._step = self._step, SwapMetadata()
        return step

    def num_pending_free_blocks(self) -> int:
        """CPU blocks that no copy owns any more, not yet free (a step, or a save, away)."""
        return (len(self._free_now) + len(self._free_after_step)
                + sum(len(ids) for ids in self._saving.values()))

    def has_pending_work(self) -> bool:
        """Saves to hear back from, or CPU blocks still to free: keep stepping."""
        return bool(self._saving or self._free_now or self._free_after_step)
