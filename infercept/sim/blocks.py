"""KV memory of one replica, in blocks: the device pool with vLLM's prefix cache, and CPU.

vLLM 0.32's block pool keeps every free block in one queue; a freed request's full blocks
stay cached (reusable by a request with the same prefix) until the queue hands them out
again, least recently freed first. A request's blocks are freed last block first, so
eviction eats a cached prefix from its tail and what survives is still a prefix.

``DevicePool`` models that queue as runs of blocks: an anonymous run (nothing reusable),
or a request's cached full blocks, keyed by the request (its session).

Requests may also share a prefix (a common system prompt, ``Request.shared_prefix_key``):
its blocks are one entry held by every request that uses it (vLLM's ref counts), grown
by the request that computes it first, and cached as one run once the last holder lets
go. A request's own blocks follow the shared ones; its own cached run starts where its
shared blocks ended. Simplification: a prefix's blocks leave the device only with its
last holder (vLLM frees the blocks that only a leaving holder references, which differs
only when a request arrived while the prefix was still being computed and shares fewer
of its blocks).
"""

from __future__ import annotations

from collections import deque


class _Run:
    __slots__ = ("key", "num_blocks")

    def __init__(self, key: str | None, num_blocks: int) -> None:
        self.key = key
        self.num_blocks = num_blocks


class _Prefix:
    """A shared prefix's blocks while requests hold them: ``num_full`` of its
    ``num_blocks`` are full and hashed (what a new holder finds)."""

    __slots__ = ("num_blocks", "num_full", "holders")

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.num_full = num_blocks
        self.holders = 0


def _prefix_cache_key(key: str) -> str:
    return "\0prefix:" + key


class DevicePool:
    """Device blocks: free ones (some of them cached prefixes) and allocated ones."""

    def __init__(self, num_blocks: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("a device pool needs at least one block")
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.num_free_blocks = num_blocks  # cached blocks count as free (evictable)
        self._queue: deque[_Run] = deque([_Run(None, num_blocks)])
        self._cached: dict[str, _Run] = {}
        self._prefixes: dict[str, _Prefix] = {}  # shared prefixes someone holds

    # ---- shared prefixes -------------------------------------------------------

    def prefix_hit_blocks(self, key: str) -> int:
        """Full blocks of shared prefix ``key`` that a new holder finds: held, or cached."""
        entry = self._prefixes.get(key)
        if entry is not None:
            return entry.num_full
        return self.num_cached_blocks(_prefix_cache_key(key)) if self.prefix_caching else 0

    def prefix_is_held(self, key: str) -> bool:
        return key in self._prefixes

    def prefix_holders(self, key: str) -> int:
        entry = self._prefixes.get(key)
        return entry.holders if entry else 0

    def prefix_blocks(self, key: str) -> int:
        """Blocks the entry of a held prefix spans (0 when nobody holds it)."""
        entry = self._prefixes.get(key)
        return entry.num_blocks if entry else 0

    def acquire_prefix(self, key: str, max_blocks: int) -> int:
        """Become a holder of ``key``: its held blocks, or its cached run taken back
        from the free queue; returns how many of its blocks (at most ``max_blocks``)
        the new holder shares."""
        entry = self._prefixes.get(key)
        if entry is None:
            taken = self.take_cached(_prefix_cache_key(key), max_blocks) if self.prefix_caching else 0
            entry = self._prefixes[key] = _Prefix(taken)
        entry.holders += 1
        return min(entry.num_full, max_blocks)

    def extend_prefix(self, key: str, num_blocks: int, num_full: int) -> None:
        """The holder computing the prefix took ``num_blocks`` more blocks for it (already
        allocated); ``num_full`` of the entry's blocks are full once this step runs."""
        entry = self._prefixes[key]
        entry.num_blocks += num_blocks
        entry.num_full = max(entry.num_full, min(num_full, entry.num_blocks))

    def release_prefix(self, key: str) -> None:
        """A holder lets go; the last one returns the blocks, its full ones cached."""
        entry = self._prefixes[key]
        entry.holders -= 1
        if entry.holders:
            return
        del self._prefixes[key]
        if entry.num_blocks:
            self._release(_prefix_cache_key(key), entry.num_blocks, entry.num_full)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def num_cached_blocks(self, key: str) -> int:
        """Full blocks of ``key``'s prefix that are still cached."""
        run = self._cached.get(key)
        return run.num_blocks if run else 0

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> bool:
        """Take ``num_blocks`` from the head of the free queue, evicting what they cache."""
        if num_blocks > self.num_free_blocks:
            return False
        self.num_free_blocks -= num_blocks
        queue = self._queue
        while num_blocks:
            run = queue[0]
            taken = min(run.num_blocks, num_blocks)
            run.num_blocks -= taken
            num_blocks -= taken
            if run.num_blocks == 0:
                queue.popleft()
                if run.key is not None and self._cached.get(run.key) is run:
                    del self._cached[run.key]
        return True

    def take_cached(self, key: str, max_blocks: int) -> int:
        """Reuse up to ``max_blocks`` of ``key``'s cached prefix (a prefix-cache hit);
        returns how many. Cached blocks beyond them lose their cache entry."""
        run = self._cached.pop(key, None)
        if run is None:
            return 0
        hit_blocks = min(run.num_blocks, max_blocks)
        run.num_blocks -= hit_blocks
        run.key = None
        self.num_free_blocks -= hit_blocks
        return hit_blocks

    def free(self, key: str, num_blocks: int, num_full_blocks: int) -> None:
        """Return a request's ``num_blocks``; its first ``num_full_blocks`` (full ones) stay
        cached under ``key`` when prefix caching is on. The tail goes in first."""
        self._release(key, num_blocks, num_full_blocks)

    def _release(self, key: str, num_blocks: int, num_full_blocks: int) -> None:
        if not 0 <= num_full_blocks <= num_blocks:
            raise ValueError(f"cannot cache {num_full_blocks} of {num_blocks} blocks")
        if num_blocks > self.num_used_blocks:
            raise ValueError(f"freeing {num_blocks} blocks, only {self.num_used_blocks} used")
        self.num_free_blocks += num_blocks
        cached = num_full_blocks if self.prefix_caching else 0
        self.forget(key)
        self._append(None, num_blocks - cached)
        if cached:
            run = _Run(key, cached)
            self._queue.append(run)
            self._cached[key] = run

    def forget(self, key: str) -> None:
        """Drop ``key``'s cache entry; its blocks stay free, anonymous."""
        run = self._cached.pop(key, None)
        if run is not None:
            run.key = None

    def _append(self, key: None, num_blocks: int) -> None:
        if num_blocks == 0:
            return
        tail = self._queue[-1] if self._queue else None
        if tail is not None and tail.key is None:
            tail.num_blocks += num_blocks
        else:
            self._queue.append(_Run(key, num_blocks))

    def check(self) -> None:
        """Raise AssertionError if the queue and the free count disagree."""
        queued = sum(run.num_blocks for run in self._queue)
        assert queued == self.num_free_blocks, (queued, self.num_free_blocks)
        assert 0 <= self.num_free_blocks <= self.num_blocks
        for key, run in self._cached.items():
            assert run.key == key and run.num_blocks > 0
        for key, entry in self._prefixes.items():
            assert entry.holders > 0 and 0 <= entry.num_full <= entry.num_blocks, key
            assert _prefix_cache_key(key) not in self._cached, key

    def held_prefixes(self) -> dict[str, int]:
        """Shared prefixes someone holds, with their number of holders."""
        return {key: entry.holders for key, entry in self._prefixes.items()}

    @property
    def num_prefix_blocks(self) -> int:
        """Blocks held by shared-prefix entries."""
        return sum(entry.num_blocks for entry in self._prefixes.values())


class CpuPool:
    """CPU swap space in blocks (no cache: a swapped copy belongs to one request)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.num_used_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self.num_used_blocks

    def allocate(self, num_blocks: int) -> bool:
        if num_blocks > self.num_free_blocks:
            return False
        self.num_used_blocks += num_blocks
        return True

    def free(self, num_blocks: int) -> None:
        if num_blocks > self.num_used_blocks:
            raise ValueError(f"freeing {num_blocks} CPU blocks, only {self.num_used_blocks} used")
        self.num_used_blocks -= num_blocks
