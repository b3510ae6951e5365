"""The frontier's PNG: every run's points (reward against measured KL, 95% intervals both ways)
beside the Best-of-N curve of π_ref, its KL both estimated and bounded.

The left panel shows the Best-of-N curve's KL range, where the methods are compared; the right
one every point, its KL axis linear up to 1 nat and logarithmic above (symlog), so a run that
reward-hacks to a hundred nats stays on the same picture as Best-of-2. `plot_frontier` returns the series it
drew, so a test can check that the table holds exactly the plotted points.
"""

from __future__ import annotations

from pathlib import Path

# One colour a method; runs of a method differ by marker.
COLOURS = {"jbond": "C3", "rloo": "C0", "bond": "C2", "iterative_bond": "C8", "vbon": "C4", "bonbon": "C1"}
MARKERS = "os^vD<>px*"


def _draw(ax, runs: list[dict], bon: list[dict], drawn: dict | None) -> None:
    """Every series on `ax`; the first call records what it drew in `drawn`."""
    for kind, style in (("estimate", dict(fmt="k-", lw=1.6)), ("bound", dict(fmt="k--", lw=1.0, alpha=0.6))):
        label = f"Best-of-N of π_ref (KL {'estimated' if kind == 'estimate' else 'bound log N − (N−1)/N'})"
        xs, ys = [row[f"kl_{kind}"] for row in bon], [row["reward"] for row in bon]
        ax.errorbar(xs, ys, yerr=[row["reward_ci"] for row in bon], label=label, capsize=2, **style)
        if drawn is not None:
            drawn[label] = list(zip(xs, ys))
    for row in bon:
        ax.annotate(f"N={row['n']}", (row["kl_estimate"], row["reward"]), fontsize=7, textcoords="offset points",
                    xytext=(4, -10), clip_on=True)
    seen: dict[str, int] = {}
    for run in runs:
        index = seen[run["algorithm"]] = seen.get(run["algorithm"], -1) + 1
        points = run["points"]
        xs, ys = [p["kl"] for p in points], [p["reward"] for p in points]
        ax.errorbar(xs, ys, xerr=[p["kl_ci"] for p in points], yerr=[p["reward_ci"] for p in points],
                    fmt=f"{MARKERS[index % len(MARKERS)]}-", color=COLOURS.get(run["algorithm"], "gray"), ms=4,
                    lw=1.0, capsize=2, alpha=0.85, label=run["name"])
        if drawn is not None:
            drawn[run["name"]] = list(zip(xs, ys))
    ax.grid(alpha=0.3)


def _zoom(ax, runs: list[dict], bon: list[dict]) -> None:
    """Limits that show the Best-of-N curve's KL range and every point inside it."""
    right = 1.1 * max(max(row["kl_bound"], row["kl_estimate"]) for row in bon)
    rewards = [row["reward"] for row in bon] + [p["reward"] for run in runs for p in run["points"] if p["kl"] <= right]
    margin = 0.05 * (max(rewards) - min(rewards) or 1.0)
    ax.set_xlim(-0.02 * right, right)
    ax.set_ylim(min(rewards) - margin, max(rewards) + margin)


def plot_frontier(runs: list[dict], bon: list[dict], path: Path, title: str) -> dict[str, list[tuple[float, float]]]:
    """Draw the PNG at `path`: the Best-of-N curve's KL range (left) and every point (right, symlog KL).
    Returns {series name: [(KL, reward), …]} as drawn on both."""
    from fastbond.report import plt, save_figure

    figure, (near, far) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [3, 2]})
    drawn: dict[str, list[tuple[float, float]]] = {}
    _draw(near, runs, bon, drawn)
    _draw(far, runs, bon, None)
    _zoom(near, runs, bon)
    near.set(xlabel="KL(π ‖ π_ref), nats", ylabel="mean reward of one sample",
             title="within the Best-of-N curve's KL range")
    far.set_xscale("symlog", linthresh=1.0)
    far.set(xlabel="KL(π ‖ π_ref), nats (linear below 1, log above)", title="every point")
    far.legend(fontsize=7, ncol=2, loc="upper left")
    save_figure(figure, path, title)
    return drawn
