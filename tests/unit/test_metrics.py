"""Run metrics on a hand-made timeline, the sustainable rate, and the summary files."""

import dataclasses
import json

import pytest

from infercept.bench.metrics import (
    EngineCounters, RequestRecord, RunMetrics, compute_run_metrics, metric_by_rate,
    normalized_latencies_s_per_token, percentile, step_integral, sustainable_rate, write_summary)

MiB = 2**20

# Normalized latency = (end - start - tool) / output tokens:
RECORDS = [
    RequestRecord("a", start_s=0.0, end_s=10.0, output_tokens=4, tool_s_total=6.0,
                  num_interceptions=2),  # (10 - 0 - 6) / 4 = 1.0
    RequestRecord("b", start_s=1.0, end_s=7.0, output_tokens=2, tool_s_total=0.0),  # 6 / 2 = 3.0
    RequestRecord("c", start_s=2.0, end_s=12.0, output_tokens=5, tool_s_total=0.0),  # 10 / 5 = 2.0
    RequestRecord("d", start_s=3.0, end_s=9.0, output_tokens=3, tool_s_total=4.5,
                  num_interceptions=1),  # 1.5 / 3 = 0.5
    RequestRecord("e", start_s=4.0, end_s=11.0, output_tokens=2, tool_s_total=1.0,
                  completed=False),  # unfinished: no latency, but its 2 tokens count
]
COUNTERS = EngineCounters(
    forward_s=8.0, recompute_forward_s=2.0,
    forwarded_tokens=1000, recomputed_tokens=370,
    # Unsorted on purpose; of the two events at 4.0 the later one (250) wins; 13.0 is past the end.
    idle_kv_events=((10.0, 0), (1.0, 100), (4.0, 300), (4.0, 250), (13.0, 999)),
    kv_capacity_tokens=1000,
    swapped_out_bytes=3 * MiB, swapped_in_bytes=1 * MiB)


@pytest.fixture(scope="module")
def metrics():
    return compute_run_metrics(RECORDS, COUNTERS)


def test_normalized_latency_and_percentiles(metrics):
    assert normalized_latencies_s_per_token(RECORDS) == [0.5, 1.0, 2.0, 3.0]
    assert metrics.normalized_latency_mean_s_per_token == pytest.approx(6.5 / 4)
    # Linear between order statistics of [0.5, 1, 2, 3]: position (4 - 1) * q / 100.
    assert metrics.normalized_latency_p50_s_per_token == pytest.approx(1.5)  # 1 + 0.5 * (2 - 1)
    assert metrics.normalized_latency_p90_s_per_token == pytest.approx(2.7)  # 2 + 0.7 * (3 - 2)
    assert metrics.normalized_latency_p99_s_per_token == pytest.approx(2.97)  # 2 + 0.97 * 1


def test_throughput_over_the_makespan(metrics):
    # Window: first start 0.0 to last completed end 12.0 ("e" is unfinished).
    assert metrics.makespan_s == 12.0
    assert (metrics.num_requests, metrics.num_completed) == (5, 4)
    assert metrics.output_tokens_per_s == pytest.approx((4 + 2 + 5 + 3 + 2) / 12)
    assert metrics.completed_requests_per_s == pytest.approx(4 / 12)


def test_recompute_shares_and_swapped_bytes(metrics):
    assert metrics.recompute_share_of_forward_time == pytest.approx(2.0 / 8.0)
    assert metrics.recompute_share_of_forwarded_tokens == pytest.approx(0.37)
    assert metrics.swapped_bytes == 4 * MiB


def test_memory_waste_integral(metrics):
    # 0 on [0, 1), 100 on [1, 4), 250 on [4, 10), 0 on [10, 12]: 300 + 1500 = 1800 token-s.
    assert metrics.idle_kv_token_s == pytest.approx(1800.0)
    assert metrics.memory_waste_fraction == pytest.approx(1800.0 / (1000 * 12))


def test_step_integral_clips_to_the_window():
    # Value 10 set before the window holds from its start: 10 * (2 - 0) = 20.
    assert step_integral([(-5.0, 10), (2.0, 0)], 0.0, 4.0) == pytest.approx(20.0)
    # The last value holds to the end: 5 * (3 - 1) = 10.
    assert step_integral([(1.0, 5)], 0.0, 3.0) == pytest.approx(10.0)
    assert step_integral([], 0.0, 3.0) == 0.0


def test_explicit_window_and_missing_counters():
    metrics = compute_run_metrics(RECORDS, window_s=(0.0, 16.0))
    assert metrics.makespan_s == 16.0
    assert metrics.output_tokens_per_s == pytest.approx(16 / 16)
    assert metrics.recompute_share_of_forward_time is None
    assert metrics.recompute_share_of_forwarded_tokens is None
    assert metrics.memory_waste_fraction is None and metrics.idle_kv_token_s is None
    assert metrics.swapped_bytes == 0


def test_percentile_edges():
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)


# ---------------------------------------------------------------- across rates

def _run(p90_s_per_token, num_completed=10):
    return RunMetrics(
        num_requests=10, num_completed=num_completed, makespan_s=10.0,
        normalized_latency_mean_s_per_token=p90_s_per_token / 2,
        normalized_latency_p50_s_per_token=p90_s_per_token / 2,
        normalized_latency_p90_s_per_token=p90_s_per_token,
        normalized_latency_p99_s_per_token=p90_s_per_token * 2,
        output_tokens_per_s=100.0, completed_requests_per_s=num_completed / 10.0,
        recompute_share_of_forward_time=0.3, recompute_share_of_forwarded_tokens=None,
        idle_kv_token_s=None, memory_waste_fraction=None, swapped_bytes=0)


SLO_S_PER_TOKEN = 0.05
RESULTS = {
    # Rates given out of order on purpose. 8 passes again but lies above the failing 4.
    "infercept": {4.0: _run(0.06), 1.0: _run(0.02), 2.0: _run(0.05), 8.0: _run(0.03)},
    "vllm": {1.0: _run(0.04), 2.0: _run(0.01, num_completed=9), 4.0: _run(0.01)},
    "discard": {1.0: _run(0.07), 2.0: _run(0.01)},
}


def test_sustainable_rate_stops_at_the_first_failing_rate():
    assert sustainable_rate(RESULTS["infercept"], SLO_S_PER_TOKEN) == 2.0  # 0.05 <= SLO passes
    # vllm at 2.0 left a request unfinished.
    assert sustainable_rate(RESULTS["vllm"], SLO_S_PER_TOKEN) == 1.0
    assert sustainable_rate(RESULTS["discard"], SLO_S_PER_TOKEN) is None
    assert sustainable_rate({}, SLO_S_PER_TOKEN) is None


def test_metric_by_rate_gives_sorted_series():
    series = metric_by_rate(RESULTS, "normalized_latency_p90_s_per_token")
    assert series["infercept"] == [(1.0, 0.02), (2.0, 0.05), (4.0, 0.06), (8.0, 0.03)]
    assert series["discard"] == [(1.0, 0.07), (2.0, 0.01)]


def test_write_summary(tmp_path):
    json_path, md_path = write_summary(RESULTS, SLO_S_PER_TOKEN, tmp_path / "out")
    summary = json.loads(json_path.read_text())
    assert summary["slo_p90_s_per_token"] == SLO_S_PER_TOKEN
    infercept = summary["policies"]["infercept"]
    assert infercept["sustainable_rate"] == 2.0
    assert [run["rate"] for run in infercept["runs"]] == [1.0, 2.0, 4.0, 8.0]
    assert infercept["runs"][0] == {"rate": 1.0, **dataclasses.asdict(RESULTS["infercept"][1.0])}
    assert summary["policies"]["discard"]["sustainable_rate"] is None

    lines = md_path.read_text().splitlines()
    assert "| infercept | 2 |" in lines and "| discard | - |" in lines
    run_rows = [line for line in lines if line.startswith("| vllm | ") and line.count("|") > 3]
    assert len(run_rows) == 3
    # p50 / p90 / p99 / mean in ms per token, tokens/s, done req/s, recompute shares, waste, MiB.
    assert run_rows[1] == ("| vllm | 2 | 9/10 | 5.00 | 10.00 | 20.00 | 5.00 | 100.0 | 0.900"
                           " | 30.0% | - | - | 0.0 |")
