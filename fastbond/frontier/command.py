"""`fastbond frontier [CONFIG] [key=value …] [--out DIR]`: train the grid, judge it, draw it.

OUT holds one run directory per grid run, reference.json (the Best-of-N curve and the initial
policy's point), and the results:
frontier.png, results.json, results.md. Run it again after an interruption and it continues:
runs whose points are saved are skipped, a run cut short resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EPILOG = """\
examples:
  fastbond frontier                                   # the embedded world's grid (embedded.yaml's frontier section)
  fastbond frontier run.yaml --out runs/my-frontier   # your model, reward and prompts; the grid in run.yaml
  fastbond frontier steps=40 frontier.points=2        # a shorter frontier
  fastbond frontier 'frontier.runs.rloo-b1=[algorithm.name=rloo, algorithm.beta_rl=1.0]'   # one more run
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastbond frontier", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the runs of a config's frontier section (J-BOND, REINFORCE at several β_RL, BOND-N, "
        "vBoN, BoNBoN, …), judge each along its way, and draw reward against KL(π‖π_ref) beside the "
        "Best-of-N curve of π_ref; resumes where an earlier invocation stopped.")
    parser.add_argument("config", nargs="?", help="YAML config file with a frontier section (omit for the embedded "
                        "default)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, applied to every run")
    parser.add_argument("--out", default="runs/frontier", help="output directory (default: runs/frontier)")
    return parser.parse_intermixed_args(argv)


def _reference(judge, out: Path, say) -> tuple[list[dict], dict]:
    """The Best-of-N curve and the initial policy's point (step 0 of every run), computed once per
    judging settings and kept in OUT/reference.json."""
    from .bon_curve import bon_curve
    from .table import write_json

    path = out / "reference.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("judge") == judge.settings:
            return saved["bon"], saved["start"]
    began = time.perf_counter()
    rows = bon_curve(judge.reference_rewards())
    start = judge.point(judge.models.policy, 0)
    write_json(path, {"judge": judge.settings, "bon": rows, "start": start})
    say(f"Best-of-N of π_ref (N up to {rows[-1]['n']}) and the initial policy judged: "
        f"{time.perf_counter() - began:.0f} s")
    return rows, start


def run_frontier(path, overrides: list[str], out: Path, say=print) -> dict:
    """Train, judge, draw and tabulate the frontier; returns results.json's content."""
    from fastbond.config import to_dict

    from .grid import load_grid, point_steps
    from .plot import plot_frontier
    from .points import load_judge
    from .runs import judge_run, saved_points, train_run
    from .table import write_json, write_markdown
    from .verdict import verdict, verdict_text

    began = time.perf_counter()
    base, grid = load_grid(path, overrides, out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"frontier: {len(grid)} runs of {base.steps} steps into {out}")
    judge = load_judge(base)
    bon, start = _reference(judge, out, say)
    runs, reused = [], 0
    for i, run in enumerate(grid, 1):
        points = saved_points(run, judge)
        if points is not None:
            reused += 1
            say(f"[{i}/{len(grid)}] {run.name}: done earlier ({time.perf_counter() - began:.0f} s)")
        else:
            say(f"[{i}/{len(grid)}] {run.name} ({run.algorithm}): training ({time.perf_counter() - began:.0f} s)")
            judge.release()
            train_run(run, say)
            points = judge_run(run, judge, start, say)
        runs.append({"name": run.name, "algorithm": run.algorithm, "overrides": run.overrides, "points": points})

    found = verdict(runs, bon)
    text = verdict_text(found)
    title = f"reward vs KL(π‖π_ref): {base.model.policy}, {base.steps} steps a run"
    drawn = plot_frontier(runs, bon, out / "frontier.png", title)
    results = {
        "world": {"policy": base.model.policy, "reward": f"{base.reward.kind}:{base.reward.name}",
                  "steps": base.steps, "point_steps": point_steps(base.steps, base.frontier.points),
                  **judge.settings, "config": to_dict(base)},
        "runs": runs, "bon": bon, "verdict": found, "verdict_text": text,
        "plotted": {name: [list(xy) for xy in series] for name, series in drawn.items()},
        "elapsed_s": time.perf_counter() - began, "runs_reused": reused,
    }
    write_json(out / "results.json", results)
    write_markdown(out / "results.md", results, text)
    say(f"\n{text}\n\nwrote {out / 'frontier.png'}, {out / 'results.md'}, {out / 'results.json'} "
        f"({results['elapsed_s']:.0f} s)")
    return results


def main(argv: list[str]) -> int:
    from fastbond.presets import embedded_preset

    args = parse_args(argv)
    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path:  # a first positional holding '=' is an override, not a file
        path, overrides = None, [path] + overrides
    run_frontier(path or embedded_preset(), overrides, Path(args.out))
    return 0
