"""An InferCept engine at tensor parallelism 2, in a child process.

The suite's own process holds one in-process InferCept engine (vLLM keeps one
KV connector per process), so the tensor-parallel engine lives in a child, as
stock vLLM does in `tests/reference.py`. The child runs the engine core
in-process and two worker processes, each bound to its own core
(`VLLM_CPU_OMP_THREADS_BIND="0|1"`; vLLM's CPU build needs that for TP=2), so
its scheduler is reachable directly; the engine is built once and its policy
switched between runs.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from reference import ChildEngine


def _worker_swap_counters(worker) -> dict:
    """Runs in each worker (vLLM's collective_rpc): what its swap connector moved."""
    import torch.distributed as dist
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    swapper = get_kv_transfer_group().worker.swapper
    return {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "bytes_per_block": swapper.bytes_per_block,
        "poisoned_blocks": swapper.num_poisoned_blocks,
        "bytes_swapped_out": swapper.bytes_swapped_out,
        "bytes_swapped_in": swapper.bytes_swapped_in,
    }


def _run(llm, policy: str, scripts) -> dict:
    from kv_accounting import drain, free_cpu_blocks, free_device_blocks, scheduler_of, total_device_blocks
    from scripted import run_scripts

    scheduler = scheduler_of(llm)
    scheduler.policy_driver.set_policy(policy)
    sessions = run_scripts(llm, scripts)
    drain(llm)
    return {
        "sessions": [SimpleNamespace(prompt_token_ids=s.prompt_token_ids, token_ids=s.token_ids,
                                     segments=s.segments, appended=s.appended, max_tokens=s.max_tokens)
                     for s in sessions],
        "left": [*scheduler.intercepts, *scheduler.requests],
        "device_blocks": (free_device_blocks(llm), total_device_blocks(llm)),
        "cpu_blocks": free_cpu_blocks(llm),
        "planner_bytes": (scheduler.policy_driver.swap.bytes_swapped_out,
                          scheduler.policy_driver.swap.bytes_swapped_in),
        "workers": llm.llm_engine.collective_rpc(_worker_swap_counters),
    }


def _serve(conn, engine_kwargs: dict) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    from infercept import LLM

    llm = LLM(**engine_kwargs)
    conn.send("ready")
    while (message := conn.recv()) is not None:
        try:
            conn.send(_run(llm, *message))
        except Exception as exc:  # sent back, so the test fails with the child's error
            import traceback

            conn.send(RuntimeError(traceback.format_exc()))
    llm.llm_engine.engine_core.shutdown()


class TensorParallelEngine(ChildEngine):
    """`run(policy, scripts)` -> sessions and block accounting from a TP=2 InferCept engine."""

    def __init__(self, engine_kwargs: dict):
        super().__init__(_serve, engine_kwargs, daemon=False)

    def run(self, policy: str, scripts, timeout_s: float = 300) -> dict:
        self._conn.send((policy, scripts))
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"tensor-parallel run under {policy} took over {timeout_s} s")
        result = self._conn.recv()
        if isinstance(result, Exception):
            raise result
        return result
