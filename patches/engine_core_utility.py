"""Patch: a utility method on vLLM's EngineCore that reaches InferCept's scheduler.

Target: `vllm.v1.engine.core.EngineCore` (vLLM 0.32.0).
Why: the API server asks the scheduler, which lives in the engine-core
  process, for paused requests' states and for InferCept's counters. vLLM's
  front-end reaches the engine core only through utility calls, which look the
  method up on the EngineCore object by name; there is no hook for a
  scheduler-level query.
How: adds one method, `EngineCore.infercept(method, args)`, that calls
  `scheduler.infercept_<method>(*args)`. The arguments travel as one list:
  vLLM's utility dispatch matches the arguments it receives against the
  method's declared parameters one by one, so a `*args` method could take
  one argument at most. Nothing of vLLM's changes behaviour.
Remove when: vLLM offers a way for a scheduler class to expose utility calls
  (or a generic stats/query hook for custom schedulers).
"""

from __future__ import annotations

METHOD = "infercept"


def _infercept(self, method: str, args: list | tuple = ()):
    target = getattr(self.scheduler, f"infercept_{method}", None)
    if target is None:
        raise ValueError(f"the engine's scheduler has no InferCept method {method!r}")
    return target(*args)


def check() -> None:
    from vllm.v1.engine.core import EngineCore

    if not hasattr(EngineCore, "scheduler") and "scheduler" not in EngineCore.__init__.__code__.co_names:
        raise RuntimeError("vLLM's EngineCore no longer holds `scheduler`: revisit patches/engine_core_utility.py")
    existing = getattr(EngineCore, METHOD, None)
    if existing is not None and existing is not _infercept:
        raise RuntimeError(f"vLLM's EngineCore already has `{METHOD}`: revisit the patch")


def apply() -> None:
    from vllm.v1.engine.core import EngineCore

    check()
    EngineCore.infercept = _infercept
