"""Interception at tensor parallelism 2: every policy token-exact against stock vLLM, nothing leaked.

Each of the two workers holds half of every block (one of the tiny model's
two KV heads); the swap connector in each moves its own half. A worker that
did not would hand the resumed request garbage for its heads, and the tokens
would no longer equal stock vLLM's (which runs at tensor parallelism 1: greedy
output is the same on the CPU build).
"""

from __future__ import annotations

import pytest
from conftest import EMULATE_LAG, engine_kwargs
from scripted import check_equivalent, random_scripts
from tensor_parallel import TensorParallelEngine
from test_interception import BLOCK_BYTES, POLICIES


@pytest.fixture(scope="module")
def tp_engine(tiny_model):
    kwargs = engine_kwargs(tiny_model, kv_cache_bytes=16 * BLOCK_BYTES, max_model_len=960,
                           tensor_parallel_size=2, distributed_executor_backend="mp")
    # Built with the swap connector; the policy is switched per run.
    engine = TensorParallelEngine({**kwargs, "intercept_policy": "swap", "swap_space_bytes": 8 * BLOCK_BYTES,
                                   "profile_at_startup": False, "emulate_async_copies": EMULATE_LAG})
    yield engine
    engine.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_at_tensor_parallel_2(tp_engine, stock, policy):
    scripts = random_scripts(4, seed=11, prompt_tokens=(60, 160), calls=(1, 3), result_tokens=(0, 20),
                             steps=(1, 6), max_tokens=24)
    result = tp_engine.run(policy, scripts)
    assert check_equivalent(stock, result["sessions"]) == 24 * len(scripts)
    assert result["left"] == []
    free, total = result["device_blocks"]
    assert free == total
    free_cpu, total_cpu = result["cpu_blocks"]
    assert free_cpu == total_cpu > 0
    # Under the emulation no worker handed on a block a save had yet to read.
    assert [w["poisoned_blocks"] for w in result["workers"]] == [0, 0]
    workers = result["workers"]
    assert len(workers) == 2 and {w["rank"] for w in workers} == {0, 1}
    # Each worker's CPU buffer holds its own shard: half of a whole block.
    assert all(2 * w["bytes_per_block"] == BLOCK_BYTES for w in workers)
    # Both workers moved the same blocks, as many as the scheduler planned.
    planned_out, planned_in = result["planner_bytes"]
    assert all((w["bytes_swapped_out"], w["bytes_swapped_in"]) == (planned_out, planned_in) for w in workers)
    if policy == "swap":
        assert planned_out > 0 and planned_in > 0
