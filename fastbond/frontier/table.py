"""The frontier's table: results.json (everything, the plotted series included) and results.md."""

from __future__ import annotations

import json
from pathlib import Path

from fastbond import atomic


def write_json(path: Path, value) -> None:
    """Strict JSON, written atomically: an interrupted write leaves the old file or none."""
    atomic.write_text(path, json.dumps(value, indent=1, allow_nan=False) + "\n")


def _pm(value: float, ci: float, digits: int = 3) -> str:
    return f"{value:.{digits}f} ± {ci:.{digits}f}"


def final_table(results: dict) -> list[str]:
    """Each run's last point and the Best-of-N rows: the summary the README shows."""
    lines = ["| run | overrides | reward (1 sample) | KL(π‖π_ref), nats |", "|---|---|---|---|"]
    for run in results["runs"]:
        last = run["points"][-1]
        overrides = ", ".join(f"`{o}`" for o in run["overrides"]) or "(the config as it is)"
        lines.append(f"| {run['name']} | {overrides} | {_pm(last['reward'], last['reward_ci'])} | "
                     f"{_pm(last['kl'], last['kl_ci'], 2)} |")
    for row in results["bon"]:
        lines.append(f"| Best-of-{row['n']} of π_ref | | {_pm(row['reward'], row['reward_ci'])} | "
                     f"{row['kl_estimate']:.2f} estimated, ≤ {row['kl_bound']:.2f} bound |")
    return lines


def points_table(results: dict) -> list[str]:
    """Every plotted point of every run."""
    lines = ["| run | step | reward (1 sample) | KL(π‖π_ref), nats |", "|---|---|---|---|"]
    for run in results["runs"]:
        for point in run["points"]:
            lines.append(f"| {run['name']} | {point['step']} | {_pm(point['reward'], point['reward_ci'])} | "
                         f"{_pm(point['kl'], point['kl_ci'])} |")
    return lines


def write_markdown(path: Path, results: dict, verdict: str) -> None:
    world = results["world"]
    lines = [
        "# The reward/KL frontier",
        "",
        f"{len(results['runs'])} runs of {world['steps']} steps each on {world['policy']} "
        f"(reward {world['reward']}), judged at steps {', '.join(map(str, world['point_steps']))} (and 0, π_ref) on "
        f"{world['prompts']} held-out prompts, {world['policy_samples']} samples each; Best-of-N from "
        f"{world['reference_samples']} π_ref samples per prompt. ± are 95% intervals over prompts. "
        f"Wall time {results['elapsed_s']:.0f} s.",
        "",
        "![frontier](frontier.png)",
        "",
        *final_table(results),
        "",
        verdict,
        "",
        "## Every point",
        "",
        *points_table(results),
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
