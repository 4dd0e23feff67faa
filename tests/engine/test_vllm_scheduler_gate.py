"""vLLM 0.32.0's own scheduler tests gate InferCept's scheduler.

vLLM's `tests/v1/core/test_scheduler.py` and `test_async_scheduler.py` (fake
model outputs, no GPU) are fetched from vLLM's pinned sdist on PyPI (sha256
checked, cached under ~/.cache/infercept/vllm-gate; INFERCEPT_VLLM_SDIST=path
uses a local copy) and run in pytest subprocesses: once with vLLM's scheduler
(the outcomes cached per sdist, vLLM version, plugin and stand-in model), and
with InferCept's (`InterceptScheduler`/`AsyncInterceptScheduler` put wherever
the tests construct vLLM's, configured through
`additional_config["infercept"]` and, for the swap policies, InferCept's KV
connector). Every test that passes with vLLM's scheduler must pass with
InferCept's, except `tests/vllm_gate/gate_runner.py`'s EXCEPTIONS (each with
its reason). The failure message lists each regression with its error.

Policy: min-waste by default (CI); every policy, or a list:

    INFERCEPT_GATE_POLICIES=all scripts/test.sh tests/engine/test_vllm_scheduler_gate.py
    scripts/vllm_gate.sh --policies all          # the same, without pytest around it

Needs the network the first time (the 45 MB sdist) unless INFERCEPT_VLLM_SDIST
is set. Harness: tests/vllm_gate/ (gate_fetch.py, gate_plugin.py, gate_runner.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vllm_gate"))

import gate_runner  # noqa: E402

POLICIES = gate_runner.parse_policies(os.environ.get("INFERCEPT_GATE_POLICIES"))
# Below these the gate would be vacuous: vLLM's tests broken here (185 pass with
# vLLM's scheduler on this project's machine), or InferCept's scheduler not put
# in place (207 tests build it).
MIN_STOCK_PASSES = 150
MIN_EXERCISED = 150


@pytest.fixture(scope="module")
def prepared():
    try:
        return gate_runner.prepare()
    except gate_runner.fetch.FetchError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def stock(prepared):
    run = gate_runner.stock_run(prepared)
    passed = len(run.ids("passed"))
    assert passed >= MIN_STOCK_PASSES, (
        f"only {passed} of vLLM's scheduler tests pass with vLLM's own scheduler "
        f"here ({run.counts()}); see {run.log_path}")
    return run


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("policy", POLICIES)
def test_vllm_scheduler_tests_pass_with_infercept_scheduler(prepared, stock, policy):
    gate = gate_runner.run_tests(prepared, "infercept", policy)
    verdict = gate_runner.compare(stock, gate)
    report = gate_runner.describe(stock, gate, verdict)
    print(report)
    assert verdict.exercised >= MIN_EXERCISED, (
        f"only {verdict.exercised} tests built InferCept's scheduler "
        f"(patched: {gate.patched}); has vLLM's test layout changed?\n{report}")
    no_regression = verdict.ok
    assert no_regression, "\n" + report
