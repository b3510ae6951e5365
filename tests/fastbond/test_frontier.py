"""`fastbond frontier` end to end on a tiny grid (its table holds exactly what it plotted; a
second invocation redoes nothing; an interrupted one finishes), and the Best-of-N KL estimate
against the exact KL of a small discrete distribution."""

import json
import math
import shutil

import pytest
import torch

from fastbond.bon import bon_distribution, bon_kl_bound, kl_divergence
from fastbond.errors import FastbondError
from fastbond.frontier.bon_curve import bon_kl_estimate
from fastbond.frontier.command import run_frontier
from fastbond.frontier.verdict import at_kl, envelope

TINY = """\
steps: 2
seed: 0
cpu_threads: 1
model: {policy: embedded}
data: {prompts: embedded, eval_prompts: embedded, max_prompt_tokens: 32}
algorithm: {name: jbond, eta: 0.3}
optim: {lr: 2.0e-3, warmup_steps: 0}
rollout: {batch_size: 4, max_new_tokens: 8}
logging: {progress: false}
evaluation: {max_prompts: 6}
frontier:
  points: 2
  policy_samples: 2
  reference_samples: 4
  runs:
    jbond: []
    rloo: [algorithm.name=rloo, algorithm.beta_rl=0.1]
    bond: [algorithm.name=bond, algorithm.n=2, algorithm.mc_samples=2]
"""


@pytest.fixture(scope="module")
def frontier(tmp_path_factory, embedded_reference):
    """A finished tiny frontier: (its config file, its output directory, its results)."""
    root = tmp_path_factory.mktemp("frontier")
    config = root / "tiny.yaml"
    config.write_text(TINY)
    out = root / "out"
    return config, out, run_frontier(config, [], out, say=lambda line: None)


def _table(results: dict) -> dict[str, list[list[float]]]:
    """The series results.json's table holds: each run's points, each Best-of-N curve."""
    series = {run["name"]: [[p["kl"], p["reward"]] for p in run["points"]] for run in results["runs"]}
    for kind in ("estimate", "bound"):
        name = next(n for n in results["plotted"] if n.startswith("Best-of-N") and kind[:5] in n)
        series[name] = [[row[f"kl_{kind}"], row["reward"]] for row in results["bon"]]
    return series


def test_the_table_holds_exactly_the_points_plotted(frontier):
    _, out, results = frontier
    assert (out / "frontier.png").stat().st_size > 10_000
    saved = json.loads((out / "results.json").read_text())
    assert saved["plotted"] == _table(saved)
    # steps 0, 1, 2 of each of the three runs: step 0 is π_ref itself
    assert [[p["step"] for p in run["points"]] for run in saved["runs"]] == [[0, 1, 2]] * 3
    assert all(run["points"][0]["kl"] == 0.0 for run in saved["runs"])
    assert [row["n"] for row in saved["bon"]] == [1, 2, 4]
    markdown = (out / "results.md").read_text()
    for run in saved["runs"]:
        for point in run["points"]:
            assert f"| {run['name']} | {point['step']} | {point['reward']:.3f} ± {point['reward_ci']:.3f} | " \
                   f"{point['kl']:.3f} ± {point['kl_ci']:.3f} |" in markdown
    assert saved["verdict_text"] in markdown


def test_a_finished_frontier_is_not_redone(frontier, monkeypatch):
    config, out, results = frontier
    from fastbond.frontier import points, runs

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "train_run", no_training)
    monkeypatch.setattr(runs, "judge_run", no_training)
    monkeypatch.setattr(points.Judge, "models", property(no_training))  # not even a model is loaded
    again = run_frontier(config, [], out, say=lambda line: None)
    assert again["runs_reused"] == 3
    assert again["runs"] == results["runs"] and again["bon"] == results["bon"]


def test_an_interrupted_frontier_finishes(frontier, tmp_path):
    config, out, results = frontier
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    # rloo was cut short after its first checkpoint; bond before its points were judged
    rloo = copy / "rloo"
    (rloo / "frontier_points.json").unlink()
    shutil.rmtree(rloo / "checkpoints" / "step-000002")
    shutil.rmtree(rloo / "policy")
    (rloo / "checkpoints" / "latest").write_text("step-000001\n")
    (copy / "bond" / "frontier_points.json").unlink()
    lines = []
    finished = run_frontier(config, [], copy, say=lines.append)
    assert finished["runs_reused"] == 1
    assert any("rloo: resuming" in line for line in lines)
    # resumed training continues exactly, and judging is reseeded at every point
    assert finished["runs"] == results["runs"]


def test_a_run_may_not_change_the_world(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(TINY.replace("rloo: [algorithm.name=rloo", "rloo: [reward.name=length, algorithm.name=rloo"))
    with pytest.raises(FastbondError, match="frontier.runs.rloo.*reward.name.*same reward"):
        run_frontier(config, [], tmp_path / "out", say=lambda line: None)
    config.write_text(TINY.replace("jbond: []", "jbond: [algorithm.etaa=0.1]"))
    with pytest.raises(FastbondError, match="frontier run 'jbond'.*algorithm.etaa"):
        run_frontier(config, [], tmp_path / "out", say=lambda line: None)


def test_bon_kl_estimate_is_exact_on_an_empirical_distribution():
    # 8 samples whose frequencies are exactly the distribution p: ties in the reward included
    p = torch.tensor([0.125, 0.25, 0.125, 0.375, 0.125], dtype=torch.float64)
    rewards = torch.tensor([0.0, 1.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    counts = (p * 8).long()
    samples = torch.repeat_interleave(rewards, counts)[torch.randperm(8)]
    for n in (1, 2, 4, 16):
        exact = kl_divergence(bon_distribution(p, rewards, n), p)
        assert bon_kl_estimate(samples.unsqueeze(0), n)[0].item() == pytest.approx(exact.item(), abs=1e-12)
    # ties make BoN move less far than the continuous-reward bound
    assert bon_kl_estimate(samples.unsqueeze(0), 4)[0] < bon_kl_bound(4)


def test_bon_kl_estimate_converges_to_the_exact_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    levels = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    samples = levels[torch.multinomial(p, 200_000, replacement=True)].view(4, 50_000)  # 4 "prompts"
    for n in (2, 8):
        exact = kl_divergence(bon_distribution(p, levels, n), p).item()
        assert bon_kl_estimate(samples, n).mean().item() == pytest.approx(exact, rel=0.02)
    # distinct rewards: the estimate approaches the bound log N − (N−1)/N
    continuous = torch.rand(1, 50_000, dtype=torch.float64)
    assert bon_kl_estimate(continuous, 4)[0].item() == pytest.approx(bon_kl_bound(4), rel=0.01)


def test_envelope_and_interpolation():
    points = [{"kl": 0.0, "reward": 0.0}, {"kl": 1.0, "reward": 1.0}, {"kl": 2.0, "reward": 0.5},
              {"kl": 3.0, "reward": 2.0}, {"kl": 4.0, "reward": 1.5}]
    assert envelope(points) == [(0.0, 0.0), (1.0, 1.0), (3.0, 2.0), (4.0, 2.0)]
    curve = envelope(points)
    assert at_kl(curve, 2.0) == pytest.approx(1.5)
    assert at_kl(curve, 3.5) == 2.0 and at_kl(curve, 5.0) is None and at_kl(curve, -1.0) is None
    assert math.isclose(at_kl(curve, 0.5), 0.5)


def test_a_config_without_a_grid_is_one_line(tmp_path, capsys):
    from fastbond.cli import main

    config = tmp_path / "plain.yaml"
    config.write_text(TINY.split("frontier:")[0])
    assert main(["frontier", str(config), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "frontier.runs' is empty" in error
    assert main(["frontier", str(config), "frontier.points=0"]) == 2
    assert "frontier.points' must be > 0" in capsys.readouterr().err


def test_best_of_n_rewards_from_many_samples():
    # C(128, 64) does not fit an int64: the Best-of-N curve from 128 π_ref samples needs floats
    from fractions import Fraction

    from fastbond.evaluate import expected_max_of_n

    m, n = 128, 64
    exact = sum(Fraction(i * math.comb(i - 1, n - 1), math.comb(m, n)) for i in range(1, m + 1))
    rewards = torch.arange(1, m + 1, dtype=torch.float64)[torch.randperm(m)].unsqueeze(0)
    assert expected_max_of_n(rewards, n).item() == pytest.approx(float(exact), rel=1e-12)
