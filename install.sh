#!/usr/bin/env bash
# Installs fastbond into the current Python environment.
#   bash install.sh         the package
#   bash install.sh test    the package with its test extra (pytest, pytest-benchmark, deepspeed)
#
# Why a script: a bare `torch` requirement on a machine without torch pulls a
# multi-GB CUDA build. Where no NVIDIA GPU is present we install the CPU build
# of torch first, so the requirement `torch>=2.4` is then already satisfied.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
extra=${1:-}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PYTHON" -m pip install "torch>=2.4"
  else
    "$PYTHON" -m pip install "torch==2.13.0"
  fi
fi

if [ -n "$extra" ]; then
  "$PYTHON" -m pip install -e ".[$extra]"
else
  "$PYTHON" -m pip install -e .
fi
