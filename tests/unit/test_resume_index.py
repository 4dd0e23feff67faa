"""The automatic resume's index: a new prompt finds exactly the paused prompts it
begins with and goes past, whatever their lengths against the block size, and
of those the one whose KV it shares most."""

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from infercept.adapter.interception import Interception, InterceptSpec
from infercept.adapter.resume_index import ResumeIndex, chained_block_hashes

BLOCK = 4


def paused_request(request_id: str, prompt: list[int], output: list[int], kv_tokens: int | None = None):
    tokens = prompt + output
    request = SimpleNamespace(request_id=request_id, all_token_ids=tokens, block_hashes=[])
    return Interception(request=request, spec=InterceptSpec(), paused_at_s=0.0,
                        num_kv_tokens=len(tokens) if kv_tokens is None else kv_tokens,
                        prompt_tokens=len(prompt))


# A small alphabet, so that prompts share prefixes of every length.
tokens = st.lists(st.integers(0, 2), max_size=14)
prompts = st.lists(st.integers(0, 2), min_size=1, max_size=14)


@settings(deadline=None, max_examples=200)
@given(paused=st.lists(st.tuples(prompts, tokens), max_size=12), removed=st.sets(st.integers(0, 11)),
       new=prompts)
def test_the_longest_continued_paused_request_is_found(paused, removed, new):
    index = ResumeIndex(BLOCK, hash_fn=None)
    held = [paused_request(str(i), prompt, output) for i, (prompt, output) in enumerate(paused)]
    for p in held:
        index.add(p)
    gone = removed & set(range(len(held)))
    for i in gone:
        index.remove(str(i))
        index.remove(str(i))  # twice: a no-op
    left = [p for i, p in enumerate(held) if i not in gone]

    found = index.candidates(new, chained_block_hashes(new, BLOCK, None))
    best = index.continued(new)

    continued = [p for p in left
                 if len(new) > p.prompt_tokens and new[:p.prompt_tokens] == p.request.all_token_ids[:p.prompt_tokens]]
    assert sorted(found) == sorted(p.request_id for p in continued)
    shared = {p.request_id: next((k for k, (a, b) in enumerate(zip(p.request.all_token_ids, new)) if a != b),
                                 min(len(p.request.all_token_ids), len(new))) for p in continued}
    if continued:
        assert best is not None and shared[best.request_id] == max(shared.values())
    else:
        assert best is None
    assert len(index) == len(left)


def test_a_skipped_or_uncomputed_prompt_is_not_taken():
    index = ResumeIndex(BLOCK, hash_fn=None)
    claimed = paused_request("claimed", [1, 2, 3, 4, 5], [6, 7])
    half = paused_request("half", [1, 2, 3, 4, 5], [6], kv_tokens=3)  # prompt's KV not all computed
    index.add(claimed)
    index.add(half)
    assert index.continued([1, 2, 3, 4, 5, 6, 7, 8], skip=lambda p: p is claimed) is None
    assert index.continued([1, 2, 3, 4, 5, 6, 7, 8]) is claimed


def test_removing_everything_leaves_nothing_filed():
    index = ResumeIndex(BLOCK, hash_fn=None)
    for i, prompt in enumerate([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 3, 4], [7]]):
        index.add(paused_request(str(i), prompt, [9]))
    for i in range(4):
        index.remove(str(i))
    assert len(index) == 0 and index._files == {}


def test_the_micro_benchmark_finds_each_arrivals_agent_both_ways():
    """benchmarks.auto_resume on real vLLM requests (its sha256 block hasher): the index
    and the scan it replaced return the arriving request's own paused agent."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    from benchmarks.auto_resume import HASH_BLOCK, measure

    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    row = measure(20, 100, 10, get_request_block_hasher(HASH_BLOCK, hash_fn), hash_fn)
    assert row["paused"] == 20 and row["index_us_p50"] > 0 and row["scan_us_p50"] > 0
