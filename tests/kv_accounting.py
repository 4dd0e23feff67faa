"""Block accounting: every test leaves device blocks and CPU swap space free."""

from __future__ import annotations


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def drain(llm, max_steps: int = 10) -> None:
    """Step until the scheduler has no work left (deferred CPU frees included)."""
    scheduler = scheduler_of(llm)
    for _ in range(max_steps):
        if not scheduler.has_requests():
            return
        llm.llm_engine.step()
    raise AssertionError("engine still busy after draining")


def free_device_blocks(llm) -> int:
    return scheduler_of(llm).kv_cache_manager.block_pool.get_num_free_blocks()


def total_device_blocks(llm) -> int:
    # One block is vLLM's reserved null block.
    return scheduler_of(llm).kv_cache_manager.block_pool.num_gpu_blocks - 1


def free_cpu_blocks(llm) -> tuple[int, int]:
    swap = scheduler_of(llm).policy_driver.swap
    return (swap.allocator.num_free_blocks, swap.allocator.num_blocks) if swap else (0, 0)


def assert_all_free(llm) -> None:
    drain(llm)
    scheduler = scheduler_of(llm)
    assert not scheduler.intercepts, f"paused requests left: {list(scheduler.intercepts)}"
    assert not scheduler.requests, f"requests left: {list(scheduler.requests)}"
    assert free_device_blocks(llm) == total_device_blocks(llm)
    free_cpu, total_cpu = free_cpu_blocks(llm)
    assert free_cpu == total_cpu


def own_device_blocks(llm, request_id: str) -> int:
    """The request's device blocks that no other request holds (what vLLM frees)."""
    [manager] = scheduler_of(llm).kv_cache_manager.coordinator.single_type_managers
    return sum(block.ref_cnt == 1 for block in manager.req_to_blocks.get(request_id, ()))
