#!/usr/bin/env bash
# Set up .venv (once) and run the test suite: ./run_tests.sh [pytest args]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/tools/setup_env.sh" test
cd "$here"
exec "$TFQ_PYTHON" -m pytest -q tests "$@"
