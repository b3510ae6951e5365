"""Every CUDA launch of the fused ops compiles for sm_80 and sm_90, fits, and spills nothing.

The check runs in a subprocess: this test session has TRITON_INTERPRET=1
(tests/conftest.py), under which `@triton.jit` functions cannot be compiled
for a GPU. CI compiles the representative subset (about two minutes on two
cores); `FASTBOND_COMPILE_CHECK=full` compiles every launch the dispatch can
make (about 25 minutes on two cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastbond.kernels.compile_check import Compiled, coverage_problems
from fastbond.kernels.tuning import ARCHS, Launch

triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
FULL = os.environ.get("FASTBOND_COMPILE_CHECK") == "full"
FULL_COMMAND = "python -m fastbond.kernels.compile_check --full --record (about 25 minutes on 2 cores)"
KERNELS = {"_linear_logprobs_fwd_kernel", "_linear_logprobs_dlogits_kernel", "_live_dz_t_x_kernel",
           "_live_dz_w_kernel", "_jbond_fwd_kernel", "_jbond_bwd_kernel", "_ema_kernel"}


@pytest.mark.slow
@pytest.mark.skipif(not PTXAS.exists(), reason="this triton wheel has no NVIDIA backend")
def test_every_cuda_launch_compiles_fits_and_spills_nothing(tmp_path):
    report_path = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "fastbond.kernels.compile_check", "--jobs", "2", "--json", str(report_path)]
    proc = subprocess.run(command + (["--full"] if FULL else []), env=env, capture_output=True, text=True,
                          timeout=4 * 3600 if FULL else 900)
    assert report_path.exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert not report["problems"], "\n".join(report["problems"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    compiled = {(r["kernel"], r["arch"]) for r in report["results"]}
    assert compiled == {(k, arch) for k in KERNELS for arch in ARCHS}
    for r in report["results"]:
        if r["kernel"].startswith(("_linear", "_live")):
            assert r["tensor_cores"], r


def test_the_recorded_full_run_matches_the_kernels_and_their_launches():
    """Every kernel, flag and tile list as it is now was compiled cleanly by a full run (`--full --record`)."""
    from fastbond.kernels.compile_check import RECORD

    assert RECORD.exists(), f"no record of a full compile check: run {FULL_COMMAND}"
    record = json.loads(RECORD.read_text())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastbond.kernels.compile_check", "--fingerprint"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == record["fingerprint"], (
        f"the kernels or their launches changed since the last full compile check: run {FULL_COMMAND}")
    for key, row in record["worst_case"].items():
        assert row["max_spill_bytes"] == 0, key


# ----------------------------------------------------------------------------
# the rules themselves
# ----------------------------------------------------------------------------


class _Param:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class _FakeKernel:
    __name__ = "fake"
    params = [_Param("x_ptr", False), _Param("n", False), _Param("FLAG", True), _Param("BLOCK", True)]
    arg_names = [p.name for p in params]


def _launch(**constexprs):
    return Launch(kernel=_FakeKernel, label=str(constexprs), signature={"x_ptr": "*fp32", "n": "i32"},
                  constexprs=constexprs, num_warps=4, num_stages=3)


def test_coverage_flags_missing_constexprs_and_one_sided_flags():
    both = [_launch(FLAG=True, BLOCK=64), _launch(FLAG=False, BLOCK=64)]
    assert coverage_problems(both) == []
    assert any("only ever compiled as True" in p for p in coverage_problems(both[:1]))
    assert any("no value for constexpr ['BLOCK']" in p for p in coverage_problems([_launch(FLAG=True),
                                                                                   _launch(FLAG=False)]))


def test_a_launch_fails_on_spills_shared_memory_scalar_loads_and_missing_tensor_cores():
    clean = dict(kernel="k", label="c", arch=80, ok=True, shared=1024, registers=128, tensor_cores=True,
                 needs_tensor_cores=True, vector_loads=8, needs_vector_loads=8)
    assert Compiled(**clean).problems() == []
    assert "spilled" in Compiled(**dict(clean, spill_bytes=16)).problems()[0]
    assert "shared memory" in Compiled(**dict(clean, shared=170_000)).problems()[0]
    assert Compiled(**dict(clean, arch=90, shared=170_000)).problems() == []  # H100 holds it
    assert "tensor cores" in Compiled(**dict(clean, tensor_cores=False)).problems()[0]
    assert "vector loads" in Compiled(**dict(clean, vector_loads=4)).problems()[0]
    assert "does not compile" in Compiled(**dict(clean, ok=False, error="boom")).problems()[0]
