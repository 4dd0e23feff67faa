"""vLLM general plugin: runs `register()` in every vLLM process.

Registered through the `vllm.general_plugins` entry point in pyproject.toml;
this is the only place where InferCept registers itself with vLLM.
"""

import logging

from infercept.adapter.version import check_vllm_version

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Prepare this vLLM process for InferCept. Safe to call many times.

    Checks the vLLM version before anything else: the patches and the
    scheduler reach into vLLM 0.32.0's internals, so on any other version this
    raises `UnsupportedVllmVersion` (vLLM does not catch a general plugin's
    errors: the process stops with that message) and patches nothing.
    """
    global _registered
    if _registered:
        return
    check_vllm_version()
    _registered = True
    _init_cpu_amx()
    from infercept.patches import apply_all

    apply_all()


def _init_cpu_amx() -> None:
    """Enable AMX tiles so bf16 attention on Sapphire Rapids does not SIGILL.

    vLLM's CPU build picks an AMX kernel for bf16 with block sizes that are a
    multiple of 32; Linux only grants AMX state to a process that asked for it.
    """
    import torch

    if torch.cuda.is_available() or not hasattr(torch._C, "_cpu"):
        return
    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    if init_amx is None:
        return
    try:
        init_amx()
    except RuntimeError as exc:  # no AMX on this CPU: bf16 takes another kernel
        logger.debug("AMX not enabled: %s", exc)
