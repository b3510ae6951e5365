"""What a frontier's numbers say, computed, never typed: J-BOND against REINFORCE at equal KL,
and how far each run ends from the Best-of-N curve of π_ref.

A method's curve is the upper envelope of its runs' points (reward against measured
KL(π‖π_ref)): the points no other point of the method beats with less KL, joined by straight
lines. A line between two policies is achievable or beaten: their mixture has the mixed reward
and, KL being convex, at most the mixed KL. A point is judged against a curve only inside the
curve's KL range; "above" and "below" mean by more than the point's own 95% interval.
"""

from __future__ import annotations


def envelope(points: list[dict]) -> list[tuple[float, float]]:
    """(KL, reward) of the points that no point with less KL beats, in order of KL, held level
    out to the method's largest KL (a point beaten with less KL still marks how far it went)."""
    curve: list[tuple[float, float]] = []
    ordered = sorted(points, key=lambda p: (p["kl"], -p["reward"]))
    for point in ordered:
        if not curve or point["reward"] > curve[-1][1]:
            curve.append((point["kl"], point["reward"]))
    if curve and ordered[-1]["kl"] > curve[-1][0]:
        curve.append((ordered[-1]["kl"], curve[-1][1]))
    return curve


def at_kl(curve: list[tuple[float, float]], kl: float) -> float | None:
    """The curve's reward at `kl`, linearly between its points; None outside its KL range."""
    if not curve or kl < curve[0][0] or kl > curve[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= kl <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (kl - x0) / (x1 - x0)
    return curve[0][1]  # a one-point curve, at its own KL


def _side(gap: float | None, ci: float) -> str:
    if gap is None:
        return "outside"
    return "above" if gap > ci else "below" if gap < -ci else "within"


def compare(points: list[dict], curve: list[tuple[float, float]]) -> list[dict]:
    """Each trained point (step > 0) against a curve: the curve's reward at its KL, and which side."""
    rows = []
    for point in points:
        if point["step"] == 0:
            continue
        other = at_kl(curve, point["kl"])
        gap = None if other is None else point["reward"] - other
        rows.append({**point, "curve_reward": other, "gap": gap, "side": _side(gap, point["reward_ci"])})
    return rows


def bon_curves(bon: list[dict]) -> dict[str, list[tuple[float, float]]]:
    return {kind: [(row[f"kl_{kind}"], row["reward"]) for row in bon] for kind in ("estimate", "bound")}


def verdict(runs: list[dict], bon: list[dict]) -> dict:
    """The comparisons behind the README's verdict, as numbers."""
    family = {name: [point for run in runs if run["algorithm"] == name for point in run["points"]]
              for name in ("jbond", "rloo")}
    curves = bon_curves(bon)
    result = {
        "rloo_vs_jbond": compare(family["rloo"], envelope(family["jbond"])),
        "jbond_vs_rloo": compare(family["jbond"], envelope(family["rloo"])),
        "jbond_kl_range": [min((p["kl"] for p in family["jbond"]), default=None),
                           max((p["kl"] for p in family["jbond"]), default=None)],
        "to_bon": {},
    }
    result["rloo_runs"] = [run["name"] for run in runs if run["algorithm"] == "rloo"]
    result["bon_top"] = {"n": bon[-1]["n"], "kl": bon[-1]["kl_bound"], "reward": bon[-1]["reward"]}
    for run in runs:
        final = run["points"][-1]
        result["to_bon"][run["name"]] = {kind: compare([final], curve)[0] for kind, curve in curves.items()}
    return result


def _count(rows: list[dict], side: str) -> int:
    return sum(row["side"] == side for row in rows)


def _jbond_sentence(found: dict) -> str:
    rloo, jbond = found["rloo_vs_jbond"], found["jbond_vs_rloo"]
    if not rloo or not jbond:
        return "The grid lacks J-BOND or REINFORCE (rloo) runs: no comparison between them."
    inside = [row for row in rloo if row["side"] != "outside"]
    beyond = [row for row in rloo if row["side"] == "outside"]
    hi = found["jbond_kl_range"][1]
    text = (f"Of the {len(rloo)} REINFORCE points, {len(inside)} fall within J-BOND's KL range (up to {hi:.2f} nats); "
            f"J-BOND's curve is higher at {_count(inside, 'below')} of them, lower at {_count(inside, 'above')}, "
            f"and level within the 95% interval at {_count(inside, 'within')}.")
    if inside:
        worst = max(inside, key=lambda row: row["gap"])
        best = min(inside, key=lambda row: row["gap"])
        text += (f" The gaps (REINFORCE − J-BOND at equal KL) run from {best['gap']:+.3f} to {worst['gap']:+.3f} "
                 f"(REINFORCE {worst['reward']:.3f} against J-BOND {worst['curve_reward']:.3f} at KL "
                 f"{worst['kl']:.2f}).")
    if beyond:
        top = max(beyond, key=lambda row: row["reward"])
        text += (f" REINFORCE points beyond J-BOND's largest KL: {len(beyond)}; the best of them reaches "
                 f"{top['reward']:.3f} at KL {top['kl']:.2f}.")
    above, below, level = (_count(inside, side) for side in ("above", "below", "within"))
    if above == 0 and below > 0:
        lead = ("**On this world J-BOND dominates REINFORCE where both are measured**: no REINFORCE point in "
                "J-BOND's KL range is above J-BOND's curve. ")
    elif above > below:
        lead = "**On this world J-BOND does not dominate REINFORCE: REINFORCE is ahead more often.** "
    else:
        lead = ("**On this world J-BOND does not dominate REINFORCE: at equal KL the two are mostly level.** "
                if level >= above + below else "**On this world J-BOND does not dominate REINFORCE.** ")
    return lead + text


def _bon_sentence(name: str, rows: dict) -> str:
    est, bound = rows["estimate"], rows["bound"]
    where = (f"{est['gap']:+.3f} from the Best-of-N curve at its KL ({est['kl']:.2f} nats, estimated KL)"
             if est["gap"] is not None else f"beyond the Best-of-N curve's KL range (KL {est['kl']:.2f} nats)")
    if bound["gap"] is not None:
        where += f", {bound['gap']:+.3f} from it against the KL bound"
    return f"{name} ends at reward {est['reward']:.3f}, {where}."


def _why(found: dict) -> str:
    """Why J-BOND need not dominate: what each method aims at, and where REINFORCE ended."""
    rloo = [row for row in found["rloo_vs_jbond"] if row["side"] != "outside"]
    if not rloo or (_count(rloo, "above") == 0 and _count(rloo, "below") > 0):
        return ""
    above_bon = [name for name, rows in found["to_bon"].items()
                 if rows["estimate"]["side"] == "above" and name in found["rloo_runs"]]
    # a REINFORCE run that ended past every Best-of-N point's KL, with more reward than any of them
    top = found["bon_top"]
    hacking = [name for name, rows in found["to_bon"].items() if name in found["rloo_runs"]
               and rows["bound"]["kl"] > top["kl"] and rows["bound"]["reward"] > top["reward"]]
    hacked = (f", and at a smaller β_RL ({', '.join(hacking)}) it drives the reward past Best-of-{top['n']} by moving "
              f"beyond its KL bound of {top['kl']:.2f} nats" if hacking else "")
    return ("Why: at a given KL(π‖π_ref) no policy has a higher expected reward than π_ref·exp(r/β), the optimum "
            "of the KL-penalized objective REINFORCE with β_RL = β aims at. Best-of-N lies close to that optimum "
            "but not on it, and J-BOND distils Best-of-N, so at best it tracks the Best-of-N curve; REINFORCE, "
            "where its optimization holds, can sit on or above that curve"
            + (f" (here {', '.join(above_bon)} ended above it)" if above_bon else "")
            + ". The BOND paper's advantage is measured at Gemma scale with a learned reward model; on this "
            "world, REINFORCE at a suitable β_RL keeps up with J-BOND" + hacked + ".")


def verdict_text(found: dict) -> str:
    why = _why(found)
    lines = [_jbond_sentence(found), *(["", why] if why else []), "",
             "Distance of each run's last point to the Best-of-N curve of π_ref (reward minus the curve's reward at "
             "the same KL; positive is above the curve):", ""]
    lines += [f"- {_bon_sentence(name, rows)}" for name, rows in found["to_bon"].items()]
    return "\n".join(lines)
