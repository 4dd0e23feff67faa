"""CostModel: hinge forward time, swap budget, JSON round trip and fit."""

import json
import math
import random

import pytest

from infercept.policy import CostModel, fit_hinge

# Binary fractions keep the hand-worked numbers exact.
COST = CostModel(fwd_base_s=0.5, fwd_per_token_s=1 / 1024, saturation_tokens=256,
                 swap_s_per_token=1 / 4096, kv_bytes_per_token=1000, block_size_tokens=16,
                 device_capacity_tokens=100_000, cpu_capacity_tokens=50_000)

SIDE_FIELDS = dict(swap_s_per_token=1e-5, kv_bytes_per_token=458_752, block_size_tokens=16,
                   device_capacity_tokens=200_000, cpu_capacity_tokens=400_000)


def test_forward_is_flat_up_to_saturation_then_linear():
    assert COST.forward_s(0) == 0.5
    assert COST.forward_s(256) == 0.5
    # 1280 tokens: 1024 beyond saturation at 1/1024 s each -> 0.5 + 1.0
    assert COST.forward_s(1280) == 1.5


def test_swap_time_is_linear():
    assert COST.swap_s(0) == 0.0
    assert COST.swap_s(4096) == 1.0  # 4096 * 1/4096


def test_swap_budget_is_the_tokens_that_fit_under_one_forward_pass():
    # batch of 100 tokens: forward 0.5 s / (1/4096 s per token) = 2048 tokens
    assert COST.swap_budget_tokens(100) == 2048
    # batch of 1280 tokens: forward 1.5 s -> 6144 tokens
    assert COST.swap_budget_tokens(1280) == 6144


def test_swap_budget_floor_survives_float_representation():
    # 0.03 / 0.001 is 29.999999999999996 in floats; the budget is 30 tokens.
    cost = CostModel(0.03, 0.0, 16, 0.001, 1, 16, 10, 10)
    assert cost.swap_budget_tokens(1) == 30


def test_swap_budget_without_swap_or_with_free_transfers():
    assert CostModel(0.5, 0.0, 16, math.inf, 1, 16, 10, 20).swap_budget_tokens(8) == 0
    assert CostModel(0.5, 0.0, 16, 0.0, 1, 16, 10, 20).swap_budget_tokens(8) == 30


def test_json_round_trip_including_infinite_swap_time():
    for cost in (COST, CostModel(0.5, 0.0, 16, math.inf, 1, 16, 10, 20)):
        restored = CostModel.from_dict(json.loads(json.dumps(cost.to_dict())))
        assert restored == cost
        assert type(restored.saturation_tokens) is int


def test_from_dict_rejects_stale_or_partial_files():
    raw = COST.to_dict()
    with pytest.raises(ValueError, match="unknown"):
        CostModel.from_dict({**raw, "extra_s": 1.0})
    del raw["fwd_base_s"]
    with pytest.raises(ValueError, match="missing"):
        CostModel.from_dict(raw)


@pytest.mark.parametrize("field, value", [("fwd_base_s", -1.0), ("fwd_per_token_s", math.nan),
                                          ("swap_s_per_token", -1e-6),
                                          ("block_size_tokens", 0),
                                          ("cpu_capacity_tokens", -1)])
def test_invalid_values_are_rejected(field, value):
    with pytest.raises(ValueError):
        CostModel(**{**COST.to_dict(), field: value})


def test_fit_recovers_an_exact_hinge_at_a_sample_point():
    truth = CostModel(0.02, 2e-5, 512, **SIDE_FIELDS)
    samples = [(x, truth.forward_s(x)) for x in (32, 128, 256, 512, 1024, 2048, 4096)]
    fitted = CostModel.fit(samples, **SIDE_FIELDS)
    assert fitted.saturation_tokens == 512
    assert fitted.fwd_base_s == pytest.approx(0.02, rel=1e-9)
    assert fitted.fwd_per_token_s == pytest.approx(2e-5, rel=1e-9)
    assert fitted.swap_s_per_token == SIDE_FIELDS["swap_s_per_token"]


def test_fit_predicts_unmeasured_sizes_within_five_percent_from_noisy_samples():
    # Knee at 384, between the measured sizes 320 and 448; 2% multiplicative noise.
    truth = CostModel(0.02, 2e-5, 384, **SIDE_FIELDS)
    rng = random.Random(7)
    sizes = (16, 32, 64, 128, 192, 256, 320, 448, 512, 768, 1024, 1536, 2048, 3072, 4096)
    samples = [(x, truth.forward_s(x) * (1 + rng.gauss(0, 0.02))) for x in sizes
               for _ in range(3)]
    fitted = CostModel.fit(samples, **SIDE_FIELDS)
    for num_tokens in (100, 400, 600, 1200, 2500, 3500, 6000):
        assert fitted.forward_s(num_tokens) == pytest.approx(truth.forward_s(num_tokens),
                                                             rel=0.05)
    assert fitted.saturation_tokens == pytest.approx(384, rel=0.1)
    assert fitted.fwd_per_token_s == pytest.approx(2e-5, rel=0.05)


def test_fit_of_flat_samples_has_no_slope():
    base_s, per_token_s, _ = fit_hinge([(64, 0.01), (128, 0.01), (256, 0.01)])
    assert (base_s, per_token_s) == (pytest.approx(0.01), 0.0)


def test_fit_of_a_single_size_is_flat_at_its_mean():
    assert fit_hinge([(64, 0.01), (64, 0.03)]) == (pytest.approx(0.02), 0.0, 64)
    with pytest.raises(ValueError):
        fit_hinge([])
