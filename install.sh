#!/usr/bin/env bash
# Installs fastbond into the current Python environment.
#   bash install.sh         the package
#   bash install.sh test    the package with its test extra (pytest, pytest-benchmark, deepspeed)
#
# Why a script: a bare `torch` requirement on a machine without torch pulls a
# multi-GB CUDA build from the default index. Where no NVIDIA GPU is present,
# torch is installed first from PyTorch's CPU wheel index, so the package's
# `torch>=2.4` is then already satisfied. Where that index cannot be reached
# (an offline mirror, a closed network), it falls back to the default index
# and says so: on a plain PyPI that gives the CUDA build of the same version.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CPU_INDEX=https://download.pytorch.org/whl/cpu
extra=${1:-}

say() { echo "install.sh: $*"; }

cpu_index_reachable() {
  "$PYTHON" - "$CPU_INDEX/torch/" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=10)
except Exception:
    sys.exit(1)
PY
}

if "$PYTHON" -c "import torch" 2>/dev/null; then
  say "torch $("$PYTHON" -c 'import torch; print(torch.__version__)') is already installed; keeping it"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  say "NVIDIA GPU found: installing torch (CUDA build) from the default index"
  "$PYTHON" -m pip install "torch>=2.4"
elif cpu_index_reachable && "$PYTHON" -m pip install "torch==$TORCH_VERSION" --index-url "$CPU_INDEX"; then
  say "no NVIDIA GPU: installed the CPU build of torch $TORCH_VERSION from PyTorch's CPU index ($CPU_INDEX)"
else
  say "no NVIDIA GPU and PyTorch's CPU index is not reachable: installing torch $TORCH_VERSION from the default index"
  "$PYTHON" -m pip install "torch==$TORCH_VERSION"
  say "installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)') from the default index" \
      "(CUDA build: $("$PYTHON" -c 'import torch; print(torch.version.cuda is not None)'))"
fi

if [ -n "$extra" ]; then
  "$PYTHON" -m pip install -e ".[$extra]"
else
  "$PYTHON" -m pip install -e .
fi
