#!/usr/bin/env bash
# Set up (if needed), check lint and types (ruff, mypy), and run the test suite on CPU. Extra arguments go to pytest.
# The test files are shared among SPARTA_TEST_WORKERS processes (default: the cores, at most 4; 0 runs
# everything in this process). Each file runs whole on one worker, so its module fixtures are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the lint and type gate first (configured in pyproject.toml): zero findings, or the suite does not run
.venv/bin/ruff check .
.venv/bin/mypy
cores=$(nproc)
workers=${SPARTA_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
if [ "$workers" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
