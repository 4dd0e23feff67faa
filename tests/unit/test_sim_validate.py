"""Simulated against measured summaries, per policy and rate."""

import json

import pytest

from infercept.sim.validate import validate


def summary(runs_by_policy):
    return {"slo_p90_s_per_token": 0.05,
            "policies": {policy: {"sustainable_rate": None, "runs": runs}
                         for policy, runs in runs_by_policy.items()}}


def run(rate, mean, p90, tokens_per_s, done_per_s=None):
    return {"rate": rate, "normalized_latency_mean_s_per_token": mean,
            "normalized_latency_p90_s_per_token": p90, "output_tokens_per_s": tokens_per_s,
            "completed_requests_per_s": done_per_s}


MEASURED = summary({"min-waste": [run(1.0, 0.020, 0.030, 400.0, 0.9), run(2.0, 0.030, 0.050,
                                                                           800.0, 1.8)],
                    "vllm": [run(1.0, 0.025, 0.040, 390.0, 0.9)]})


def test_within_tolerance_passes():
    simulated = summary({"min-waste": [run(1.0, 0.022, 0.033, 380.0, 0.95),
                                       run(2.0, 0.027, 0.056, 880.0, 1.7)],
                         "vllm": [run(1.0, 0.025, 0.045, 390.0, 0.9)]})
    report = validate(simulated, MEASURED)
    assert report.passed
    assert len(report.comparisons) == 12
    assert report.max_relative_error == pytest.approx(0.125)  # vllm p90: 0.045 vs 0.040
    assert "pass" in report.markdown()


def test_one_metric_out_of_tolerance_fails_and_is_named():
    simulated = summary({"min-waste": [run(1.0, 0.020, 0.030, 400.0, 0.9),
                                       run(2.0, 0.030, 0.070, 800.0, 1.8)]})
    report = validate(simulated, MEASURED, tolerance=0.15)
    assert not report.passed
    (failure,) = report.failures
    assert (failure.policy, failure.rate, failure.metric) == (
        "min-waste", 2.0, "normalized_latency_p90_s_per_token")
    assert failure.relative_error == pytest.approx(0.4)
    assert report.unmatched == ("vllm@1",)
    assert validate(simulated, MEASURED, tolerance=0.5).passed


def test_missing_values_are_skipped_and_nothing_to_compare_fails(tmp_path):
    simulated = summary({"min-waste": [run(1.0, 0.020, 0.030, 400.0, None)]})
    report = validate(simulated, MEASURED)
    assert [c.metric for c in report.comparisons] == [
        "normalized_latency_mean_s_per_token", "normalized_latency_p90_s_per_token",
        "output_tokens_per_s"]
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary({"swap": [run(3.0, 0.1, 0.1, 1.0, 1.0)]})))
    assert not validate(path, MEASURED).passed  # nothing shared
    with pytest.raises(ValueError):
        validate(simulated, MEASURED, tolerance=-1)


def test_cost_from_steps_refits_forward_time_and_keeps_the_rest():
    from infercept.policy import CostModel
    from infercept.sim.validate import cost_from_steps

    base = CostModel(fwd_base_s=0.002, fwd_per_token_s=1e-6, saturation_tokens=500,
                     swap_s_per_token=1e-7, kv_bytes_per_token=1024, block_size_tokens=32,
                     device_capacity_tokens=32768, cpu_capacity_tokens=65536)
    steps = [(n, 0.05 + 1e-4 * max(0, n - 64)) for n in (1, 8, 30, 64, 128, 256, 300)]
    cost = cost_from_steps(steps + [(0, 9.0)], base)  # a step that forwarded nothing: ignored
    assert cost.fwd_base_s == pytest.approx(0.05)
    assert cost.fwd_per_token_s == pytest.approx(1e-4)
    assert cost.saturation_tokens == 64
    assert cost.to_dict() | {"fwd_base_s": 0, "fwd_per_token_s": 0, "saturation_tokens": 0} \
        == base.to_dict() | {"fwd_base_s": 0, "fwd_per_token_s": 0, "saturation_tokens": 0}
    with pytest.raises(ValueError):
        cost_from_steps([(10, 0.1)], base)
