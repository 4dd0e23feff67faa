"""The cost model the policy starts from, before (or without) profiling.

Capacities come from the engine's real KV cache and swap space; times are
conservative defaults for a small model on a CPU (DESIGN notes: ~13 ms a step
plus ~0.4 ms per prefill token) until the start-up profiler measures them.
"""

from __future__ import annotations

from infercept.policy import CostModel

DEFAULT_FWD_BASE_S = 0.013
DEFAULT_FWD_PER_TOKEN_S = 0.0004
DEFAULT_SATURATION_TOKENS = 32
DEFAULT_SWAP_BYTES_PER_S = 5e9


def initial_cost_model(vllm_config, kv_cache_config, swap) -> CostModel:
    from infercept.adapter.connector import block_bytes

    block_size = vllm_config.cache_config.block_size
    kv_bytes_per_token = max(1, block_bytes(kv_cache_config) // block_size)
    return CostModel(
        fwd_base_s=DEFAULT_FWD_BASE_S,
        fwd_per_token_s=DEFAULT_FWD_PER_TOKEN_S,
        saturation_tokens=DEFAULT_SATURATION_TOKENS,
        swap_s_per_token=kv_bytes_per_token / DEFAULT_SWAP_BYTES_PER_S,
        kv_bytes_per_token=kv_bytes_per_token,
        block_size_tokens=block_size,
        device_capacity_tokens=kv_cache_config.num_blocks * block_size,
        cpu_capacity_tokens=swap.allocator.num_blocks * block_size if swap else 0,
    )
