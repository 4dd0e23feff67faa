"""Hardware profiles: derived from the architecture and datasheets, or loaded from JSON."""

import json

import pytest

from infercept.policy import CostModel
from infercept.sim.profiles import (A100_80GB, GIB, GPT_J_6B, LLAMA_3_70B, PROFILES,
                                    HardwareProfile, load_profile, profile_from_dict,
                                    roofline_profile)


def test_kv_bytes_per_token_come_from_the_architecture():
    assert GPT_J_6B.kv_bytes_per_token == 2 * 28 * 16 * 256 * 2  # 448 KiB, no GQA
    assert LLAMA_3_70B.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2  # 320 KiB with GQA


def test_gptj_on_an_a100_by_hand():
    cost = PROFILES["gptj-6b-a100"].cost
    weights = 6_053_381_344 * 2
    # 90% of 80 GiB less the weights, in 16-token blocks of 448 KiB per token.
    tokens = (0.9 * 80 * GIB - weights) / (448 * 1024)
    assert cost.device_capacity_tokens == int(tokens // 16) * 16
    weight_read_s = weights / (2.039e12 * 0.8)
    per_token_s = 2 * 6_053_381_344 / (312e12 * 0.6)
    assert cost.fwd_base_s == pytest.approx(2e-3 + weight_read_s)
    assert cost.fwd_per_token_s == pytest.approx(per_token_s)
    assert cost.saturation_tokens == round(weight_read_s / per_token_s)
    assert cost.swap_s_per_token == pytest.approx(448 * 1024 / 25e9)
    assert cost.cpu_capacity_tokens == int(200e9 / (448 * 1024) // 16) * 16
    # Reading one token's KV once, for the opt-in attention term.
    profile = PROFILES["gptj-6b-a100"]
    assert profile.attention_s_per_kv_token == 0.0
    assert profile.with_attention().attention_s_per_kv_token == pytest.approx(
        448 * 1024 / (2.039e12 * 0.8))


def test_tensor_parallelism_splits_the_work_and_adds_all_reduces():
    one = roofline_profile("x", GPT_J_6B, A100_80GB, 1, max_num_seqs=8,
                           max_num_batched_tokens=64, slo_p90_s_per_token=1.0).cost
    two = roofline_profile("x", GPT_J_6B, A100_80GB, 2, max_num_seqs=8,
                           max_num_batched_tokens=64, slo_p90_s_per_token=1.0).cost
    assert two.fwd_per_token_s == pytest.approx(one.fwd_per_token_s / 2)
    assert two.fwd_base_s - 2e-3 - 2 * 28 * 10e-6 == pytest.approx((one.fwd_base_s - 2e-3) / 2)
    assert two.swap_s_per_token == pytest.approx(one.swap_s_per_token / 2)
    assert two.device_capacity_tokens > 2 * one.device_capacity_tokens  # weights paid once


def test_a_model_that_does_not_fit_is_refused():
    small_gpu = A100_80GB.__class__("tiny", 10 * GIB, 1e12, 1e14, 1e10, "test")
    with pytest.raises(ValueError, match="does not fit"):
        roofline_profile("x", LLAMA_3_70B, small_gpu, 1, max_num_seqs=8,
                         max_num_batched_tokens=64, slo_p90_s_per_token=1.0)


def test_every_built_in_profile_round_trips_through_json(tmp_path):
    for profile in PROFILES.values():
        path = tmp_path / f"{profile.name}.json"
        path.write_text(json.dumps(profile.to_dict()))
        assert load_profile(path) == profile
        assert load_profile(profile.name) is profile


def test_a_measured_cost_model_loads_as_a_profile(tmp_path):
    cost = CostModel(fwd_base_s=0.02, fwd_per_token_s=1e-4, saturation_tokens=256,
                     swap_s_per_token=1e-5, kv_bytes_per_token=1024, block_size_tokens=32,
                     device_capacity_tokens=32768, cpu_capacity_tokens=65536)
    path = tmp_path / "cost_model.json"
    path.write_text(json.dumps(cost.to_dict()))
    profile = load_profile(path)
    assert profile.cost == cost and profile.name == "cost_model"
    assert profile.slo_p90_s_per_token == pytest.approx(0.1)  # 5 x fwd_base_s
    with_limits = profile_from_dict({**cost.to_dict(), "max_num_seqs": 8,
                                     "max_num_batched_tokens": 512})
    assert (with_limits.max_num_seqs, with_limits.max_num_batched_tokens) == (8, 512)
    with pytest.raises(ValueError, match="unknown keys"):
        profile_from_dict({**cost.to_dict(), "gpu": "A100"})
    with pytest.raises(ValueError):
        profile_from_dict({"fwd_base_s": 0.02})


def test_unknown_profiles_and_bad_limits_are_refused():
    with pytest.raises(ValueError, match="unknown profile"):
        load_profile("gpt-5-on-a-toaster")
    with pytest.raises(ValueError):
        HardwareProfile("x", PROFILES["gptj-6b-a100"].cost, max_num_seqs=64,
                        max_num_batched_tokens=32, slo_p90_s_per_token=0.1)
