"""Paused requests by their prompt, for the automatic resume.

A new request resumes a paused one when its prompt begins with the paused
request's whole prompt and goes on (a client sending the conversation back
with the tool's result appended). With N paused agents sharing a long system
prompt, comparing token lists costs O(N * L) per arriving request on the
engine core's thread; this index costs O(the new prompt's blocks), plus the
paused requests whose prompt is exactly the new prompt's beginning.

A paused prompt is filed under the chained hash of its last full block (the
hash that fingerprints its whole prefix up to there: vLLM's prefix-caching
`block_hashes`) and the tokens after that block, fewer than a block. A new
prompt looks up each of its own full blocks' hashes and, under each, the tails
filed there: one dict lookup per block plus one per distinct tail length.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from infercept.adapter import blocks
from infercept.adapter.interception import Interception


def chained_block_hashes(token_ids: Sequence[int], block_size: int,
                         hash_fn: Callable[[Any], bytes] | None,
                         computed: Sequence[Hashable] = ()) -> Sequence[Hashable]:
    """Chained hashes of the full blocks of `token_ids`: `computed` (a vLLM
    request's `block_hashes`) where it covers them, else made as vLLM makes
    them with `hash_fn` (its prefix-caching hash; the same values for a request
    without LoRA, multimodal inputs or cache salt), or with Python's `hash`
    where vLLM hashes nothing (`hash_fn` None)."""
    num_blocks = len(token_ids) // block_size
    if len(computed) >= num_blocks:
        return computed
    if hash_fn is not None:
        from vllm.v1.core.kv_cache_utils import hash_block_tokens
    hashes: list[Hashable] = []
    parent = None
    for start in range(0, num_blocks * block_size, block_size):
        block = token_ids[start:start + block_size]
        parent = (hash_block_tokens(hash_fn, parent, block) if hash_fn is not None
                  else hash((parent, tuple(block))))
        hashes.append(parent)
    return hashes


class ResumeIndex:
    def __init__(self, block_size: int, hash_fn: Callable[[Any], bytes] | None) -> None:
        self.block_size = block_size
        self.hash_fn = hash_fn
        # anchor (hash of the last full block, None below one block) ->
        # tail length -> tail tokens -> request ids
        self._files: dict[Hashable, dict[int, dict[tuple[int, ...], set[str]]]] = {}
        self._paused: dict[str, tuple[Interception, Hashable, tuple[int, ...]]] = {}

    def __len__(self) -> int:
        return len(self._paused)

    def block_hashes(self, token_ids: Sequence[int],
                     computed: Sequence[Hashable] = ()) -> Sequence[Hashable]:
        # Where vLLM hashes nothing, a request's own hashes (a test's) are not used
        # either: every key the index holds is made the same way.
        return chained_block_hashes(token_ids, self.block_size, self.hash_fn,
                                    computed if self.hash_fn is not None else ())

    def add(self, paused: Interception) -> None:
        """File a paused request by its prompt (`paused.prompt_tokens` of its tokens)."""
        request = paused.request
        prompt = request.all_token_ids[:paused.prompt_tokens]
        full = len(prompt) // self.block_size
        anchor = self.block_hashes(prompt, request.block_hashes)[full - 1] if full else None
        tail = tuple(prompt[full * self.block_size:])
        by_tail = self._files.setdefault(anchor, {}).setdefault(len(tail), {})
        by_tail.setdefault(tail, set()).add(paused.request_id)
        self._paused[paused.request_id] = (paused, anchor, tail)

    def remove(self, request_id: str) -> None:
        filed = self._paused.pop(request_id, None)
        if filed is None:
            return
        _, anchor, tail = filed
        by_length = self._files[anchor]
        by_tail = by_length[len(tail)]
        by_tail[tail].discard(request_id)
        if not by_tail[tail]:
            del by_tail[tail]
            if not by_tail:
                del by_length[len(tail)]
                if not by_length:
                    del self._files[anchor]

    def candidates(self, prompt_token_ids: Sequence[int],
                   block_hashes: Sequence[Hashable]) -> list[str]:
        """Paused requests whose whole prompt `prompt_token_ids` begins with and
        goes past, up to hash equality; `block_hashes` cover the prompt's full
        blocks."""
        n = len(prompt_token_ids)
        found: list[str] = []
        for full in range(n // self.block_size + 1):
            by_length = self._files.get(block_hashes[full - 1] if full else None)
            if by_length is None:
                continue
            start = full * self.block_size
            for length, by_tail in by_length.items():
                if start + length < n:
                    found.extend(by_tail.get(tuple(prompt_token_ids[start:start + length]), ()))
        return found

    def continued(self, prompt_token_ids: Sequence[int], block_hashes: Sequence[Hashable] = (),
                  skip: Callable[[Interception], bool] = lambda paused: False,
                  ) -> Interception | None:
        """The paused request `prompt_token_ids` continues: its whole prompt and
        more, its prompt's KV computed; of several, the one whose KV covers the
        longest common prefix. `block_hashes`: vLLM's for this prompt, if any."""
        if not self._paused:
            return None
        hashes = self.block_hashes(prompt_token_ids, block_hashes)
        best, best_len = None, 0
        for request_id in self.candidates(prompt_token_ids, hashes):
            paused = self._paused[request_id][0]
            prompt_len, kv_len = paused.prompt_tokens, paused.num_kv_tokens
            if kv_len < prompt_len or skip(paused):
                continue
            tokens = paused.request.all_token_ids
            # vLLM's hashes are cryptographic (it shares KV on them); Python's are not.
            if self.hash_fn is None and tokens[:prompt_len] != list(prompt_token_ids[:prompt_len]):
                continue  # a hash collision
            common = blocks.common_prefix_len(tokens, prompt_token_ids, kv_len, start=prompt_len)
            if common > best_len:
                best, best_len = paused, common
        return best
