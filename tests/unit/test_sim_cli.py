"""`infercept sim` end to end on a tiny profile and trace, without importing vLLM."""

import json
import subprocess
import sys
from pathlib import Path

from infercept.bench.workload import generate_trace
from test_sim_properties import SMALL

REPO = Path(__file__).resolve().parents[2]
RUN_CLI = """
import sys
from infercept.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert exit.code == 0, exit.code
assert "vllm" not in sys.modules and "torch" not in sys.modules
"""


def test_sim_writes_the_summary_stats_and_plots_without_vllm(tmp_path):
    profile_path = tmp_path / "small.json"
    profile_path.write_text(json.dumps(SMALL.to_dict()))
    trace_path = tmp_path / "trace.json"
    generate_trace("mix", 20, 2.0, 0, time_scale=0.05, length_scale=0.25,
                   max_context_tokens=1000).save(trace_path)
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-c", RUN_CLI, "sim", "--profile", str(profile_path),
                    "--trace", str(trace_path), "--rates", "2,4", "--policies",
                    "vllm,min-waste", "--out", str(out), "--quiet"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"vllm", "min-waste"}
    assert [run["rate"] for run in summary["policies"]["min-waste"]["runs"]] == [2.0, 4.0]
    assert summary["slo_p90_s_per_token"] == SMALL.slo_p90_s_per_token
    stats = json.loads((out / "sim_stats.json").read_text())
    assert stats["min-waste"]["4"]["iterations"] > 0
    for name in ("summary.md", "config.json", "latency_vs_rate.png", "recompute_waste.png"):
        assert (out / name).stat().st_size > 0
