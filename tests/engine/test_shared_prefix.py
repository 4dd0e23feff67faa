"""Paused requests that share a prefix (a system prompt) with other requests.

The shared blocks stay resident whatever the policy does with the paused request, so
its memory figures count only its own blocks; a swap-out copies only those, and the
resume takes the shared ones back through the prefix cache, or, when they were
evicted meanwhile, recomputes from where the cache stops and lets the copy go.

Driven step by step with fake model outputs (`async_scheduler_harness`, async
scheduling, a token in flight at every pause) on a vLLM scheduler with prefix caching.
"""

from __future__ import annotations

import pytest
from async_scheduler_harness import BLOCK_SIZE, make_request, saves_in
from test_async_intercept_scheduler import (TOOL_TOKENS, assert_all_free, decode_to_the_end,
                                            env)  # noqa: F401  (env: the fixture)

SYSTEM = list(range(1, 4 * BLOCK_SIZE + 1))  # four full blocks, shared
SHARED_BLOCKS = len(SYSTEM) // BLOCK_SIZE
SUFFIX = list(range(300, 325))  # the paused agent's own turn
INTERCEPT_AFTER = 3
# Prompt plus the outputs whose KV is computed at the pause (the last one is in flight).
KV_AT_PAUSE = len(SYSTEM) + len(SUFFIX) + INTERCEPT_AFTER - 1
OWN_BLOCKS = -(-KV_AT_PAUSE // BLOCK_SIZE) - SHARED_BLOCKS


def start_holder(e, request_id: str = "a", max_tokens: int = 60):
    """Another agent on the same system prompt, decoding: it holds the shared blocks."""
    holder = make_request(request_id, SYSTEM + [200 + i for i in range(10)], max_tokens=max_tokens)
    e.scheduler.add_request(holder)
    e.runner.step()
    return holder


def pause_sharing(e, request_id: str = "r"):
    """An agent on the shared prompt, run to its pause (its stale step returned)."""
    s = e.scheduler
    request = make_request(request_id, SYSTEM + SUFFIX, max_tokens=64,
                           infercept={"intercept_after": INTERCEPT_AFTER})
    s.add_request(request)
    output = e.runner.step()
    # Its prompt's shared blocks came from the prefix cache.
    assert output.scheduled_new_reqs[0].num_computed_tokens == len(SYSTEM)
    while request_id not in s.intercepts:
        e.runner.step()
    e.runner.finish()  # the stale step
    assert s.intercepts[request_id].num_kv_tokens == KV_AT_PAUSE
    return request


def resume(e, paused, request_id: str = "q"):
    resumed = make_request(request_id, list(paused.all_token_ids) + TOOL_TOKENS, max_tokens=4,
                           infercept={"resume": paused.request_id})
    e.scheduler.add_request(resumed)
    return resumed


def test_swap_copies_only_the_blocks_no_one_else_holds(env):
    from infercept.policy import Location

    e = env("swap")
    s, swap = e.scheduler, e.swap
    holder = start_holder(e)
    paused = pause_sharing(e)
    held = e.block_ids("r")
    assert held[:SHARED_BLOCKS] == e.block_ids("a")[:SHARED_BLOCKS]
    free_before = e.free
    output = e.runner.schedule()  # the policy swaps it out
    intercept = s.intercepts["r"]
    assert intercept.location is Location.CPU and intercept.shared_tokens == len(SYSTEM)
    save = saves_in(output)["r"]
    assert save.src == held[SHARED_BLOCKS:SHARED_BLOCKS + OWN_BLOCKS]
    assert swap.bytes_swapped_out == OWN_BLOCKS * swap.block_bytes
    assert swap.allocator.num_free_blocks == swap.allocator.num_blocks - OWN_BLOCKS
    e.runner.finish(finished_sending={"r"})
    # vLLM freed what only it held (the in-flight slot's block included); the
    # system prompt stays with the other agent.
    assert e.free - free_before >= OWN_BLOCKS
    assert e.block_ids("a")[:SHARED_BLOCKS] == held[:SHARED_BLOCKS]
    assert s.kv_cache_manager.block_pool.blocks[held[0]].ref_cnt == 1

    resumed = resume(e, paused)
    output = e.runner.schedule()
    # The shared blocks come back through the prefix cache (its own full block too,
    # still cached); the copy fills the partly filled block.
    assert output.scheduled_new_reqs[0].num_computed_tokens == KV_AT_PAUSE
    assert e.block_ids("q")[:SHARED_BLOCKS] == held[:SHARED_BLOCKS]
    metadata = output.kv_connector_metadata
    loaded = [c for c in (*metadata.loads, *metadata.tail_loads)]
    assert [c.src for c in loaded] == [save.dst[OWN_BLOCKS - 1:]]
    assert s.policy_driver.stats.recomputed_tokens == 0
    e.runner.finish()
    decode_to_the_end(e, resumed, resumed.num_prompt_tokens, 4)
    decode_to_the_end(e, holder, len(holder.prompt_token_ids), 60)
    assert_all_free(e)


def test_a_copy_whose_shared_blocks_were_evicted_is_recomputed(env):
    """The other agent finishes and the prefix cache is emptied while the paused agent is
    swapped out: the copy, which starts after the system prompt, cannot be loaded onto
    nothing, so the resume recomputes its whole context and the copy is let go."""
    e = env("swap")
    s, swap = e.scheduler, e.swap
    holder = start_holder(e, max_tokens=8)
    paused = pause_sharing(e)
    e.runner.schedule()
    e.runner.finish(finished_sending={"r"})
    assert swap.num_uncopied_tokens("r") == len(SYSTEM)
    decode_to_the_end(e, holder, len(holder.prompt_token_ids), 8)
    e.runner.drain()
    assert s.kv_cache_manager.reset_prefix_cache()  # evicts every cached block
    assert swap.holds("r")

    resumed = resume(e, paused)
    output = e.runner.schedule()
    assert output.scheduled_new_reqs[0].num_computed_tokens == 0
    assert output.num_scheduled_tokens == {"q": resumed.num_prompt_tokens}
    metadata = output.kv_connector_metadata
    assert not metadata.loads and not metadata.tail_loads
    assert not swap.holds("q") and swap.bytes_swapped_in == 0
    stats = s.policy_driver.stats
    assert (stats.recomputed_tokens, stats.tokens_reused) == (KV_AT_PAUSE, 0)
    e.runner.finish()
    decode_to_the_end(e, resumed, resumed.num_prompt_tokens, 4)
    assert_all_free(e)


@pytest.mark.parametrize("policy", ["preserve", "discard"])
def test_memory_figures_count_only_own_blocks(env, policy):
    """Preserved, it keeps only its own blocks idle; discarded, it frees only those."""
    e = env(policy)
    s = e.scheduler
    holder = start_holder(e)
    paused = pause_sharing(e)
    held = e.block_ids("r")
    free_before = e.free
    e.runner.schedule()  # the policy acts
    e.runner.finish()
    intercept = s.intercepts["r"]
    if policy == "preserve":
        assert intercept.shared_tokens == len(SYSTEM)
        assert s.policy_driver.idle_device_tokens() == KV_AT_PAUSE - len(SYSTEM)
        assert s.infercept_state("r")["shared_kv_tokens"] == len(SYSTEM)
    else:
        assert s.policy_driver.idle_device_tokens() == 0
        assert e.free - free_before == len(held) - SHARED_BLOCKS
        assert e.block_ids("a")[:SHARED_BLOCKS] == held[:SHARED_BLOCKS]
    resumed = resume(e, paused)
    output = e.runner.schedule()
    # Discarded, its resume still finds the system prompt (and its own full blocks)
    # in the prefix cache.
    assert output.scheduled_new_reqs[0].num_computed_tokens >= len(SYSTEM)
    e.runner.finish()
    decode_to_the_end(e, resumed, resumed.num_prompt_tokens, 4)
    decode_to_the_end(e, holder, len(holder.prompt_token_ids), 60)
    assert_all_free(e)


# ---- the real engine: many agents on one system prompt, token-exact --------------------


@pytest.mark.parametrize("policy", ["swap", "min-waste"])
def test_agents_sharing_a_system_prompt(intercept_llm, stock, monkeypatch, policy):
    """Twelve agents on a 256-token system prompt (eight 32-token blocks), each with its
    own question and three tool calls. Every swap-out copies only the blocks nobody else
    holds (bytes swapped add up to them), freeing a paused request's device blocks frees
    exactly the ones only it held, never fewer than the policy counted on, and every
    segment equals stock vLLM's."""
    import random

    from kv_accounting import own_device_blocks, scheduler_of
    from scripted import Call, Script, check_equivalent, run_scripts
    from test_interception import BLOCK_BYTES

    llm = intercept_llm(policy)
    scheduler = scheduler_of(llm)
    driver, swap = scheduler.policy_driver, scheduler.policy_driver.swap
    pool = scheduler.kv_cache_manager.block_pool
    bytes_before = swap.bytes_swapped_out
    copied_blocks, left_out_blocks, frees = [], [], []

    def swap_out(key, device_block_ids, num_tokens, first_block=0):
        copied_blocks.append(-(-num_tokens // 32) - first_block)
        left_out_blocks.append(first_block)
        return original_swap_out(key, device_block_ids, num_tokens, first_block)

    def free_device(paused):
        own = own_device_blocks(llm, paused.request_id)
        seen_by_policy = -(-paused.own_kv_tokens // 32)
        free_before = pool.get_num_free_blocks()
        original_free_device(paused)
        frees.append((pool.get_num_free_blocks() - free_before, own, seen_by_policy))

    original_swap_out, original_free_device = swap.swap_out, driver._free_device
    monkeypatch.setattr(swap, "swap_out", swap_out)
    monkeypatch.setattr(driver, "_free_device", free_device)

    rng = random.Random(7)
    system = [rng.randrange(5, 400) for _ in range(256)]
    scripts = [Script(system + [rng.randrange(5, 400) for _ in range(rng.randint(10, 60))],
                      [Call(rng.randint(3, 8), [rng.randrange(5, 400) for _ in range(rng.randint(5, 40))],
                            rng.randint(1, 6)) for _ in range(3)], max_tokens=40)
               for _ in range(12)]
    sessions = run_scripts(llm, scripts)
    assert check_equivalent(stock, sessions) == 12 * 40
    if policy == "swap":
        assert len(copied_blocks) == 36  # every pause swapped out
    assert copied_blocks and frees
    assert swap.bytes_swapped_out - bytes_before == sum(copied_blocks) * BLOCK_BYTES
    # Agents paused beside others that held the system prompt left it out of their copy.
    assert max(left_out_blocks) == 8 and all(n <= 8 for n in left_out_blocks)
    # What a free gives back is what only it held; the policy never counted on more
    # (a holder of the prompt may have finished since it looked).
    assert all(freed == own >= seen_by_policy for freed, own, seen_by_policy in frees), frees
