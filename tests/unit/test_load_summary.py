"""benchmarks.load_summary: per-run figures from a load log's cumulative counters."""

import json

from benchmarks.load_summary import parse, table


def _run(n: int, total_s: float, mismatches: list[int], so_far: dict) -> str:
    report = {"num_agents": 2, "num_requests": 10, "total_s": total_s, "errors": [],
              "mismatches": mismatches}
    return f"run {n}/2: 2 agents ...\n{json.dumps(report, indent=1)}\nafterwards: {{}}\nso far: {so_far}\n"


def test_runs_are_differences_of_counters_summed_over_engines(tmp_path):
    first = {'infercept:tokens_reused_total{engine="0",model_name="m"}': 10.0,
             'infercept:tokens_reused_total{engine="1",model_name="m"}': 5.0,
             'vllm:prefix_cache_hits_total{engine="0",model_name="m"}': 64.0}
    second = {'infercept:tokens_reused_total{engine="0",model_name="m"}': 30.0,
              'infercept:tokens_reused_total{engine="1",model_name="m"}': 6.0,
              'vllm:prefix_cache_hits_total{engine="0",model_name="m"}': 64.0}
    log = tmp_path / "a.log"
    log.write_text("server: infercept serve m\n" + _run(1, 3.5, [], first) + _run(2, 2.0, [4], second))

    runs = parse(log)

    assert [r["reused"] for r in runs] == [15.0, 21.0]
    assert [r["prefix hits"] for r in runs] == [64.0, 0.0]
    assert [(r["wall_s"], r["wrong"]) for r in runs] == [(3.5, 0), (2.0, 1)]
    assert "| a.log | 2 | 2.0 | 10 | 1 | 0 | 0 | 21 | 0 | 0 | 0 |" in table([log])
