"""Moving a paused request's device blocks to the request that resumes it.

This reaches into vLLM 0.32's KV cache manager: each single-type manager
keeps per-request bookkeeping in dicts keyed by request id (`req_to_blocks`,
`num_cached_block`, ...). A resume re-keys that bookkeeping from the paused
request's id to the resuming one's, so the blocks change owner without being
freed, copied or re-hashed. `tests/engine/test_vllm_internals.py` fails
loudly if the layout changes.
"""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix_len(a: Sequence[int], b: Sequence[int], limit: int, start: int = 0) -> int:
    """Length of the common prefix of `a` and `b`, at most `limit`; the first
    `start` tokens are known to be equal."""
    n = min(limit, len(a), len(b))
    for i in range(start, n):
        if a[i] != b[i]:
            return i
    return n


def _per_request_dicts(manager) -> list[dict]:
    return [
        value
        for value in vars(manager).values()
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value)
    ]


def transfer(kv_cache_manager, old_request_id: str, new_request_id: str) -> int:
    """Give `old_request_id`'s blocks to `new_request_id`; returns how many moved."""
    moved = 0
    for manager in kv_cache_manager.coordinator.single_type_managers:
        if new_request_id in manager.req_to_blocks:
            raise RuntimeError(f"request {new_request_id} already holds blocks")
        moved += len(manager.req_to_blocks.get(old_request_id, ()))
        for table in _per_request_dicts(manager):
            if old_request_id in table:
                table[new_request_id] = table.pop(old_request_id)
    return moved


def num_shared_blocks(kv_cache_manager, request_id: str) -> int:
    """How many of the request's first blocks other requests hold too (ref_cnt > 1).

    Blocks are shared through the prefix cache, so whoever holds a request's
    block i holds its blocks before i too: ref counts do not grow along a
    request's blocks, and the shared run is found by bisection, O(log blocks).
    Freeing the request would not free these blocks. With several KV cache
    groups (sliding-window layers beside full attention), the fewest of any
    group; a sliding window's null blocks hold no memory and count as shared.
    """
    shared = None
    for manager in kv_cache_manager.coordinator.single_type_managers:
        req_blocks = manager.req_to_blocks.get(request_id, ())
        low, high = 0, len(req_blocks)
        while low < high:
            mid = (low + high) // 2
            if req_blocks[mid].is_null or req_blocks[mid].ref_cnt > 1:
                low = mid + 1
            else:
                high = mid
        shared = low if shared is None else min(shared, low)
    return shared or 0


def num_groups(kv_cache_manager) -> int:
    return len(kv_cache_manager.coordinator.single_type_managers)


def group_block_ids(groups) -> list[list[int | None]]:
    """Block ids per KV cache group, None for a sliding window's null blocks."""
    return [[None if block.is_null else block.block_id for block in group] for group in groups]


def block_ids(kv_cache_manager, request_id: str) -> list[list[int | None]]:
    """The request's device block ids, per KV cache group (None: a null block)."""
    return group_block_ids(manager.req_to_blocks.get(request_id, ())
                           for manager in kv_cache_manager.coordinator.single_type_managers)


def truncate(kv_cache_manager, request_id: str, num_tokens: int, block_size: int) -> tuple[int, list]:
    """Keep only the blocks that hold the request's first `num_tokens` tokens.

    The block where the kept prefix ends is kept only if nobody else can read
    it (not in the prefix cache, not shared): the tokens after the prefix will
    be overwritten in it. Returns the number of tokens kept and the blocks let
    go, for the caller to free (vLLM's fence may hold them a step longer).
    """
    [manager] = kv_cache_manager.coordinator.single_type_managers
    req_blocks = manager.req_to_blocks[request_id]
    keep = -(-num_tokens // block_size)
    if num_tokens % block_size:
        last = req_blocks[keep - 1]
        if last.block_hash is not None or last.ref_cnt > 1:
            keep -= 1
            num_tokens = keep * block_size
    tail = req_blocks[keep:]
    del req_blocks[keep:]
    if request_id in manager.num_cached_block:
        manager.num_cached_block[request_id] = min(manager.num_cached_block[request_id], keep)
    return num_tokens, tail
