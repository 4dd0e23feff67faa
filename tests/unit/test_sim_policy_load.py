"""The design's claim, checked in the simulator: min-waste sustains at least the load of the
best fixed policy (preserve, discard or swap) on a mixed trace.

MINI is GPT-J-6B on an A100 (the built-in profile) in miniature: contexts a quarter as
long, with per-token costs 4x (so a context costs what it does at full size), tool calls
a tenth as long, and a fifth of the KV cache, so that memory binds as it does at full
scale within a 90-second trace. The rates bracket the knee of every policy.

Finding (see docs/simulator.md): the paper's rule fails this property here. It discards
every preserved request whose WastePreserve exceeds WasteChunkD even while device memory
is free; the recomputation that follows costs the compute this setting is short of, while
preserve swaps out only under pressure. ``min-waste-paper`` sustains 3.5 req/s here,
below preserve's 4.0; ``min-waste``, which discards only under memory pressure (the
change in infercept/policy/planner.py), sustains 4.5.
"""

import dataclasses

from infercept.bench.metrics import sustainable_rate
from infercept.bench.workload import generate_trace
from infercept.sim.profiles import PROFILES
from infercept.sim.runner import SimConfig, simulate

LENGTH_SCALE, TOOL_TIME_SCALE, CACHE_SHARE = 0.25, 0.1, 0.2
RATES = (2.5, 3.0, 3.5, 4.0, 4.5)
DURATION_S = 90.0

_GPTJ = PROFILES["gptj-6b-a100"]
MINI = dataclasses.replace(
    _GPTJ, name="gptj-mini", max_num_batched_tokens=512,
    cost=dataclasses.replace(
        _GPTJ.cost,
        device_capacity_tokens=int(_GPTJ.cost.device_capacity_tokens * LENGTH_SCALE
                                   * CACHE_SHARE) // 16 * 16,
        cpu_capacity_tokens=int(_GPTJ.cost.cpu_capacity_tokens * LENGTH_SCALE) // 16 * 16,
        saturation_tokens=round(_GPTJ.cost.saturation_tokens * LENGTH_SCALE),
        fwd_per_token_s=_GPTJ.cost.fwd_per_token_s / LENGTH_SCALE,
        swap_s_per_token=_GPTJ.cost.swap_s_per_token / LENGTH_SCALE))


def sustained(policy: str) -> float | None:
    results = {}
    for rate in RATES:
        trace = generate_trace("mix", round(rate * DURATION_S), rate, 0,
                               time_scale=TOOL_TIME_SCALE, length_scale=LENGTH_SCALE)
        result = simulate(trace, MINI, policy, SimConfig(abort_over_slo=True))
        results[rate] = result.metrics
    return sustainable_rate(results, MINI.slo_p90_s_per_token)


def test_the_rates_bracket_the_knee():
    rate = sustained("vllm")
    assert rate is not None and rate < max(RATES)


def test_min_waste_sustains_the_load_of_the_best_fixed_policy():
    best_fixed = max(sustained(policy) or 0.0 for policy in ("preserve", "discard", "swap"))
    assert (sustained("min-waste") or 0.0) >= best_fixed
