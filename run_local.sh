#!/usr/bin/env bash
# Run a tfquant job: ./run_local.sh nets/<model>_at_<dataset>_run.py [--flag=value ...]
# The first use sets up .venv in this checkout (and Fashion-MNIST when it can); later uses skip that.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "run_local.sh: expected a run script as first argument (e.g. nets/resnet_at_fmnist_run.py), got '${1:-}'" >&2
  exit 2
fi
source "$here/tools/setup_env.sh" main
script="$1"; shift
case " $* " in
  # N worker processes on free localhost ports, each with its TF_CONFIG (tools/launch_workers.py).
  *" --nb_workers"*) exec "$TFQ_PYTHON" "$here/tools/launch_workers.py" "$script" "$@" ;;
esac
exec "$TFQ_PYTHON" "$script" "$@"
