#!/usr/bin/env bash
# Serves InferCept's embedded default model (SmolLM2-135M-Instruct) on
# 127.0.0.1; sets everything up first when needed. Extra arguments go to
# `infercept serve` (any `vllm serve` argument, e.g. --port 8001).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
port=8000
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --port) port=${args[i + 1]:-$port} ;;
    --port=*) port=${args[i]#--port=} ;;
  esac
done
cat >&2 <<MSG
InferCept is starting on http://127.0.0.1:$port (the first start converts the
default model, ~20 s). When it logs "Application startup complete", query it:
  curl http://127.0.0.1:$port/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}'
MSG
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$root/.venv/bin/infercept" serve --host 127.0.0.1 --port "$port" "$@"
