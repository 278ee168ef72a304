#!/usr/bin/env bash
# Set up (if needed), check lint and types (ruff, mypy), and run the test suite on CPU. Extra arguments go to pytest.
# The tests are shared among SPARTA_TEST_WORKERS processes (default: the cores, at most 4; 0 runs
# everything in this process); an idle worker takes tests from a busy one's queue (pytest-xdist's
# worksteal), so the long files do not leave the other worker idle at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the lint gate first (configured in pyproject.toml): any finding stops the run before the tests
.venv/bin/ruff check .
# the type check (about 15 s of CPU) runs beside the tests; a finding fails the run as a failed test does
mypy_log=$(mktemp)
.venv/bin/mypy > "$mypy_log" 2>&1 &
mypy_pid=$!
cores=$(nproc)
workers=${SPARTA_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
set +e
if [ "$workers" -gt 0 ]; then
  .venv/bin/python -m pytest -q -n "$workers" --dist worksteal "$@"
else
  .venv/bin/python -m pytest -q "$@"
fi
tests_rc=$?
wait "$mypy_pid"
mypy_rc=$?
set -e
cat "$mypy_log"
rm -f "$mypy_log"
if [ "$tests_rc" -ne 0 ]; then
  exit "$tests_rc"  # (5: pytest collected no tests; .ci/run reports it)
fi
exit "$mypy_rc"
