"""Measures every number the README shows and writes them in: nothing in the README is typed by hand.

    python tools/readme_results.py                   # about 8 minutes on 2 CPU cores; run it on an idle machine
    python tools/readme_results.py --no-lab --no-frontier   # the embedded default only
    python tools/readme_results.py --frontier-only   # the frontier only

What it does:
  1. `fastbond train` (the embedded default) with an empty model cache: the wall time of the
     whole command, π_ref's build included, and its evaluation;
  2. the same command again with the cache warm: the wall time, and whether the evaluation is
     the same to the last digit (the run is deterministic);
  3. `fastbond lab`, which rewrites docs/lab/ (figures, results.md);
  4. copies the first run's eval.json and report.png to docs/embedded/, writes
     docs/embedded/measured.json (numbers, wall times, library versions, machine, commit) and
     rewrites the README between the markers below;
  5. `fastbond frontier` (the embedded grid), timed: copies frontier.png, results.md and
     results.json to docs/frontier/ and rewrites the README between the frontier markers.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EMBEDDED_DOCS = ROOT / "docs" / "embedded"
BEGIN = "<!-- BEGIN measured by tools/readme_results.py: do not edit by hand -->"
END = "<!-- END measured -->"
FRONTIER_DOCS = ROOT / "docs" / "frontier"
FRONTIER_BEGIN = "<!-- BEGIN frontier by tools/readme_results.py: do not edit by hand -->"
FRONTIER_END = "<!-- END frontier -->"


def versions() -> dict:
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "triton": triton_version,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU" if not torch.cuda.is_available()
        else f"{platform.machine()}, {torch.cuda.get_device_name()}",
        "commit": commit, "date": datetime.date.today().isoformat(),
    }


def timed_train(run_dir: Path, cache: Path) -> tuple[float, dict]:
    env = dict(os.environ, FASTBOND_CACHE=str(cache))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastbond", "train", f"run_dir={run_dir}", "logging.progress=false"],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, json.loads((run_dir / "eval.json").read_text())


def verdict(evaluation: dict) -> str:
    """What the numbers say, in words: the largest Best-of-N the single sample beats, and its KL."""
    reward, kl = evaluation["policy_reward"], evaluation["kl_policy_ref"]
    beaten = [int(n) for n, row in evaluation["bon"].items() if row["reward"] < reward]
    if not beaten:
        return f"The policy's single sample does not beat Best-of-1 of π_ref ({reward:.3f})."
    n = max(beaten)
    bound = evaluation["bon"][str(n)]["kl_bound"]
    where = "below" if kl <= bound else "above"
    text = (f"The policy's single sample beats Best-of-{n} sampling from π_ref ({reward:.3f} against "
            f"{evaluation['bon'][str(n)]['reward']:.3f}) at a measured KL from π_ref of {kl:.2f} nats, "
            f"{where} Best-of-{n}'s bound of {bound:.2f}")
    larger = [int(m) for m in evaluation["bon"] if int(m) > n]
    if larger:
        m = min(larger)
        text += f"; Best-of-{m} ({evaluation['bon'][str(m)]['reward']:.3f}) stays ahead"
    return text + "."


def render(evaluation: dict, fresh_s: float, warm_s: float, same: bool, meta: dict) -> str:
    rows = ["| | mean reward | KL from π_ref (nats) |", "|---|---|---|",
            f"| **J-BOND policy, 1 sample** | **{evaluation['policy_reward']:.3f} ± "
            f"{evaluation['policy_reward_stderr']:.3f}** | **{evaluation['kl_policy_ref']:.2f}** (measured) |"]
    for n, row in evaluation["bon"].items():
        rows.append(f"| Best-of-{n} of π_ref | {row['reward']:.3f} | ≤ {row['kl_bound']:.2f} "
                    "(bound log N − (N−1)/N) |")
    versions_line = (f"Measured on {meta['date']} at commit {meta['commit']} ({meta['machine']}; Python "
                     f"{meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}).")
    return "\n".join([
        BEGIN,
        *rows,
        "",
        f"{verdict(evaluation)} Win rate of the policy's sample over a π_ref sample: "
        f"{evaluation['win_rate_vs_ref']:.3f}, on {evaluation['prompts']} held-out prompts.",
        "",
        f"Wall time of the whole command: {fresh_s:.0f} s building π_ref first, {warm_s:.0f} s with it "
        f"cached. {'A second run gave the same evaluation to the last digit.' if same else 'A second run gave a DIFFERENT evaluation: the run is not deterministic here.'}",
        versions_line,
        END,
    ])


def replace_block(begin: str, end: str, block: str) -> None:
    """The README with the text between `begin` and `end` (markers included) replaced by `block`."""
    text = README.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"README.md lacks the markers {begin} … {end}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    README.write_text(head + block + tail)


def render_frontier(results: dict, wall_s: float, meta: dict) -> str:
    sys.path.insert(0, str(ROOT))
    from fastbond.frontier.table import final_table

    world = results["world"]
    return "\n".join([
        FRONTIER_BEGIN,
        "![reward against KL for every run of the frontier](docs/frontier/frontier.png)",
        "",
        *final_table(results),
        "",
        results["verdict_text"],
        "",
        f"{len(results['runs'])} runs of {world['steps']} steps, judged at steps 0, "
        f"{', '.join(map(str, world['point_steps']))} on {world['prompts']} held-out prompts "
        f"({world['policy_samples']} samples each; Best-of-N from {world['reference_samples']} π_ref samples a "
        "prompt); ± are 95% intervals over prompts. Every point: "
        "[docs/frontier/results.md](docs/frontier/results.md).",
        f"Wall time of `fastbond frontier`: {wall_s / 60:.1f} minutes on {meta['machine']} (Python "
        f"{meta['python']}, torch {meta['torch']}), measured on {meta['date']} at commit {meta['commit']}.",
        FRONTIER_END,
    ])


def measure_frontier(meta: dict) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "frontier"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fastbond", "frontier", "--out", str(out), "logging.progress=false"],
                       cwd=ROOT, check=True)
        wall_s = time.perf_counter() - started
        FRONTIER_DOCS.mkdir(parents=True, exist_ok=True)
        for name in ("frontier.png", "results.md", "results.json"):
            shutil.copy(out / name, FRONTIER_DOCS / name)
    results = json.loads((FRONTIER_DOCS / "results.json").read_text())
    if results["runs_reused"]:
        raise SystemExit("the frontier reused earlier runs: its wall time would not be the whole command's")
    (FRONTIER_DOCS / "measured.json").write_text(json.dumps({"wall_s": wall_s, **meta}, indent=2) + "\n")
    replace_block(FRONTIER_BEGIN, FRONTIER_END, render_frontier(results, wall_s, meta))


def main(argv: list[str]) -> int:
    meta = versions()
    if "--frontier-only" in argv:
        measure_frontier(meta)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        fresh_s, evaluation = timed_train(scratch / "fresh", scratch / "cache")
        warm_s, again = timed_train(scratch / "warm", scratch / "cache")
        EMBEDDED_DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copy(scratch / "fresh" / "eval.json", EMBEDDED_DOCS / "eval.json")
        shutil.copy(scratch / "fresh" / "report.png", EMBEDDED_DOCS / "report.png")
    same = evaluation == again
    measured = {"evaluation": evaluation, "wall_s": {"building_reference": fresh_s, "reference_cached": warm_s},
                "deterministic": same, **meta}
    (EMBEDDED_DOCS / "measured.json").write_text(json.dumps(measured, indent=2) + "\n")
    replace_block(BEGIN, END, render(evaluation, fresh_s, warm_s, same, meta))
    print(render(evaluation, fresh_s, warm_s, same, meta))
    if "--no-lab" not in argv:
        subprocess.run([sys.executable, "-m", "fastbond", "lab", "--out", str(ROOT / "docs" / "lab")], cwd=ROOT,
                       check=True)
    if "--no-frontier" not in argv:
        measure_frontier(meta)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
