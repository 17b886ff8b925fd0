#!/usr/bin/env bash
# Set up .venv (once) and run the test suite: ./run_tests.sh [pytest args]
# Two pytest workers by default (TFQ_TEST_WORKERS=N to change, 0 for one process); each test file runs
# whole in one worker, so a module's fixtures are built once. Files are handed out in collection order
# (--no-loadscope-reorder): tests/benchmarks, learners and nets, which hold the long subprocess runs, first and
# the many short tfquant files last, so the workers end together. xdist's default order (most tests first)
# leaves the one-test files - the longest runs among them (test_stop_resume, test_scale) - for the end, where
# one worker waits while the other finishes them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/tools/setup_env.sh" test
cd "$here"
exec "$TFQ_PYTHON" -m pytest -q -n "${TFQ_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder tests "$@"
