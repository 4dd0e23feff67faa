"""The paper-scale table: each cell's mean and range over seeds, and min-waste's ratios
taken seed by seed."""

from infercept.sim.experiments import paper_table
from infercept.sim.profiles import PROFILES


def entry(policy: str, seed: int, rate: float | None) -> dict:
    return {"profile": "p", "workload": "agent", "policy": policy, "replicas": 1,
            "router": "affinity", "prefix_caching": True, "duration_s": 100.0, "seed": seed,
            "sustainable_rate": rate}


def test_cells_show_the_mean_and_the_range_over_seeds():
    entries = [entry("vllm", 0, 1.0), entry("vllm", 1, 2.0), entry("vllm", 2, 3.0),
               entry("min-waste", 0, 2.0), entry("min-waste", 1, 3.0), entry("min-waste", 2, 3.0),
               entry("swap", 0, None), entry("swap", 1, 4.0), entry("swap", 2, 6.0)]
    [header, _, row] = paper_table(entries).splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]],
                     [c.strip() for c in row.split("|")[1:-1]]))
    assert cells["seeds"] == "0,1,2"
    assert cells["vllm"] == "2 (1-3)"
    assert cells["swap"] == "5 (4-6) [2 seeds]"  # seed 0 met the SLO at no rate tried
    assert cells["min-waste"] == "2.67 (2-3)"
    assert cells["min-waste / vllm"] == "1.5 (1-2)"  # 2/1, 3/2, 3/3
    assert cells["min-waste / swap"] == "0.625 (0.5-0.75) [2 seeds]"  # 3/4, 3/6


def test_the_long_context_profile():
    profile = PROFILES["llama31-8b-h100-128k"]
    assert profile.attention_s_per_kv_token == profile.kv_read_s_per_token > 0
    # 5x a step holding one 64K-token context.
    step_s = profile.cost.fwd_base_s + 65_536 * profile.kv_read_s_per_token
    assert abs(profile.slo_p90_s_per_token - 5 * step_s) < 1e-4
