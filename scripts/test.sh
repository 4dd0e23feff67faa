#!/usr/bin/env bash
# Runs InferCept's test suite; sets everything up first when needed.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -k planner).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh || exit 1
"$root/.venv/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
