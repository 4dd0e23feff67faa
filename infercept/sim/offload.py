"""vLLM 0.32's native CPU KV offloading (``--kv-offloading-size``), for the ``vllm-offload``
baseline: stock vLLM (every tool call ends the request) with a CPU tier behind its prefix
cache.

What vLLM does (paths under ``vllm/``; the rules and their citations in full are in
``docs/simulator.md``):

- Every full block of a request's *prompt* is written to the CPU tier once the step that
  computes it has run (``offload_prompt_only`` is on by default: decode KV and a prompt's
  partly filled last block are never written; ``v1/kv_offload/base.py``,
  ``offloading/scheduler.py``). A block already in the tier is not written again; a
  request that found nothing in the tier also writes the blocks its GPU prefix-cache hit
  gave it.
- The tier holds ``cpu_bytes_to_use / bytes per block`` blocks and evicts least recently
  used first (``v1/kv_offload/cpu/policies/lru.py``, the default). A block's recency is set
  when it is written; when a request finishes, every block it loaded or wrote is made
  recent again, its first block the most recent (so a finished request's blocks leave the
  tier last block first). Lookups do not touch recency. A request's write of a step is all
  or nothing: without room for all of it, nothing is written (it is offered again next
  step).
- A new request's lookup (``get_num_new_matched_tokens``) counts the blocks the tier holds
  consecutively from the end of its GPU prefix-cache hit. A hit is always loaded
  asynchronously: the request takes its GPU blocks at once and waits, without taking any
  of the step's tokens, until the copy (after this step's forward pass, at PCIe speed,
  overlapping later steps) is reported done; it is then scheduled like a request whose
  prefix was cached.

The model keeps what survives as runs, as ``DevicePool`` does: per session, the blocks of
its own prompt that the tier holds (a run starting where its shared system prompt ends),
and per shared system prompt its blocks; a run's blocks are evicted last first. Not
modelled: a write becoming visible only a step after it is issued (a lookup in between is
deferred by vLLM; here the blocks are already there), PCIe contention between writes and
loads, and the stalls vLLM takes when a freed block that a pending write reads is reused.
"""

from __future__ import annotations

from collections import OrderedDict


class CpuTier:
    """The CPU tier's blocks, as runs keyed by a session or a shared prompt, in LRU order
    (least recent first)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError("a CPU tier holds at least 0 blocks")
        self.num_blocks = num_blocks
        self.num_used_blocks = 0
        self._runs: OrderedDict[str, int] = OrderedDict()  # key -> blocks held, LRU first
        self.num_written_blocks = 0
        self.num_loaded_blocks = 0
        self.num_evicted_blocks = 0
        self.num_dropped_writes = 0

    def blocks_of(self, key: str) -> int:
        return self._runs.get(key, 0)

    def write(self, key: str, start: int, end: int, pinned: tuple[str, ...] = ()) -> bool:
        """Blocks ``[start, end)`` of run ``key`` were computed: add those it lacks (a run
        grows only at its end; blocks past a gap are not kept). All or nothing: False
        when the tier cannot make room without evicting ``pinned`` runs."""
        have = self._runs.get(key, 0)
        if start > have or end <= have:
            if key in self._runs and end > start:
                self._runs.move_to_end(key)
            return True
        need = end - have
        if need > self.num_blocks - self.num_used_blocks + self._evictable(pinned + (key,)):
            self.num_dropped_writes += 1
            return False
        self._make_room(need, pinned + (key,))
        self._runs[key] = end
        self._runs.move_to_end(key)
        self.num_used_blocks += need
        self.num_written_blocks += need
        return True

    def loaded(self, key: str, num_blocks: int) -> None:
        self.num_loaded_blocks += num_blocks

    def touch(self, keys: tuple[str, ...]) -> None:
        """A request finished: its runs become the most recent, the first key last (most
        recent), as vLLM re-ranks the blocks a finished request used."""
        for key in reversed(keys):
            if key in self._runs:
                self._runs.move_to_end(key)

    def _evictable(self, pinned: tuple[str, ...]) -> int:
        return self.num_used_blocks - sum(self._runs.get(key, 0) for key in set(pinned))

    def _make_room(self, need: int, pinned: tuple[str, ...]) -> None:
        short = need - (self.num_blocks - self.num_used_blocks)
        victims = []
        for key, n in self._runs.items():  # least recent first
            if short <= 0:
                break
            if key in pinned:
                continue
            taken = min(n, short)
            victims.append((key, n, taken))
            short -= taken
        for key, n, taken in victims:
            self.num_evicted_blocks += taken
            self.num_used_blocks -= taken
            if taken == n:
                del self._runs[key]
            else:
                self._runs[key] = n - taken  # its last blocks go first

    def check(self) -> None:
        assert self.num_used_blocks == sum(self._runs.values()) <= self.num_blocks
        assert all(n > 0 for n in self._runs.values())
