"""The PNG report of a run: reward and KL over steps, and the reward/KL front
of the policy beside the Best-of-N points of π_ref. A pairwise judge's run has
no reward: win rates under the judge take the reward's panels."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # a run of skipped steps has nothing to label
        ax.legend(fontsize=8)


def write_report(records: list[dict], evaluation: dict | None, path: Path, title: str = "fastbond run") -> Path:
    figure, (ax_steps, ax_kl, ax_front) = plt.subplots(1, 3, figsize=(15, 4.2))
    judged = (evaluation is not None and "judge" in evaluation) or any("win_rate_vs_anchor" in r for r in records)
    (_judged_panels if judged else _reward_panels)(records, evaluation, ax_steps, ax_front)
    for key, label in (("kl_ref", "KL(π‖π_ref)"), ("kl_anchor", "KL(π‖π_anc)")):
        s, v = _series(records, key)
        if s:
            ax_kl.plot(s, v, label=label, lw=1.2)
    ax_kl.set(xlabel="step", ylabel="nats", title="KL (sequence-level estimates)")
    _legend(ax_kl)
    return save_figure(figure, path, title)


def _reward_panels(records: list[dict], evaluation: dict | None, ax_reward, ax_front) -> None:
    """The reward over steps beside Best-of-N of π_ref, and the reward/KL front."""
    steps, reward = _series(records, "reward")
    ax_reward.plot(steps, reward, label="policy sample", lw=1.2)
    anchor_steps, anchor_reward = _series(records, "anchor_reward")
    if anchor_steps:
        ax_reward.plot(anchor_steps, anchor_reward, label="anchor samples", lw=1.0, alpha=0.7)
    if evaluation:
        for n, row in evaluation["bon"].items():
            if n in ("1", "4"):
                ax_reward.axhline(row["reward"], ls="--", lw=0.8, color="gray")
                ax_reward.text(0, row["reward"], f" BoN-{n} of π_ref", va="bottom", fontsize=8, color="gray")
    ax_reward.set(xlabel="step", ylabel="mean reward (train prompts)", title="reward")
    _legend(ax_reward)

    if evaluation:
        bon = evaluation["bon"]
        ax_front.plot([row["kl_bound"] for row in bon.values()], [row["reward"] for row in bon.values()],
                      "o--", color="gray", label="Best-of-N of π_ref (KL bound)")
        for n, row in bon.items():
            ax_front.annotate(f"N={n}", (row["kl_bound"], row["reward"]), fontsize=8,
                              textcoords="offset points", xytext=(4, -10))
        ax_front.plot([evaluation["kl_policy_ref"]], [evaluation["policy_reward"]], "*", ms=14, color="C3",
                      label="trained policy, 1 sample")
    kl_steps, kl_values = _series(records, "kl_ref")
    _, rewards_at = _series(records, "reward")
    if kl_steps and len(rewards_at) == len(kl_values):
        ax_front.plot(kl_values, rewards_at, lw=0.6, alpha=0.4, color="C0", label="training trajectory")
    ax_front.set(xlabel="KL(π‖π_ref) (nats)", ylabel="mean reward", title="reward vs KL")
    _legend(ax_front)


def _judged_panels(records: list[dict], evaluation: dict | None, ax_steps, ax_front) -> None:
    """A pairwise judge's run (no reward): the policy sample's win rate against the anchor samples over
    steps, and the trained policy's against Best-of-N of π_ref (picked by the judge) at each N's KL bound."""
    steps, rate = _series(records, "win_rate_vs_anchor")
    ax_steps.plot(steps, rate, label="policy sample vs anchor samples", lw=1.2)
    ax_steps.axhline(0.5, ls="--", lw=0.8, color="gray")
    ax_steps.set(xlabel="step", ylabel="win rate under the judge", title="win rate vs the anchor")
    _legend(ax_steps)
    if evaluation:
        bon = evaluation["bon"]
        ax_front.plot([row["kl_bound"] for row in bon.values()], [row["win_rate"] for row in bon.values()], "o-",
                      color="C3", label="trained policy vs Best-of-N of π_ref")
        for n, row in bon.items():
            ax_front.annotate(f"N={n}", (row["kl_bound"], row["win_rate"]), fontsize=8,
                              textcoords="offset points", xytext=(4, -10))
        ax_front.axhline(0.5, ls="--", lw=0.8, color="gray")
        ax_front.axvline(evaluation["kl_policy_ref"], ls=":", lw=0.8, color="C3", label="KL(π‖π_ref) of the policy")
    ax_front.set(xlabel="KL bound of Best-of-N (nats)", ylabel="win rate under the judge",
                 title="win rate vs Best-of-N")
    _legend(ax_front)


def save_figure(figure, path: Path, title: str) -> Path:
    """`figure` under `title`, written to `path` as a PNG and closed."""
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
