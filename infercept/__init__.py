"""InferCept: a serving engine for tool-using LLMs, on vLLM 0.32.

An intercepted request (one that stopped to call a tool) keeps its place and,
every iteration, its KV cache is preserved on the device, swapped to CPU memory
or discarded and recomputed later, whichever wastes the least memory.

Heavy imports (vLLM, torch) are lazy: `import infercept` is cheap, and the pure
policy code under `infercept.policy` never imports them.
"""

from importlib import import_module

__version__ = "0.1.0"

VLLM_VERSION = "0.32.0"

_LAZY = {
    "LLM": "infercept.entrypoints.llm",
    "Augmentation": "infercept.entrypoints.tools",
    "ToolTimeoutError": "infercept.entrypoints.tools",
    "SamplingParams": "vllm",
}

__all__ = ["__version__", "VLLM_VERSION", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'infercept' has no attribute {name!r}")
