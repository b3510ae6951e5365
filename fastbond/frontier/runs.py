"""One run of the grid: trained, resumed or skipped, then judged at its checkpoints.

A run whose points are saved (RUN_DIR/frontier_points.json, written last and atomically) for
the same config and the same judging is skipped. Otherwise a run directory whose config.yaml
is this run's is resumed from its latest checkpoint (`checkpoint.resume=true`: a finished run
trains no more steps); one holding anything else (another config, no checkpoint yet) starts
over (`checkpoint.overwrite=true`). The points are judged after training, from the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import time

import yaml

from fastbond.checkpoint import list_checkpoints
from fastbond.config import to_dict
from fastbond.run_dir import LOCK

from .grid import GridRun
from .points import Judge, checkpoint_policies, load_policy_at
from .table import write_json

POINTS_FILE = "frontier_points.json"


def _job(run: GridRun) -> dict:
    """The run's config as train writes it to config.yaml, less what is not part of the job: how
    it starts, and where (a frontier's directory may be moved)."""
    tree = to_dict(run.config)
    tree["checkpoint"].update(resume=False, overwrite=False)
    tree.pop("run_dir")
    return tree


def saved_points(run: GridRun, judge: Judge) -> list[dict] | None:
    path = run.run_dir / POINTS_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("config") != _job(run) or saved.get("judge") != judge.settings:
        return None
    return saved["points"]


def how_to_start(run: GridRun) -> str:
    """fresh, resume or overwrite: how `train` is to treat the run directory."""
    run_dir = run.run_dir
    if not run_dir.is_dir() or not any(p.name != LOCK for p in run_dir.iterdir()):
        return "fresh"
    config_file = run_dir / "config.yaml"
    saved = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    same = isinstance(saved, dict) and {k: v for k, v in saved.items() if k != "run_dir"} == _job(run)
    return "resume" if same and list_checkpoints(run_dir / "checkpoints") else "overwrite"


def train_run(run: GridRun, say=print) -> str:
    """Train (or resume) the run; returns how it started."""
    from fastbond.train import train

    start = how_to_start(run)
    checkpoint = dataclasses.replace(run.config.checkpoint, resume=start == "resume", overwrite=start == "overwrite")
    if start != "fresh":
        say(f"  {run.name}: {'resuming from its latest checkpoint' if start == 'resume' else 'starting over'}"
            f" in {run.run_dir}")
    train(dataclasses.replace(run.config, checkpoint=checkpoint))
    return start


def judge_run(run: GridRun, judge: Judge, start_point: dict, say=print, clock=time.perf_counter) -> list[dict]:
    """Step 0 (the initial policy, shared by every run) and each checkpoint's policy, judged;
    saved as the run's points."""
    points = [start_point]
    began = clock()
    for step, policy_dir in checkpoint_policies(run.run_dir):
        point = judge.point(load_policy_at(judge, policy_dir), step)
        say(f"  {run.name} step {step:>5}: reward {point['reward']:.3f} ± {point['reward_ci']:.3f}   "
            f"KL {point['kl']:.3f} ± {point['kl_ci']:.3f} nats   ({clock() - began:.0f} s)")
        points.append(point)
    write_json(run.run_dir / POINTS_FILE, {"config": _job(run), "judge": judge.settings, "points": points})
    return points
