#!/usr/bin/env bash
# The test command: installs the package with its test extras into the active (or a new) venv, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  python3 -m venv .venv
  . .venv/bin/activate
fi
# torch (CPU build, pinned so pip takes the local CPU wheel rather than a CUDA build) lets the
# pickled-checkpoint tests run; it is an optional extra of the package itself.
python -m pip install --quiet "torch==2.13.0" -e ".[test,torch]"
export JAX_PLATFORMS=cpu
set +e
python -m pytest -n 2 --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
