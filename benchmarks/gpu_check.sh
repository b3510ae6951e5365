#!/usr/bin/env bash
# One command for the GPU day (benchmarks/README.md, "GPU day"):
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out PATH]
#
# Installs the wheels that benchmarks/build_wheels.sh put into .whl/ (the GPU
# machine has no registry access), installs fastbond itself if it is not
# importable, then runs benchmarks/gpu_check.py: CUDA tests, benchmarks at real
# shapes, one J-BOND step of a Gemma-2B-shaped model, and the goal table, in
# at most 8 minutes. --dry-run rehearses it on CPU at tiny shapes and installs
# nothing. --install-only stops after the installation.
set -euo pipefail
export GPU_CHECK_CWD=$PWD  # --out is relative to here
cd "$(dirname "$0")/.."
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s)}  # the 8-minute budget counts from here
PYTHON=${PYTHON:-python3}
say() { echo "[$(date +%H:%M:%S)] $*"; }

dry_run=0 install_only=0 args=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1; args+=("$arg") ;;
        --install-only) install_only=1 ;;
        *) args+=("$arg") ;;
    esac
done

if [[ $dry_run == 1 ]]; then
    say "dry run: nothing is installed"
elif compgen -G ".whl/*.whl" >/dev/null; then
    # Pure-Python wheels fit any interpreter; a compiled one only the CPython it was built for.
    tag=$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    wheels=()
    for wheel in .whl/*.whl; do
        case "$wheel" in
            *-none-any.whl | *-"$tag"-*) wheels+=("$wheel") ;;
            *) say "not for this Python ($tag), not installed: $wheel" ;;
        esac
    done
    say "installing ${#wheels[@]} wheels from .whl/"
    "$PYTHON" -m pip install -q --no-deps --no-index "${wheels[@]}" \
        || say "warning: the wheels did not install; what is missing shows as 'skipped: not installed'"
else
    say "no .whl/ (benchmarks/build_wheels.sh makes it): Liger, CCE and DeepSpeed only if already installed"
fi

if ! "$PYTHON" -c "import fastbond.kernels" 2>/dev/null; then
    # setup.py has no pyproject.toml beside it, so pip would take the legacy
    # `setup.py develop` path, which itself calls pip with build isolation and
    # needs the registry: ask for the PEP 660 editable with the installed
    # setuptools instead.
    say "installing fastbond (editable, no dependencies, offline)"
    "$PYTHON" -m pip install -q --no-deps --no-index --no-build-isolation --use-pep517 -e . \
        || "$PYTHON" -m pip install -q --no-deps --no-index --no-build-isolation -e . \
        || true
    if ! "$PYTHON" -c "import fastbond.kernels"; then
        say "fastbond is not importable after installation: stopping"
        exit 1
    fi
fi

[[ $install_only == 1 ]] && { say "installed"; exit 0; }
exec "$PYTHON" benchmarks/gpu_check.py ${args[@]+"${args[@]}"}
