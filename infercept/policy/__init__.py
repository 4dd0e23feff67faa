"""Pure KV-cache policy for intercepted requests: cost model, waste equations, duration
estimator and planners. Imports neither vLLM nor torch and reads no clock, so the engine
and a simulator run the same decisions from the same inputs."""

from infercept.policy.cost_model import CostModel, fit_hinge
from infercept.policy.estimator import DurationEstimator
from infercept.policy.planner import (POLICY_NAMES, DiscardPolicy, MinWastePolicy, Policy,
                                     PreservePolicy, SwapPolicy, TTLPolicy, make_policy)
from infercept.policy.types import (VALID_ACTIONS, Action, BatchState, Decision, Intercepted,
                                    Location, Plan, location_after)
from infercept.policy.waste import (byte_seconds, recompute_chunk_tokens, recompute_chunks,
                                    waste_chunked_discard, waste_discard, waste_preserve,
                                    waste_swap)

__all__ = [
    "Action", "BatchState", "CostModel", "Decision", "DiscardPolicy", "DurationEstimator",
    "Intercepted", "Location", "MinWastePolicy", "POLICY_NAMES", "Plan", "Policy",
    "PreservePolicy", "SwapPolicy", "TTLPolicy", "VALID_ACTIONS", "byte_seconds", "fit_hinge",
    "location_after", "make_policy", "recompute_chunk_tokens", "recompute_chunks",
    "waste_chunked_discard", "waste_discard", "waste_preserve", "waste_swap",
]
