#!/usr/bin/env bash
# vLLM 0.32.0's own scheduler tests as a gate for InferCept's scheduler
# (tests/vllm_gate/gate_runner.py): fetches them from vLLM's pinned sdist (cached
# under ~/.cache/infercept/vllm-gate), runs them with vLLM's scheduler (cached)
# and with InferCept's under each policy, and fails if a test that passes with
# vLLM's fails with InferCept's (except the listed, explained exceptions).
#   scripts/vllm_gate.sh                       # min-waste
#   scripts/vllm_gate.sh --policies all        # every policy
#   scripts/vllm_gate.sh --policies swap -- -k preempt
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh || exit 1
exec "$root/.venv/bin/python" tests/vllm_gate/gate_runner.py "$@"
