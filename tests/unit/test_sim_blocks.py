"""The simulated block pool: vLLM's free queue with cached prefixes, evicted LRU."""

import pytest

from infercept.sim.blocks import CpuPool, DevicePool


def test_freed_full_blocks_stay_cached_until_allocation_reaches_them():
    pool = DevicePool(10)
    assert pool.allocate(10)
    pool.free("a", num_blocks=4, num_full_blocks=3)  # queue: [a-partial] [a x3]
    pool.free("b", num_blocks=2, num_full_blocks=2)  # queue: ... [b x2]
    assert pool.num_free_blocks == 6
    assert (pool.num_cached_blocks("a"), pool.num_cached_blocks("b")) == (3, 2)
    assert pool.allocate(2)  # the partial block, then a's last full block
    assert (pool.num_cached_blocks("a"), pool.num_cached_blocks("b")) == (2, 2)
    assert pool.allocate(2)  # a's other blocks, least recently freed first
    assert (pool.num_cached_blocks("a"), pool.num_cached_blocks("b")) == (0, 2)
    pool.check()


def test_a_hit_takes_the_cached_prefix_out_of_the_free_queue():
    pool = DevicePool(8)
    assert pool.allocate(8)
    pool.free("a", num_blocks=5, num_full_blocks=5)
    assert pool.take_cached("a", max_blocks=3) == 3
    assert pool.num_free_blocks == 2
    assert pool.num_cached_blocks("a") == 0  # the 2 left over are plain free blocks
    assert pool.take_cached("a", max_blocks=3) == 0
    assert pool.allocate(2) and not pool.allocate(1)
    pool.check()


def test_without_prefix_caching_nothing_is_reused():
    pool = DevicePool(4, prefix_caching=False)
    assert pool.allocate(4)
    pool.free("a", num_blocks=4, num_full_blocks=4)
    assert pool.num_cached_blocks("a") == 0 and pool.num_free_blocks == 4
    pool.check()


def test_freeing_again_replaces_the_older_cache_entry():
    pool = DevicePool(8)
    assert pool.allocate(6)
    pool.free("a", num_blocks=2, num_full_blocks=2)
    assert pool.allocate(2)  # from the never-used blocks at the head
    pool.free("a", num_blocks=3, num_full_blocks=3)
    assert pool.num_cached_blocks("a") == 3
    pool.check()


def test_over_freeing_and_over_allocating_are_refused():
    pool = DevicePool(4)
    assert not pool.allocate(5)
    assert pool.allocate(2)
    with pytest.raises(ValueError):
        pool.free("a", num_blocks=3, num_full_blocks=0)
    with pytest.raises(ValueError):
        pool.free("a", num_blocks=1, num_full_blocks=2)
    cpu = CpuPool(3)
    assert cpu.allocate(3) and not cpu.allocate(1)
    cpu.free(3)
    with pytest.raises(ValueError):
        cpu.free(1)
