"""The paper's memory-waste equations (DESIGN.md section 2), in token*seconds.

Waste is device memory that does no useful work times the time it sits idle. With
C = the intercepted request's context, T_INT = its (remaining) interception time,
C_other = context held by the other running requests, C_batch = context of the running
batch, and n = number of recompute chunks:

    WastePreserve = T_INT * C
    WasteDiscard  = T_fwd(C) * C + T_fwd(C) * C_other
    WasteChunkD   = T_fwd(C) * C / 2 + n * T_fwd(C / n) * C_other
    WasteSwap     = 2 * T_swap(C) * C_batch        (0 when hidden under the forward pass)

``byte_seconds`` converts any of them to bytes*seconds.
"""

from __future__ import annotations

import math

from infercept.policy.cost_model import CostModel


def waste_preserve(context_tokens: int, interception_s: float) -> float:
    """Memory held idle on the device for the whole interception."""
    return interception_s * context_tokens


def waste_discard(cost: CostModel, context_tokens: int, other_context_tokens: int) -> float:
    """Recompute the whole context in one pass while the others' memory waits."""
    forward_s = cost.forward_s(context_tokens)
    return forward_s * context_tokens + forward_s * other_context_tokens


def recompute_chunks(context_tokens: int, chunk_tokens: int) -> int:
    """n = ceil(C / chunk_tokens), at least 1."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return max(1, math.ceil(context_tokens / chunk_tokens))


def waste_chunked_discard(cost: CostModel, context_tokens: int, other_context_tokens: int,
                          chunk_tokens: int) -> float:
    """Recompute in n chunks of at most ``chunk_tokens`` that ride along with decoding."""
    chunks = recompute_chunks(context_tokens, chunk_tokens)
    own = cost.forward_s(context_tokens) * context_tokens / 2
    others = chunks * cost.forward_s(context_tokens / chunks) * other_context_tokens
    return own + others


def waste_swap(cost: CostModel, context_tokens: int, batch_context_tokens: int,
               budget_tokens: int = 0) -> float:
    """Swap out and back in while the batch stalls; 0 when the transfer fits in
    ``budget_tokens`` (the tokens that hide under one forward pass) or nothing waits."""
    if context_tokens <= budget_tokens or batch_context_tokens == 0:
        return 0.0
    return 2 * cost.swap_s(context_tokens) * batch_context_tokens


def recompute_chunk_tokens(cost: CostModel, decode_tokens: int) -> int:
    """Recompute chunk cap that fills an iteration up to the saturation point: the tokens
    left after this iteration's ``decode_tokens``, and at least one block."""
    return max(cost.block_size_tokens, cost.saturation_tokens - decode_tokens)


def byte_seconds(cost: CostModel, waste_token_s: float) -> float:
    """Convert a waste in token*seconds to bytes*seconds."""
    return waste_token_s * cost.kv_bytes_per_token
