#!/usr/bin/env bash
# Set up .venv (once) and run the test suite: ./run_tests.sh [pytest args]
# Two pytest workers by default (TFQ_TEST_WORKERS=N to change, 0 for one process); each test file runs
# whole in one worker, so a module's fixtures are built once.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/tools/setup_env.sh" test
cd "$here"
exec "$TFQ_PYTHON" -m pytest -q -n "${TFQ_TEST_WORKERS:-2}" --dist loadfile tests "$@"
