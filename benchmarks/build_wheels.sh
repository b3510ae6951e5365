#!/usr/bin/env bash
# Wheels for the GPU day, made where the package registries can be reached:
#
#   bash benchmarks/build_wheels.sh        # → .whl/ (git-ignored), then checked in a throwaway venv
#
# The GPU machine has torch, triton and transformers but no registry access and
# no Liger-Kernel, Cut Cross-Entropy or DeepSpeed; benchmarks/gpu_check.sh
# installs what is here with `pip install --no-deps --no-index`. --no-deps, so
# the dependencies that machine lacks are listed too (DeepSpeed's hjson and
# pydantic; its other needs are there). Everything is pure Python except
# pydantic-core, fetched for the GPU machine's CPython (GPU_PYTHON, default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
GPU_PYTHON=${GPU_PYTHON:-3.12}
LIMIT_MIB=64
out=.whl
say() { echo "[$(date +%H:%M:%S)] $*"; }

pure=(
    liger-kernel==0.8.5
    cut-cross-entropy==25.1.1
    hjson==3.1.0                # DeepSpeed's config parser
    pydantic==2.13.4            # DeepSpeed's config models, with what pydantic needs:
    annotated-types==0.7.0
    typing-inspection==0.4.2
)
rm -rf "$out" && mkdir -p "$out"
say "downloading ${#pure[@]} pure-Python wheels"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$out" "${pure[@]}"
say "building DeepSpeed's wheel (no ops compiled: pure Python)"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$out" deepspeed==0.19.8
say "downloading pydantic-core for CPython $GPU_PYTHON on x86-64 Linux"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out" pydantic-core==2.46.4

ls -l "$out"
total=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
say "$(ls "$out"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $out/"
if (( total > LIMIT_MIB * 1024 * 1024 )); then
    say "error: more than $LIMIT_MIB MiB"; exit 1
fi

# The check: gpu_check.sh's own installation step, into a throwaway venv that
# sees this machine's torch (forced, so versions installed here are not taken
# instead), then each package's import from the venv.
venv=$(mktemp -d)/venv
"$PYTHON" -m venv --system-site-packages "$venv"
PIP_FORCE_REINSTALL=1 PYTHON="$venv/bin/python" bash benchmarks/gpu_check.sh --install-only
for module in liger_kernel cut_cross_entropy deepspeed hjson pydantic; do
    where=$("$venv/bin/python" -c "import $module, os; print(os.path.dirname($module.__file__))" 2>/dev/null | tail -1) || where=""
    if [[ $where == "$venv"/* ]]; then
        say "venv: import $module ok, from the venv"
    elif [[ -n $where ]]; then
        say "venv: import $module ok, but from $where (not the wheel)"
    else
        say "venv: import $module failed here (on a machine without CUDA some need a GPU to import):"
        "$venv/bin/python" -c "import $module" 2>&1 | tail -1
    fi
done
rm -rf "$(dirname "$venv")"
say "done: carry $out/ to the GPU machine with the repository"
