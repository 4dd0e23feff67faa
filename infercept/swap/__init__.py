"""Layer-wise KV swapping between device KV-cache tensors and host memory.

`CpuBlockAllocator` (scheduler side) is pure Python; `LayerwiseSwapper`
(worker side) needs torch, which is imported only when the swapper is asked for.
"""

from infercept.swap.allocator import CpuBlockAllocator, CpuBlocksExhaustedError

__all__ = ["CpuBlockAllocator", "CpuBlocksExhaustedError", "LayerwiseSwapper"]


def __getattr__(name: str):
    if name == "LayerwiseSwapper":
        from infercept.swap.swapper import LayerwiseSwapper

        return LayerwiseSwapper
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
