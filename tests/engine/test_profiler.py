"""The start-up profiler: measures, fits, caches, and predicts unmeasured sizes."""

from __future__ import annotations

import json

import pytest
from kv_accounting import scheduler_of

from infercept.adapter import profiler
from infercept.policy import CostModel


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERCEPT_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_profile_measures_installs_and_caches(intercept_llm, cache_dir):
    llm = intercept_llm("min-waste")
    for stale in cache_dir.glob("profiles/*.json"):  # the engine's own start-up profile
        stale.unlink()
    cost, source = profiler.profile_llm(llm)
    assert source == "profiled"
    assert scheduler_of(llm).policy_driver.cost == cost
    assert cost.swap_s_per_token > 0 and cost.fwd_base_s > 0 and cost.fwd_per_token_s >= 0
    sizes = profiler.token_counts(llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)
    assert min(sizes) <= cost.saturation_tokens <= max(sizes)
    # Every worker measured every size once per repeat and a swap round trip.
    [measured] = llm.collective_rpc(profiler.MEASURE_METHOD, args=(sizes, 1, 1))
    assert [n for n, _ in measured["forward"]] == sizes
    assert all(s > 0 for _, s in measured["forward"]) and measured["swap_s_per_block"] > 0
    # Cached: the second engine start reuses it without measuring.
    cached, source = profiler.profile_llm(llm)
    assert source.startswith("cache ") and cached == cost
    [path] = (cache_dir / "profiles").glob("*.json")
    assert CostModel.from_dict(json.loads(path.read_text())) == cost


def _hinge(n, base=2e-3, slope=4e-6, knee=256):
    return base + slope * max(0, n - knee)


def test_fit_recovers_the_hinge_and_ignores_interference():
    """The fit, on measurements shaped like a real profile: slowest worker wins,
    a pass slowed by other work is dropped, sizes between the measured ones are
    predicted. (How close the fit comes on real passes depends on the machine's
    load, so no test asserts it.)"""
    base = CostModel(fwd_base_s=1.0, fwd_per_token_s=1.0, saturation_tokens=1,
                     swap_s_per_token=1.0, kv_bytes_per_token=1024, block_size_tokens=32,
                     device_capacity_tokens=4096, cpu_capacity_tokens=8192)
    sizes = [16, 32, 64, 256, 512, 1024, 2048]
    jitter = [1.00, 1.03, 0.98, 1.01, 0.99, 1.02, 1.00]
    fast = {"forward": [(n, 0.9 * _hinge(n)) for n in sizes], "swap_s_per_block": 1e-4}
    slow = {"forward": [(n, _hinge(n) * j) for n, j in zip(sizes, jitter)],
            "swap_s_per_block": 3.2e-4}
    slow["forward"][4] = (512, 3 * _hinge(512))  # another process got in the way
    cost = profiler.fit_cost_model([fast, slow], base)
    assert cost.swap_s_per_token == pytest.approx(3.2e-4 / 32)
    assert (cost.kv_bytes_per_token, cost.device_capacity_tokens) == (1024, 4096)
    for n in [128, 384, 768, 1536]:
        assert cost.forward_s(n) == pytest.approx(_hinge(n), rel=0.05), n


def test_cost_profile_file_overrides(intercept_llm, cache_dir):
    from infercept.config import InterceptConfig

    llm = intercept_llm("min-waste")
    vllm_config = llm.llm_engine.vllm_config
    base = scheduler_of(llm).policy_driver.cost
    custom = CostModel.from_dict({**base.to_dict(), "fwd_base_s": 0.5, "saturation_tokens": 77})
    path = cache_dir / "mine.json"
    profiler.save(custom, path)
    config = InterceptConfig(cost_profile=str(path))
    cost, source = profiler.known_cost_model(config, vllm_config, base)
    assert (cost.fwd_base_s, cost.saturation_tokens, source) == (0.5, 77, f"file {path}")
    assert cost.device_capacity_tokens == base.device_capacity_tokens
    with pytest.raises(ValueError, match="not a cost model"):
        path.write_text("{}")
        profiler.known_cost_model(config, vllm_config, base)
