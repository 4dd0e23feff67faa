"""A discrete-event simulator of InferCept's engine that runs the real policy at the paper's
scale: iteration-level vLLM V1 scheduling with chunked prefill, paged KV memory with
prefix caching, the policy driver, hardware profiles, replicas behind a router.

Pure Python: no vLLM, no torch. It reads traces and writes metrics with the real
benchmark's own ``infercept.bench.workload`` and ``infercept.bench.metrics``.
"""

from __future__ import annotations

from importlib import import_module

_LAZY = {
    "Engine": "infercept.sim.engine",
    "Cluster": "infercept.sim.cluster",
    "HardwareProfile": "infercept.sim.profiles",
    "PROFILES": "infercept.sim.profiles",
    "load_profile": "infercept.sim.profiles",
    "profile_from_dict": "infercept.sim.profiles",
    "make_router": "infercept.sim.router",
    "POLICIES": "infercept.sim.runner",
    "SimConfig": "infercept.sim.runner",
    "SimResult": "infercept.sim.runner",
    "simulate": "infercept.sim.runner",
    "run_sweep": "infercept.sim.runner",
    "find_sustainable_rate": "infercept.sim.runner",
    "trace_maker": "infercept.sim.runner",
    "validate": "infercept.sim.validate",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'infercept.sim' has no attribute {name!r}")
