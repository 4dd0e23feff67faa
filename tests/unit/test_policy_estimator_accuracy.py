"""benchmarks/estimator_accuracy.py runs end to end on a small workload file."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "estimator_accuracy.py"


def load_script():
    spec = importlib.util.spec_from_file_location("estimator_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_report_compares_the_estimator_with_the_elapsed_time(tmp_path, capsys):
    workloads = tmp_path / "augmentations.json"
    workloads.write_text(json.dumps({"augmentations": {
        "qa": {"interception_s": [0.69, 0.17], "context_tokens": [1846, 428]},
        "chatbot": {"interception_s": [28.6, 15.6], "context_tokens": [753, 703]},
    }}))
    out = tmp_path / "report.json"
    report = load_script().main(["--workloads", str(workloads), "--requests", "60",
                                 "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert "chatbot" in capsys.readouterr().out
    for by_predictor in report["results"].values():
        estimator, elapsed = by_predictor["estimator"], by_predictor["elapsed"]
        for summary in (estimator, elapsed):
            assert 0.0 <= summary["agree"] <= 1.0
            assert summary["excess_waste"] >= 0.0
        # the per-tool history beats "as long again as it has lasted" on these tools
        assert estimator["mae_rel"] < elapsed["mae_rel"]
        assert estimator["excess_waste"] < elapsed["excess_waste"]


def test_same_seed_same_report(tmp_path):
    workloads = tmp_path / "augmentations.json"
    workloads.write_text(json.dumps({"augmentations": {
        "tts": {"interception_s": [17.24, 7.6], "context_tokens": [1251, 792]}}}))
    args = ["--workloads", str(workloads), "--requests", "20", "--seed", "3"]
    module = load_script()
    assert module.main(args) == module.main(args)


def test_default_workloads_path_is_the_shared_folder_beside_the_repository():
    assert load_script().DEFAULT_WORKLOADS == (SCRIPT.parents[1].parent / "shared"
                                               / "workloads" / "augmentations.json")
