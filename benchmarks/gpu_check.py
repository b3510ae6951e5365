"""One command for the GPU day: CUDA tests, benchmarks at real shapes, one J-BOND step, the goal table.

    bash benchmarks/gpu_check.sh [--dry-run] [--out PATH]     # the entry: installs carried wheels, then this

Parts, each a subprocess with its own timeout inside one 9.5-minute budget:

    tests                 python -m pytest -m cuda tests          pass / fail / skip counts
    decode                benchmarks/decode_speed.py: ms per decode step of generate and of the static
                          sampler at batch 8, 24, 64 (Gemma-2B shape), beside the weight-read floor
    step                  benchmarks/jbond_step.py: a J-BOND step of a Gemma-2B-shaped model, phase by
                          phase, sampling with generate and with the static sampler
    bench:<suite>         benchmarks/test_bench_<suite>.py --benchmark-enable --benchmark-json=…,
                          at the real shapes (-k picks them, `SUITES`)
    rollout               benchmarks/rollout_speed.py: samples/s of each sampler (vLLM where installed)

A part that runs past its timeout is killed with its process group and
recorded as "timed out". The result, `benchmarks/results/<gpu>-<date>.json`
(or --out), holds the environment, every part's status, the test counts, a
summary of each suite's numbers, the step's phase timings, and the goal rows
of benchmarks/README.md, also printed as a markdown table. The raw files
(logs, pytest-benchmark JSON, JUnit XML) are in the directory of the same
name beside it.

--dry-run rehearses all of it on CPU at the suites' tiny shapes, in seconds
per part: CUDA is hidden from the parts, and every goal row says "skipped (no CUDA)".
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCHEMA = "fastbond-gpu-check/1"
BUDGET_S = 570  # the whole command, wheel installation included (one device call runs at most 600 s)
REPORT_S = 15  # kept back for the summary and the table

# Goals (benchmarks/README.md). linear_logprobs recomputes the logits in its
# backward: 4 GEMMs against the 3 any implementation needs, a floor of 4/3 of
# the bare GEMMs; the goal is 1.1x that floor.
FLOOR_OVER_GEMMS = 4 / 3
GOAL_OVER_FLOOR = 1.1
GOAL_EMA_OVER_COPY = 0.85
# The LM-head kernel at Cut Cross-Entropy's pace: forward within 1.4× one bare GEMM; on random inputs (CCE's
# filter's best case) within 1.1× of CCE.
GOAL_FORWARD_OVER_GEMM = 1.4
GOAL_RANDOM_OVER_CCE = 1.1
# Sampling (issue: the static sampler): a decode step at batch ≤ 24 within 2× of reading the weights once;
# the Gemma-2B-shaped J-BOND step within 0.6 s, sampling at most half of it.
GOAL_DECODE_OVER_FLOOR = 2.0
GOAL_DECODE_BATCHES = (8, 24)
GOAL_STEP_S = 0.6
GOAL_SAMPLING_SHARE = 0.5

# Packages carried as wheels (benchmarks/build_wheels.sh): distribution → module.
OPTIONAL = {"liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy", "deepspeed": "deepspeed"}


@dataclass
class Part:
    name: str
    command: list[str]
    cap_s: int  # its own timeout
    estimate_s: int  # expected on one H100/H200, for the budget in benchmarks/README.md
    floor_s: int = 20  # not started with less time than this left
    files: dict = field(default_factory=dict)


# Benchmark suites and the cases run on CUDA (-k): each suite's main shape at
# least, within the budget. On CPU every suite runs its own tiny shapes whole.
SUITES = {
    # The three heads at both N: on trained-statistics inputs triton, CCE and the bare GEMMs, fwd and fwd+bwd; on
    # random inputs triton and CCE fwd+bwd; triton with its gradient filter (triton_filter) fwd+bwd on both. No Liger
    # (no goal since CCE is the faster rival), torch.compile, fp32 reference or chunked (seconds a call, not a goal).
    "linear_logprobs": ("(trained and (triton or cce or cublas) and not (bwd and not fwdbwd))"
                        " or (random and (triton or cce) and fwdbwd)", 270, 200),
    # The largest batch: torch.compile compiles once per shape.
    "jbond_loss": ("B512-T4096", 90, 60),
    # Both presets: memory-bound passes of a few hundred ms.
    "ema": (None, 60, 30),
    # The smaller batch; not behind a goal, so it runs last.
    "jbond_linear": ("B16xT256", 70, 50),
}
STEP_CAP_S, STEP_ESTIMATE_S = 210, 150  # two runs: generate, then the static sampler (its compile included)
DECODE_CAP_S, DECODE_ESTIMATE_S = 120, 80
ROLLOUT_CAP_S, ROLLOUT_ESTIMATE_S = 60, 30  # benchmarks/rollout_speed.py: generate vs vllm samples/s
TESTS_CAP_S, TESTS_ESTIMATE_S = 150, 90  # two decode steps compiled among them


def parts(raw: Path, cuda: bool) -> list[Part]:
    py = sys.executable
    tests = Part("tests", [py, "-m", "pytest", "-m", "cuda", "tests", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={raw / 'tests.xml'}"], TESTS_CAP_S, TESTS_ESTIMATE_S,
                 files={"junit": raw / "tests.xml"})
    bench = {}
    for suite, (select, cap, estimate) in SUITES.items():
        command = [py, "-m", "pytest", str(BENCH / f"test_bench_{suite}.py"), "-q", "-p", "no:cacheprovider",
                   "--benchmark-enable", f"--benchmark-json={raw / f'bench-{suite}.json'}",
                   f"--junitxml={raw / f'bench-{suite}.xml'}"]
        if cuda and select:
            command += ["-k", select]
        bench[suite] = Part(f"bench:{suite}", command, cap, estimate,
                            files={"json": raw / f"bench-{suite}.json", "junit": raw / f"bench-{suite}.xml"})
    decode_args = [] if cuda else ["--tiny", "--batches", "4,8", "--short", "2", "--long", "10", "--prompt-tokens", "8"]
    decode = Part("decode", [py, str(BENCH / "decode_speed.py"), "--out", str(raw / "decode.json"), *decode_args],
                  DECODE_CAP_S, DECODE_ESTIMATE_S, floor_s=60 if cuda else 20, files={"json": raw / "decode.json"})
    step_args = [] if cuda else ["--tiny", "--prompts", "4", "--new-tokens", "8"]
    step = Part("step", [py, str(BENCH / "jbond_step.py"), "--out", str(raw / "step.json"), *step_args],
                STEP_CAP_S, STEP_ESTIMATE_S, floor_s=90 if cuda else 20, files={"json": raw / "step.json"})
    rollout_args = ["--device", "cuda"] if cuda else ["--device", "cpu", "--quick"]
    rollout = Part("rollout", [py, str(BENCH / "rollout_speed.py"), "--out", str(raw / "rollout.json"), *rollout_args],
                   ROLLOUT_CAP_S, ROLLOUT_ESTIMATE_S, files={"json": raw / "rollout.json"})
    return [tests, decode, step, bench["linear_logprobs"], bench["jbond_loss"], bench["ema"], bench["jbond_linear"],
            rollout]


# --------------------------------------------------------------------------- #
# running the parts
# --------------------------------------------------------------------------- #


class Clock:
    def __init__(self, t0: float):
        self.t0 = t0

    def elapsed(self) -> float:
        return time.time() - self.t0

    def say(self, message: str) -> None:
        e = int(self.elapsed())
        print(f"[{time.strftime('%H:%M:%S')} +{e // 60:02d}:{e % 60:02d}] {message}", flush=True)


def run_part(part: Part, timeout: float, log: Path, env: dict) -> dict:
    """Run `part.command` with its output in `log`; kill its whole process group past `timeout`."""
    started = time.time()
    with log.open("w") as out:
        proc = subprocess.Popen(part.command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
            status = "ok" if returncode == 0 else f"failed (exit {returncode})"
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            returncode, status = None, "timed out"
    return {"status": status, "exit": returncode, "seconds": round(time.time() - started, 1),
            "timeout_s": round(timeout), "log": shown(log), "command": part.command}


def junit_counts(path: Path) -> dict | None:
    """passed / failed / errors / skipped of a JUnit XML file, and the ids of what failed."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_ids": []}
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        key = "failed" if "failure" in tags else "errors" if "error" in tags else \
            "skipped" if "skipped" in tags else "passed"
        counts[key] += 1
        if key in ("failed", "errors"):
            counts["failed_ids"].append(f"{case.get('classname')}::{case.get('name')}")
    return counts


def shown(path: Path) -> str:
    """A path as the result records it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- #
# the environment (probed in a subprocess: this process never touches the GPU)
# --------------------------------------------------------------------------- #


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def probe_environment() -> dict:
    from importlib import metadata

    import transformers

    env = _load("_bench_conftest", BENCH / "conftest.py").environment()
    env.update(transformers=transformers.__version__, python=platform.python_version(), machine=platform.machine())
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=False).stdout.strip()
    env["uncommitted_changes"] = bool(dirty)
    packages = {}
    for dist, module in OPTIONAL.items():
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            packages[dist] = {"version": None, "import": "not installed"}
            continue
        try:
            __import__(module)
            packages[dist] = {"version": version, "import": "ok"}
        except Exception as error:  # noqa: BLE001 - any import failure is reported, not raised
            packages[dist] = {"version": version, "import": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    env["packages"] = packages
    return env


# --------------------------------------------------------------------------- #
# summaries of the raw files
# --------------------------------------------------------------------------- #


def _sig(value):
    return None if value is None else float(f"{value:.4g}")


def summarize_suite(suite: str, data: dict) -> list[dict]:
    """The numbers the goals and the table need, from one suite's pytest-benchmark JSON."""
    rows = []
    if suite == "linear_logprobs":
        cases = _load("_bench_linear_logprobs", BENCH / "test_bench_linear_logprobs.py").cases(data)
        for (head, n, kind, mode), row in sorted(cases.items()):
            info = next(iter(row.values()))[1]
            rows.append({"head": head, "N": n, "H": info["H"], "V": info["V"], "inputs": kind, "mode": mode,
                         "input_stats": info.get("input_stats"),
                         "ms": {impl: _sig(ms) for impl, (ms, _) in row.items()},
                         "peak_extra_MiB": {impl: extra.get("peak_extra_MiB") for impl, (_, extra) in row.items()},
                         "tiles_kept": {impl: extra["tiles_kept"] for impl, (_, extra) in row.items()
                                        if extra.get("tiles_kept") is not None}})
        return rows
    for bench in data.get("benchmarks", []):
        info, stats = bench.get("extra_info", {}), bench.get("stats") or {}
        ms = _sig(stats.get("median", 0) * 1e3) if stats else None
        name = bench.get("param") or bench.get("name")
        if suite == "jbond_loss" and "speedup_vs_reference" in info:  # the triton case times the others too
            rows.append({"B": info["batch"], "T": info["length"],
                         "us": {k[:-3]: v for k, v in info.items() if k.endswith("_us")},
                         **{k: v for k, v in info.items() if k.startswith("speedup_vs_")}})
        elif suite == "ema" and "ratio_vs_copy" in info:
            rows.append({"preset": info["preset"], "params": info["params"],
                         "GB/s": {k[:-5]: v for k, v in info.items() if k.endswith("_GB/s")},
                         "ratio_vs_copy": info["ratio_vs_copy"], "ratio_vs_foreach_lerp": info["ratio_vs_foreach_lerp"]})
        elif suite == "jbond_linear" and "impl" in info:
            rows.append({"B": info["B"], "T": info["T"], "mode": info["mode"], "impl": info["impl"], "ms": ms,
                         "peak_extra_MiB": info.get("peak_extra_MiB")})
        elif suite in ("jbond_loss", "ema") and ms is not None:
            rows.append({"case": name, "ms": ms})
    return rows


# --------------------------------------------------------------------------- #
# goals
# --------------------------------------------------------------------------- #

# The shapes each goal is judged at; a shape that was not measured is a skipped row that says why.
GOAL_SHAPES = {"linear_logprobs": [(head, n) for head in ("gemma-2b", "gemma-7b", "llama3-8b") for n in (4096, 16384)],
               "jbond_loss": [(512, 4096)], "ema": ["gemma-2b", "gemma-7b"]}


def _row(goal: str, measured, target: str, ok: bool | None, reason: str = "") -> dict:
    verdict = "skipped" if ok is None else "PASS" if ok else "FAIL"
    return {"goal": goal, "measured": measured, "target": target, "verdict": verdict, "reason": reason}


def _why_missing(result: dict, suite: str, what: str) -> str:
    """Why a goal's numbers are absent: no CUDA, the part's fate, or the case itself."""
    if not result["env"].get("cuda_available"):
        return "no CUDA"
    part = result["parts"].get(f"bench:{suite}", {})
    status = part.get("status", "not run")
    if status.startswith("skipped: "):
        return status.removeprefix("skipped: ")
    if status != "ok" and not result["benchmarks"].get(suite, {}).get("results"):
        return f"benchmark {status}"
    return f"{what} not measured (skipped or out of memory: see {part.get('log', 'the log')})"


def _linear_logprobs_goals(result: dict) -> list[dict]:
    """linear_logprobs against Liger / CCE and the bare GEMMs: on trained-statistics inputs for every head, and
    within GOAL_RANDOM_OVER_CCE of CCE on random inputs (its filter's best case)."""
    rows = []
    measured = {(r["head"], r["N"], r.get("inputs", "random"), r["mode"]): r
                for r in result["benchmarks"].get("linear_logprobs", {}).get("results", [])}
    packages = result["env"].get("packages", {})
    absent = [d for d in ("liger-kernel", "cut-cross-entropy") if packages.get(d, {}).get("import") != "ok"]
    no_rivals = f"{' and '.join(absent)} not installed" if absent else "Liger and CCE cases not measured"
    for head, n in GOAL_SHAPES["linear_logprobs"]:
        where = f"[{head} N={n}, trained inputs]"
        row = measured.get((head, n, "trained", "fwdbwd"), {})
        ms = row.get("ms", {})
        tri = ms.get("triton")
        missing = None if tri else _why_missing(result, "linear_logprobs", "the triton fwd+bwd case")
        rivals = {k: ms[k] for k in ("liger", "cce") if ms.get(k)}
        goal = f"linear_logprobs fwd+bwd ≤ min(Liger, CCE) {where}"
        if missing or not rivals:
            rows.append(_row(goal, None, "≤ 1.00×", None, missing or no_rivals))
        else:
            best = min(rivals, key=rivals.get)
            ratio = tri / rivals[best]
            rows.append(_row(goal, f"{ratio:.2f}× {best} ({tri:.2f} vs {rivals[best]:.2f} ms)", "≤ 1.00×",
                             ratio <= 1.0))
        goal = f"linear_logprobs fwd+bwd ≤ {GOAL_OVER_FLOOR}× its 4-GEMM floor {where}"
        target = f"≤ {GOAL_OVER_FLOOR * FLOOR_OVER_GEMMS:.2f}× the 3 bare GEMMs"
        if missing or not ms.get("cublas"):
            rows.append(_row(goal, None, target, None, missing or "the bare-GEMM case not measured"))
        else:
            ratio = tri / ms["cublas"]
            rows.append(_row(goal, f"{ratio:.2f}× the 3 GEMMs ({ratio / FLOOR_OVER_GEMMS:.2f}× floor)", target,
                             ratio <= GOAL_OVER_FLOOR * FLOOR_OVER_GEMMS))
        forward = measured.get((head, n, "trained", "fwd"), {}).get("ms", {})
        goal = f"linear_logprobs forward ≤ {GOAL_FORWARD_OVER_GEMM}× one bare GEMM {where}"
        if not (forward.get("triton") and forward.get("cublas")):
            rows.append(_row(goal, None, f"≤ {GOAL_FORWARD_OVER_GEMM:.2f}×", None,
                             missing or "the forward cases not measured"))
        else:
            ratio = forward["triton"] / forward["cublas"]
            rows.append(_row(goal, f"{ratio:.2f}× ({forward['triton']:.2f} vs {forward['cublas']:.2f} ms)",
                             f"≤ {GOAL_FORWARD_OVER_GEMM:.2f}×", ratio <= GOAL_FORWARD_OVER_GEMM))
        goal = f"linear_logprobs peak extra memory ≤ CCE's + 10%, and no [N×V] buffer {where}"
        peaks = row.get("peak_extra_MiB", {})
        peak, cce_peak = peaks.get("triton"), peaks.get("cce")
        if missing or peak is None:
            rows.append(_row(goal, None, "≤ 1.10× CCE's", None, missing or "no peak memory recorded"))
        else:
            limit = n * row["V"] * 2 / 2**20
            if cce_peak:
                rows.append(_row(goal, f"{peak:,.0f} MiB (CCE {cce_peak:,.0f})", f"≤ {1.1 * cce_peak:,.0f} MiB",
                                 peak <= 1.1 * cce_peak and peak < limit))
            else:
                rows.append(_row(goal, f"{peak:,.0f} MiB", f"< {limit:,.0f} MiB (bf16 [N×V]); CCE not measured",
                                 peak < limit))
        random_ms = measured.get((head, n, "random", "fwdbwd"), {}).get("ms", {})
        for impl, how in (("triton", ""), ("triton_filter", " with the gradient filter")):
            goal = f"linear_logprobs fwd+bwd{how} ≤ {GOAL_RANDOM_OVER_CCE}× CCE [{head} N={n}, random inputs]"
            if not (random_ms.get(impl) and random_ms.get("cce")):
                rows.append(_row(goal, None, f"≤ {GOAL_RANDOM_OVER_CCE:.2f}×", None,
                                 missing or ("the random-input cases not measured" if random_ms else no_rivals)))
            else:
                ratio = random_ms[impl] / random_ms["cce"]
                rows.append(_row(goal, f"{ratio:.2f}× ({random_ms[impl]:.2f} vs {random_ms['cce']:.2f} ms)",
                                 f"≤ {GOAL_RANDOM_OVER_CCE:.2f}×", ratio <= GOAL_RANDOM_OVER_CCE))
    return rows


def evaluate_goals(result: dict) -> list[dict]:
    """The goal rows of benchmarks/README.md from a result's summaries: PASS, FAIL or skipped with a reason."""
    rows = []
    tests = result.get("tests")
    if not result["env"].get("cuda_available"):
        rows.append(_row("CUDA tests (-m cuda) all pass", None, "0 failed", None, "no CUDA"))
    elif not tests or tests["passed"] + tests["failed"] + tests["errors"] == 0:
        rows.append(_row("CUDA tests (-m cuda) all pass", None, "0 failed", None,
                         f"tests {result['parts'].get('tests', {}).get('status', 'not run')}, nothing ran"))
    else:
        bad = tests["failed"] + tests["errors"]
        rows.append(_row("CUDA tests (-m cuda) all pass", f"{tests['passed']} passed, {bad} failed",
                         "0 failed", bad == 0 and result["parts"]["tests"]["status"] != "timed out",
                         "timed out" if result["parts"]["tests"]["status"] == "timed out" else ""))

    rows += _linear_logprobs_goals(result)
    measured = {(r["B"], r["T"]): r for r in result["benchmarks"].get("jbond_loss", {}).get("results", [])
                if "speedup_vs_reference" in r}
    for b, t in GOAL_SHAPES["jbond_loss"]:
        goal = f"J-BOND head fwd+bwd ≥ torch.compile of its reference [B={b} T={t}]"
        speedup = measured.get((b, t), {}).get("speedup_vs_compiled")
        if speedup is None:
            rows.append(_row(goal, None, "≥ 1.00×", None, _why_missing(result, "jbond_loss", "the compiled case")))
        else:
            rows.append(_row(goal, f"{speedup:.2f}× faster", "≥ 1.00×", speedup >= 1.0))

    measured = {r["preset"]: r for r in result["benchmarks"].get("ema", {}).get("results", []) if "preset" in r}
    for preset in GOAL_SHAPES["ema"]:
        row = measured.get(preset)
        why = None if row else _why_missing(result, "ema", "the triton case")
        goal = f"EMA ≥ {GOAL_EMA_OVER_COPY:.0%} of copy bandwidth [{preset}]"
        rows.append(_row(goal, None, f"≥ {GOAL_EMA_OVER_COPY:.2f}", None, why) if why else
                    _row(goal, f"{row['ratio_vs_copy']:.2f} of copy", f"≥ {GOAL_EMA_OVER_COPY:.2f}",
                         row["ratio_vs_copy"] >= GOAL_EMA_OVER_COPY))
        goal = f"EMA no slower than torch._foreach_lerp_ [{preset}]"
        rows.append(_row(goal, None, "≥ 1.00×", None, why) if why else
                    _row(goal, f"{row['ratio_vs_foreach_lerp']:.2f}× its GB/s", "≥ 1.00×",
                         row["ratio_vs_foreach_lerp"] >= 1.0))
    rows.extend(_sampling_rows(result))
    rows.append(_rollout_row(result))
    return rows


def _sampling_rows(result: dict) -> list[dict]:
    """The static sampler's goals: decode steps against the weight-read floor, and the J-BOND step."""
    rows = []
    cuda = result["env"].get("cuda_available")
    decode = result.get("decode") or {}
    batches = {entry["batch"]: entry for entry in decode.get("batches", [])}
    for batch in GOAL_DECODE_BATCHES:
        goal = f"static decode step ≤ {GOAL_DECODE_OVER_FLOOR:g}× the weight-read floor [gemma-2b B={batch}]"
        target = f"≤ {GOAL_DECODE_OVER_FLOOR:.2f}×"
        entry = batches.get(batch)
        if not cuda:
            rows.append(_row(goal, None, target, None, "no CUDA"))
        elif entry is None:
            rows.append(_row(goal, None, target, None, f"decode {decode.get('status', 'not run')}"))
        else:
            ratio = entry["static_over_floor"]
            how = "captured" if entry.get("static_captured") else "eager"
            rows.append(_row(goal, f"{ratio:.2f}× ({entry['static_ms']:.2f} ms, {how}; generate "
                                   f"{entry['generate_over_floor']:.1f}×)", target, ratio <= GOAL_DECODE_OVER_FLOOR))
    timed = ((result.get("step") or {}).get("by_sampler") or {}).get("static", {}).get("steps") or []
    goals = ((f"J-BOND step with the static sampler ≤ {GOAL_STEP_S} s [gemma-2b]", f"≤ {GOAL_STEP_S} s"),
             (f"sampling ≤ {GOAL_SAMPLING_SHARE:.0%} of that step", f"≤ {GOAL_SAMPLING_SHARE:.2f}"))
    for goal, target in goals:
        if not cuda:
            rows.append(_row(goal, None, target, None, "no CUDA"))
        elif not timed:
            rows.append(_row(goal, None, target, None, f"step {result.get('step', {}).get('status', 'not run')}"))
        elif goal.startswith("J-BOND"):
            rows.append(_row(goal, f"{timed[-1]['wall_s']:.3f} s", target, timed[-1]["wall_s"] <= GOAL_STEP_S))
        else:
            share = timed[-1]["phases_s"]["generate"] / timed[-1]["wall_s"]
            rows.append(_row(goal, f"{share:.2f}", target, share <= GOAL_SAMPLING_SHARE))
    return rows


def _rollout_row(result: dict) -> dict:
    """vLLM against generate on the largest model rollout_speed.py ran; owed where vLLM is not installed."""
    goal = "vLLM rollouts ≥ generate's samples/s [largest model of rollout_speed.py]"
    rollout = result.get("rollout") or {}
    models = rollout.get("models") or []
    if not result["env"].get("cuda_available"):
        return _row(goal, None, "≥ 1.00×", None, "no CUDA")
    if not models:
        return _row(goal, None, "≥ 1.00×", None, f"rollout {rollout.get('status', 'not run')}")
    if "vllm" not in models[-1]:
        return _row(goal, None, "≥ 1.00×", None, "owed: vLLM is not installed on this machine")
    ratio = models[-1]["vllm_over_generate"]
    return _row(goal, f"{ratio:.2f}× ({models[-1]['model']})", "≥ 1.00×", ratio >= 1.0)


def goal_table(rows: list[dict]) -> str:
    lines = ["| goal | measured | target | verdict |", "|---|---|---|---|"]
    for r in rows:
        verdict = f"skipped ({r['reason']})" if r["verdict"] == "skipped" else f"**{r['verdict']}**"
        lines.append(f"| {r['goal']} | {r['measured'] or '—'} | {r['target']} | {verdict} |")
    return "\n".join(lines)


def step_table(step: dict) -> str:
    if not step.get("steps"):
        return f"J-BOND step: {step.get('status', 'not run')}"
    runs = step.get("by_sampler") or {"generate": step}
    model = step["model"]
    timed = {name: run["steps"][-1] for name, run in runs.items() if run.get("steps")}
    first = next(iter(timed.values()))
    title = (f"J-BOND step of a {model['parameters'] / 1e6:,.1f}M-parameter {model['architecture']} "
             f"({step['prompts']} prompts × 3 samples, {step['new_tokens']} new tokens, {step['device']}), "
             f"step {first['step']} of {len(step['steps'])}, seconds by rollout.backend:")
    lines = [title, "", "| phase | " + " | ".join(timed) + " |", "|---|" + "---|" * len(timed)]
    for phase in first["phases_s"]:
        values = [t["phases_s"].get(phase) for t in timed.values()]
        if any(v is not None for v in values):
            lines.append(f"| {phase} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in values) + " |")
    lines.append("| **whole step** | " + " | ".join(f"{t['wall_s']:.3f}" for t in timed.values()) + " |")
    peaks = [t["peak_memory_GiB"] for t in timed.values()]
    lines.append("| peak GPU memory | " + " | ".join(f"{p} GiB" if p is not None else "skipped (no CUDA)"
                                                    for p in peaks) + " |")
    return "\n".join(lines)


def decode_table(decode: dict) -> str:
    if not decode.get("batches"):
        return f"decode: {decode.get('status', 'not run')}"
    lines = [f"Decode steps ({decode['dtype']}, {decode['prompt_tokens']}-token prompts, {decode['device']}): "
             f"weight-read floor {decode['floor_ms']:.3f} ms ({decode['weight_bytes'] / 1e9:.2f} GB at "
             f"{decode['copy_bandwidth_Bps'] / 1e12:.2f} TB/s copied)", "",
             "| batch | generate ms | static ms | generate / floor | static / floor | static first draw s |",
             "|---|---|---|---|---|---|"]
    for e in decode["batches"]:
        lines.append(f"| {e['batch']} | {e['generate_ms']:.2f} | {e['static_ms']:.2f} | "
                     f"{e['generate_over_floor']:.1f}× | {e['static_over_floor']:.1f}× | "
                     f"{e['static_warmup_s']:.1f} |")
    return "\n".join(lines)


def package_table(packages: dict) -> str:
    lines = ["| package | version | import |", "|---|---|---|"]
    for dist, info in packages.items():
        state = "skipped: not installed" if info["version"] is None else info["import"]
        lines.append(f"| {dist} | {info['version'] or '—'} | {state} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# the command
# --------------------------------------------------------------------------- #


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CUDA tests, benchmarks and one J-BOND step on one GPU")
    parser.add_argument("--dry-run", action="store_true", help="rehearse on CPU at tiny shapes")
    parser.add_argument("--out", help="the result JSON (default: benchmarks/results/<gpu>-<date>.json; "
                                      "a temporary path for --dry-run)")
    parser.add_argument("--parts", help="a comma-separated subset of the parts (tests, decode, step, rollout, "
                                        "bench:<suite>), to split the GPU day over calls; default: all")
    parser.add_argument("--env", action="store_true", help=argparse.SUPPRESS)  # the probe's own subprocess
    args = parser.parse_args(argv)
    if args.env:
        print(json.dumps(probe_environment()))
        return 0

    clock = Clock(float(os.environ.get("GPU_CHECK_T0") or time.time()))
    deadline = BUDGET_S - REPORT_S
    # `python benchmarks/x.py` puts benchmarks/ first on sys.path, not the repository: an uninstalled fastbond,
    # importable from the root (which is all gpu_check.sh's check sees), would be missing in the scripts.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=path)
    env.pop("TRITON_INTERPRET", None)  # the benchmarks time compiled kernels, never the interpreter
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU rehearsal even on a GPU machine

    clock.say("probing the environment")
    probe = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--env"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    if probe.returncode != 0:
        print(probe.stdout + probe.stderr, file=sys.stderr)
        clock.say("the environment probe failed: is fastbond installed (pip install -e .)?")
        return 1
    envinfo = json.loads(probe.stdout.strip().splitlines()[-1])
    cuda = envinfo["device"] != "cpu"
    envinfo["cuda_available"] = cuda
    if not cuda and not args.dry_run:
        clock.say("no CUDA GPU is visible: run with --dry-run for the CPU rehearsal")
        return 2
    clock.say(f"device {envinfo['device']}, torch {envinfo['torch']}, triton {envinfo['triton']}, "
              f"transformers {envinfo['transformers']}, CUDA {envinfo['cuda']}, commit {str(envinfo['commit'])[:10]}")

    today = datetime.date.today().isoformat()
    if args.out:  # relative to where gpu_check.sh was called from
        out = (Path(os.environ.get("GPU_CHECK_CWD", ".")) / args.out).resolve()
    elif args.dry_run:
        out = Path(tempfile.mkdtemp(prefix="gpu-check-")) / f"dry-run-{today}.json"
    else:
        out = BENCH / "results" / f"{slug(envinfo['device'])}-{today}.json"
    raw = out.with_suffix("")
    raw.mkdir(parents=True, exist_ok=True)
    clock.say(f"result: {out}; logs and raw files: {raw}/")

    result = {"schema": SCHEMA, "dry_run": args.dry_run, "date": today, "budget_s": BUDGET_S, "env": envinfo,
              "parts": {}, "tests": None, "benchmarks": {}, "decode": {}, "step": {}, "rollout": {}, "goals": []}
    plan = parts(raw, cuda)
    if args.parts:
        wanted = [name.strip() for name in args.parts.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {p.name for p in plan})
        if unknown:
            clock.say(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(p.name for p in plan)}")
            return 2
        plan = [p for p in plan if p.name in wanted]
    clock.say("plan on one H100/H200: " + ", ".join(f"{p.name} ~{p.estimate_s} s" for p in plan)
              + f"; {sum(p.estimate_s for p in plan)} s of the {BUDGET_S} s budget")
    for index, part in enumerate(plan):
        counts = None
        reserve = sum(p.floor_s for p in plan[index + 1:])
        timeout = min(part.cap_s, deadline - clock.elapsed() - reserve)
        if timeout < part.floor_s:
            record = {"status": "skipped: out of time", "seconds": 0, "timeout_s": 0, "command": part.command}
            clock.say(f"{part.name}: skipped, {deadline - clock.elapsed():.0f} s left of the budget")
        else:
            for stale in part.files.values():  # a rerun must not report an earlier run's numbers
                stale.unlink(missing_ok=True)
            log = raw / f"{part.name.replace(':', '-')}.log"
            clock.say(f"{part.name}: started (timeout {timeout:.0f} s, log {log.name})")
            record = run_part(part, timeout, log, env)
            counts = junit_counts(part.files["junit"]) if "junit" in part.files else None
            if counts is not None:
                record["counts"] = {k: v for k, v in counts.items() if k != "failed_ids"}
            said = ", ".join(f"{v} {k}" for k, v in (record.get("counts") or {}).items() if v)
            clock.say(f"{part.name}: {record['status']} in {record['seconds']:.0f} s" + (f" ({said})" if said else ""))
            if record["status"] != "ok":
                print(tail(log), flush=True)
        result["parts"][part.name] = record
        status = record["status"]
        if part.name == "tests":
            result["tests"] = counts
        elif part.name.startswith("bench:"):
            suite = part.name.split(":", 1)[1]
            entry = {"status": status, "json": shown(part.files["json"]), "results": []}
            if part.files["json"].is_file():
                entry["results"] = summarize_suite(suite, json.loads(part.files["json"].read_text()))
            result["benchmarks"][suite] = entry
        elif part.name == "decode":
            decode = {"status": status}
            if part.files["json"].is_file():
                decode.update(json.loads(part.files["json"].read_text()))
            result["decode"] = decode
        elif part.name == "rollout":
            rollout = {"status": status}
            if part.files["json"].is_file():
                rollout.update(json.loads(part.files["json"].read_text()))
            result["rollout"] = rollout
        elif part.name == "step":
            step = {"status": status}
            if part.files["json"].is_file():
                step.update(json.loads(part.files["json"].read_text()))
            result["step"] = step

    result["goals"] = evaluate_goals(result)
    result["wall_s"] = round(clock.elapsed(), 1)
    out.write_text(json.dumps(result, indent=2, default=str))

    print()
    print(f"## GPU check: {envinfo['device']}, {today}" + (" (dry run: CPU, tiny shapes)" if args.dry_run else ""))
    print()
    print("| part | status | seconds |\n|---|---|---|")
    for name, record in result["parts"].items():
        print(f"| {name} | {record['status']} | {record['seconds']:.0f} |")
    print()
    print(package_table(envinfo["packages"]))
    print()
    print(goal_table(result["goals"]))
    print()
    print(decode_table(result["decode"]))
    print()
    print(step_table(result["step"]))
    for suite in ("linear_logprobs", "jbond_linear"):
        path = raw / f"bench-{suite}.json"
        if path.is_file() and result["benchmarks"][suite]["results"]:
            print(f"\n{suite} (python benchmarks/test_bench_{suite}.py {shown(path)}):")
            print(_load(f"_bench_{suite}", BENCH / f"test_bench_{suite}.py").summarize(str(path)))
    print()
    clock.say(f"wrote {out} ({result['wall_s']:.0f} s of the {BUDGET_S} s budget)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
