"""benchmarks/gpu_check.sh: the CPU rehearsal end to end, and the goal verdicts on made-up numbers."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("_gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _gpu_check()


@pytest.mark.slow
def test_dry_run_writes_the_result_schema_and_prints_the_goal_table(tmp_path):
    out = tmp_path / "dry.json"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["schema"] == gpu_check.SCHEMA and result["dry_run"] is True
    assert {"env", "parts", "tests", "benchmarks", "step", "goals", "wall_s", "budget_s"} <= set(result)
    for key in ("device", "torch", "triton", "transformers", "cuda", "commit", "packages"):
        assert key in result["env"]
    assert set(result["env"]["packages"]) == set(gpu_check.OPTIONAL)
    assert list(result["parts"]) == ["tests", "decode", "step", "bench:linear_logprobs", "bench:jbond_loss",
                                     "bench:ema", "bench:jbond_linear", "rollout"]
    for name, part in result["parts"].items():
        assert part["status"] == "ok", (name, part)
        assert (ROOT / part["log"]).is_file()
    # The CUDA tests are collected and skipped; every suite ran its tiny shapes.
    assert result["tests"]["skipped"] > 0 and result["tests"]["failed"] == result["tests"]["errors"] == 0
    for suite in gpu_check.SUITES:
        assert (ROOT / result["benchmarks"][suite]["json"]).is_file() and result["benchmarks"][suite]["results"]
    assert set(result["step"]["by_sampler"]) == {"generate", "static"}
    for run in result["step"]["by_sampler"].values():
        step = run["steps"][-1]
        assert set(step["phases_s"]) == {"generate", "logprobs_and_loss", "backward_and_clip", "optimizer", "ema"}
        assert all(value is not None and value >= 0 for value in step["phases_s"].values())
        assert step["peak_memory_GiB"] is None
    # The decode part timed both samplers per step at each batch, beside the floor.
    assert [e["batch"] for e in result["decode"]["batches"]] == [4, 8]
    assert all(e["generate_ms"] > 0 and e["static_ms"] > 0 for e in result["decode"]["batches"])
    assert result["decode"]["floor_ms"] > 0 and "| batch | generate ms | static ms |" in proc.stdout
    # The rollout benchmark timed generate on the embedded model (vLLM, where installed, beside it).
    assert result["rollout"]["models"][0]["generate"]["samples_per_s"] > 0

    # Every goal row is there, and says why it was skipped.
    assert result["goals"] and all(g["verdict"] == "skipped" and g["reason"] == "no CUDA" for g in result["goals"])
    assert "| goal | measured | target | verdict |" in proc.stdout
    assert proc.stdout.count("skipped (no CUDA)") >= len(result["goals"])
    for dist, info in result["env"]["packages"].items():
        if info["version"] is None:
            assert f"| {dist} | — | skipped: not installed |" in proc.stdout


HEADS = {"gemma-2b": (2048, 256000), "gemma-7b": (3072, 256000), "llama3-8b": (4096, 128256)}


def _measured(triton=10.0, liger=11.0, cce=12.0, cublas=7.0, peak=900.0, cce_peak=850.0, fwd_triton=7.0,
              fwd_cublas=6.0, random_triton=12.5, random_filter=12.0, speedup=1.5, copy_ratio=0.9, lerp_ratio=1.2, vllm_ratio=2.0,
              decode_over_floor=1.5, step_s=0.5, sampling_s=0.2) -> dict:
    """A result as gpu_check.py writes it on a GPU, with the numbers the goals read."""
    linear = []
    for head, (h, v) in HEADS.items():
        for n in (4096, 16384):
            shape = {"head": head, "N": n, "H": h, "V": v}
            linear += [
                {**shape, "inputs": "trained", "mode": "fwdbwd",
                 "ms": {"triton": triton, "liger": liger, "cce": cce, "cublas": cublas},
                 "peak_extra_MiB": {"triton": peak, "cce": cce_peak}},
                {**shape, "inputs": "trained", "mode": "fwd", "ms": {"triton": fwd_triton, "cublas": fwd_cublas},
                 "peak_extra_MiB": {}},
                {**shape, "inputs": "random", "mode": "fwdbwd",
                 "ms": {"triton": random_triton, "triton_filter": random_filter, "cce": cce},
                 "peak_extra_MiB": {}},
            ]
    installed = {"version": "1", "import": "ok"}
    return {
        "env": {"cuda_available": True, "packages": dict.fromkeys(gpu_check.OPTIONAL, installed)},
        "parts": {name: {"status": "ok", "log": f"{name}.log"} for name in
                  ["tests", "decode", "step", "bench:linear_logprobs", "bench:jbond_loss", "bench:ema",
                   "bench:jbond_linear", "rollout"]},
        "tests": {"passed": 12, "failed": 0, "errors": 0, "skipped": 0},
        "benchmarks": {
            "linear_logprobs": {"results": linear},
            "jbond_loss": {"results": [{"B": 512, "T": 4096, "speedup_vs_reference": 9.0,
                                        "speedup_vs_compiled": speedup}]},
            "ema": {"results": [{"preset": p, "ratio_vs_copy": copy_ratio, "ratio_vs_foreach_lerp": lerp_ratio}
                                for p in ("gemma-2b", "gemma-7b")]},
        },
        "decode": {"status": "ok", "batches": [
            {"batch": b, "static_ms": 1.2 * decode_over_floor, "static_over_floor": decode_over_floor,
             "generate_over_floor": 15.0, "static_captured": True} for b in (8, 24, 64)]},
        "step": {"status": "ok", "by_sampler": {"static": {"steps": [
            {"step": 2, "wall_s": step_s, "phases_s": {"generate": sampling_s}}]}}},
        "rollout": {"status": "ok", "models": [{"model": "random-llama-50m", "generate": {"samples_per_s": 10.0},
                                                "vllm": {"samples_per_s": 10.0 * vllm_ratio},
                                                "vllm_over_generate": vllm_ratio}]},
    }


def _verdicts(result: dict) -> dict:
    return {row["goal"]: row["verdict"] for row in gpu_check.evaluate_goals(result)}


def test_goals_pass_when_every_number_meets_its_goal():
    verdicts = _verdicts(_measured())
    assert len(verdicts) == 47 and set(verdicts.values()) == {"PASS"}
    assert sum("llama3-8b" in goal for goal in verdicts) == 12  # every head at both N


@pytest.mark.parametrize("numbers, failing", [
    ({"triton": 11.5, "cublas": 8.5}, "≤ min(Liger, CCE)"),  # slower than Liger (11 ms)
    ({"triton": 10.5, "cublas": 7.0}, "4-GEMM floor"),  # 1.5× the bare GEMMs > 1.1 × 4/3
    ({"peak": 950.0}, "≤ CCE's + 10%"),  # 1.12× CCE's
    ({"peak": 9000.0, "cce_peak": 9000.0}, "no [N×V] buffer"),  # above a bf16 [N × V]; CCE's too
    ({"fwd_triton": 9.0}, "forward ≤ 1.4× one bare GEMM"),
    ({"random_triton": 13.5}, "random inputs"),  # 1.125× CCE
    ({"random_filter": 13.5}, "with the gradient filter"),
    ({"speedup": 0.95}, "torch.compile"),
    ({"copy_ratio": 0.8}, "copy bandwidth"),
    ({"lerp_ratio": 0.99}, "_foreach_lerp_"),
    ({"vllm_ratio": 0.9}, "vLLM rollouts"),
    ({"decode_over_floor": 2.5}, "weight-read floor"),
    ({"step_s": 0.7, "sampling_s": 0.3}, "J-BOND step with the static sampler"),
    ({"sampling_s": 0.3}, "sampling ≤ 50%"),
])
def test_a_missed_goal_is_a_fail(numbers, failing):
    verdicts = _verdicts(_measured(**numbers))
    failed = {goal for goal, verdict in verdicts.items() if verdict == "FAIL"}
    assert failed and all(failing in goal for goal in failed), failed
    assert all(verdicts[goal] == "PASS" for goal in verdicts if goal not in failed)


def test_vllm_rollouts_are_owed_where_vllm_is_not_installed():
    result = _measured()
    del result["rollout"]["models"][0]["vllm"]
    row = {r["goal"]: r for r in gpu_check.evaluate_goals(result)}
    (goal,) = [g for g in row if g.startswith("vLLM rollouts")]
    assert row[goal]["verdict"] == "skipped" and row[goal]["reason"] == "owed: vLLM is not installed on this machine"


def test_failed_cuda_tests_are_a_fail():
    result = _measured()
    result["tests"].update(passed=10, failed=2)
    assert _verdicts(result)["CUDA tests (-m cuda) all pass"] == "FAIL"


def test_skipped_rows_say_why():
    result = _measured()
    result["env"]["packages"]["liger-kernel"] = {"version": None, "import": "not installed"}
    result["env"]["packages"]["cut-cross-entropy"] = {"version": None, "import": "not installed"}
    for row in result["benchmarks"]["linear_logprobs"]["results"]:
        row["ms"].pop("liger", None)
        row["ms"].pop("cce", None)
    result["parts"]["bench:ema"]["status"] = "timed out"
    result["benchmarks"]["ema"]["results"] = []
    rows = {row["goal"]: row for row in gpu_check.evaluate_goals(copy.deepcopy(result))}
    rivals = rows["linear_logprobs fwd+bwd ≤ min(Liger, CCE) [gemma-2b N=16384, trained inputs]"]
    assert rivals["verdict"] == "skipped" and rivals["reason"] == "liger-kernel and cut-cross-entropy not installed"
    ema = rows["EMA ≥ 85% of copy bandwidth [gemma-2b]"]
    assert ema["verdict"] == "skipped" and ema["reason"] == "benchmark timed out"
    table = gpu_check.goal_table(list(rows.values()))
    assert "skipped (liger-kernel and cut-cross-entropy not installed)" in table
    assert "skipped (benchmark timed out)" in table


def test_a_part_past_its_timeout_is_killed_and_recorded_as_timed_out(tmp_path):
    part = gpu_check.Part("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], cap_s=1, estimate_s=1)
    record = gpu_check.run_part(part, timeout=1, log=tmp_path / "sleeper.log", env=dict(os.environ))
    assert record["status"] == "timed out" and record["seconds"] < 30


@pytest.mark.slow
def test_forward_sweep_rehearsal_checks_each_configuration_against_chunked(tmp_path):
    """benchmarks/forward_sweep.py --tiny: the sweep's plumbing under the interpreter (timings mean nothing)."""
    out = tmp_path / "sweep.json"
    command = [sys.executable, "benchmarks/forward_sweep.py", "--tiny", "--budget-s", "3", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["stopped"] == "budget"
    measured = [c for c in result["configs"] if "ms" in c]
    assert measured and all(c["max_abs_err"] < 1e-4 for c in measured)
    assert {c["per_program"] for c in measured} >= {"auto", 1}
