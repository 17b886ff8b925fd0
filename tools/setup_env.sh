#!/usr/bin/env bash
# Sourced by run_local.sh and run_tests.sh: makes .venv in the checkout with tfquant installed, once.
# Usage: source tools/setup_env.sh main|test   ("test" also installs the test dependencies; the argument
# is required because a sourced script otherwise sees its caller's arguments)
set -euo pipefail
TFQ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TFQ_VENV="$TFQ_ROOT/.venv"
TFQ_PYTHON="$TFQ_VENV/bin/python"
case "${1:-}" in
  main) spec="." ;;
  test) spec=".[test]" ;;
  *) echo "tools/setup_env.sh: expected 'main' or 'test' as its argument, got '${1:-}'" >&2; exit 2 ;;
esac
# Re-install only when setup.py (the dependency list) changes or a new extra is asked for.
stamp="$TFQ_VENV/.tfquant-setup-$1"
want="$(sha256sum "$TFQ_ROOT/setup.py" | cut -d' ' -f1)"
if [ ! -x "$TFQ_PYTHON" ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "tfquant: setting up $TFQ_VENV (first use; installs TensorFlow, a few minutes)" >&2
  if ! command -v python3 >/dev/null 2>&1; then
    echo "tfquant: python3 not found; expected Python 3.9 or newer on PATH" >&2
    exit 1
  fi
  [ -x "$TFQ_PYTHON" ] || python3 -m venv "$TFQ_VENV"
  "$TFQ_PYTHON" -m pip install --quiet --upgrade pip >&2
  (cd "$TFQ_ROOT" && "$TFQ_PYTHON" -m pip install --quiet -e "$spec") >&2
  echo "$want" > "$stamp"
  rm -f "$TFQ_ROOT/tfquant/kernels/lib/activation_quant.so.failed"  # a new TensorFlow: try the build again
fi

# The activation kernels of training graphs (tfquant/kernels): built once, again when their source changes
# (the stamp's first line is the source's sha256; `python -m tfquant.kernels.build` also checks TensorFlow's
# version). A failed build prints one line, is not retried until the source changes, and training graphs
# use the op chain.
kernels="$TFQ_ROOT/tfquant/kernels"
source_sum="$(sha256sum "$kernels/activation_quant.cc" | cut -d' ' -f1)"
if [ "$(head -n1 "$kernels/lib/activation_quant.so.stamp" 2>/dev/null)" != "$source_sum" ] \
    && [ "$(cat "$kernels/lib/activation_quant.so.failed" 2>/dev/null)" != "$source_sum" ]; then
  echo "tfquant: building the activation kernels (tfquant/kernels; once, about 20 s)" >&2
  (cd "$TFQ_ROOT" && TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" "$TFQ_PYTHON" -m tfquant.kernels.build) \
    || { mkdir -p "$kernels/lib" && echo "$source_sum" > "$kernels/lib/activation_quant.so.failed"; }
fi

FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_DIR/t10k-labels-idx1-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tfquant: installing Fashion-MNIST (Debian package dataset-fashion-mnist)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } >&2 \
      || echo "tfquant: could not install dataset-fashion-mnist; Fashion-MNIST runs need --data_dir_local" >&2
  else
    echo "tfquant: Fashion-MNIST not found in $FMNIST_DIR; run 'sudo apt-get install dataset-fashion-mnist'" \
         "or pass --data_dir_local with the four IDX .gz files" >&2
  fi
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
