"""The grid of a frontier: one config, runs that differ only by the overrides `frontier.runs` names.

Every run trains the same `steps` in the same world (model, reward, prompts), so the keys that
would change either are refused in a run's overrides. A run checkpoints at each point the
frontier judges, and keeps them all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fastbond.config import FrontierConfig, TrainConfig, load_config
from fastbond.errors import FastbondError

# Keys a run may not override, and why.
FIXED = {
    "steps": "every run trains the same number of steps (set steps for the whole frontier)",
    "run_dir": "each run's directory is OUT/<run name>",
    "checkpoint": "the frontier sets the checkpoints it judges",
    "evaluation": "every run is judged the same way",
    "frontier": "a run is one run, not a frontier",
    "model": "every run starts from the same policy and π_ref",
    "reward": "every run is judged by the same reward",
    "data": "every run sees the same prompts",
}


@dataclass
class GridRun:
    name: str
    overrides: list[str]
    config: TrainConfig  # the run's full config, its run_dir and checkpoints set by the frontier

    @property
    def algorithm(self) -> str:
        return self.config.algorithm.name

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


def point_steps(steps: int, points: int) -> list[int]:
    """The steps judged after step 0: every steps // points steps, and the last step."""
    every = max(1, steps // points)
    marks = list(range(every, steps + 1, every))
    return marks if marks[-1] == steps else marks + [steps]


def _check_overrides(name: str, overrides: list[str]) -> None:
    for item in overrides:
        key = item.partition("=")[0].strip()
        section = key.split(".")[0]
        if section in FIXED:
            raise FastbondError(f"config key 'frontier.runs.{name}': '{key}' cannot be set for one run: "
                                f"{FIXED[section]}")


def load_grid(path, overrides: list[str], out: Path) -> tuple[TrainConfig, list[GridRun]]:
    """The frontier's config (file + command-line overrides) and its runs, each checked as a config."""
    base = load_config(path, overrides)
    if base.reward.kind == "pairwise":
        raise FastbondError("config key 'reward.kind': fastbond frontier draws each run's reward against KL beside "
                            "Best-of-N's, and a pairwise judge gives no reward; train J-BOND with it and read "
                            "eval.json's win rates against Best-of-N instead")
    if not base.frontier.runs:
        raise FastbondError("config key 'frontier.runs' is empty: name the runs to compare, each with its "
                            "overrides (fastbond/configs/embedded.yaml holds an example)")
    marks = point_steps(base.steps, base.frontier.points)
    runs = []
    for name, own in base.frontier.runs.items():
        _check_overrides(name, own)
        settings = [f"run_dir={out / name}", f"checkpoint.every={marks[0]}", f"checkpoint.keep={len(marks)}",
                    "evaluation.at_end=false"]
        try:
            # notes=[]: a run naming another algorithm than the file's drops the file's algorithm keys, as meant
            config = load_config(path, list(overrides) + list(own) + settings, notes=[])
        except FastbondError as error:
            raise FastbondError(f"frontier run '{name}': {error}") from None
        # The run's own config.yaml holds the run, not the grid it belongs to.
        runs.append(GridRun(name, list(own), dataclasses.replace(config, frontier=FrontierConfig())))
    return base, runs
