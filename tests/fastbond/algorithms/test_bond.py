"""BOND-N's and iterative BOND's wiring (SPEC §4, §6): the best of the first N base samples feeds
the forward term, the first `mc_samples` base samples the quantiles; iterative BOND's base is the
anchor, replaced by the policy every K steps and at no other step."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import RESPONSES, Recorder, assert_same_step, leave_one_out, seq_logps
from fastbond.algorithms.base import Batch
from fastbond.algorithms.bond import BondN, IterativeBond
from fastbond.algorithms.sections import BondSection, IterativeBondSection

K = 6  # base samples per prompt in these tests


def bond_batch(world, base_rewards, rewards=(0.5, -1.0, 2.0)):
    prompts = world.prompts()
    policy = world.samples(prompts, RESPONSES[:3])
    base = world.samples(prompts.repeated(K), [RESPONSES[(3 + i) % len(RESPONSES)] for i in range(3 * K)])
    return Batch({"policy": policy, "base": base},
                 {"policy": torch.tensor(rewards), "base": torch.tensor(base_rewards)})


def oracle_loss(world, batch, base_model, best_columns, mc, n, beta):
    """Jeffreys surrogate to BoN_N(base): SFT on the chosen base samples, REINFORCE with
    R = (N−1)·log p̂≤ − (ℓ − log π_base), p̂≤ = (1 + #{j < mc: r_j ≤ r}) / (mc + 1)."""
    policy_samples = batch.samples["policy"]
    rows = torch.tensor([i * K + c for i, c in enumerate(best_columns)])
    ell = seq_logps(world.policy, policy_samples)
    ell_best = seq_logps(world.policy, batch.samples["base"].select(rows))
    with torch.no_grad():
        base = seq_logps(base_model, policy_samples)
    rewards, base_rewards = batch.rewards["policy"].double(), batch.rewards["base"].double()[:, :mc]
    quantile = (1 + (base_rewards <= rewards[:, None]).sum(-1)) / (mc + 1)
    returns = (n - 1) * torch.log(quantile) - (ell.detach() - base)
    advantages = returns - leave_one_out(returns)
    return ((1 - beta) * -ell_best + beta * -advantages * ell).mean(), torch.log(quantile).mean()


# Per prompt, K = 6 base rewards. Prompt 0's best overall (column 4) lies past the first N = 3;
# prompt 1 has a tie among the first N (→ column 0); prompt 2's best is column 2.
BASE_REWARDS = [[0.0, 2.0, 1.0, -1.0, 5.0, 0.5],
                [3.0, 1.0, 3.0, 0.0, 0.0, 9.0],
                [-1.0, 0.0, 4.0, 4.0, -2.0, 1.0]]


@pytest.mark.parametrize("n,mc,best_columns", [
    (3, 6, [1, 0, 2]),  # the forward term looks at the first N only; quantiles at all 6
    (6, 3, [4, 5, 2]),  # best of all 6; quantiles from the first 3 only
])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bond_n_terms_use_the_first_n_and_the_first_mc_base_samples(world, n, mc, best_columns, beta):
    batch = bond_batch(world, BASE_REWARDS)
    algorithm = BondN(BondSection(n=n, mc_samples=mc, beta=beta))
    assert algorithm.base_samples() == K
    loss, metrics = algorithm.loss(world.context(), batch)
    expected, log_quantile = oracle_loss(world, batch, world.reference, best_columns, mc, n, beta)
    assert_same_step(loss, expected, world.policy)
    assert metrics["log_quantile"].item() == pytest.approx(float(log_quantile), rel=1e-6)


def test_bond_n_samples_its_base_from_the_reference(world):
    ctx = world.context()
    recorder = Recorder(ctx)
    batch = BondN(BondSection(n=4, mc_samples=5)).rollout(ctx, world.prompts())
    assert recorder.draws == [(world.policy, 3), (world.reference, 15)]
    assert batch.rewards["base"].shape == (3, 5)


def test_iterative_bond_distils_best_of_n_of_the_anchor(world):
    batch = bond_batch(world, BASE_REWARDS)
    loss, _ = IterativeBond(IterativeBondSection(n=3, mc_samples=6, beta=0.5)).loss(world.context(), batch)
    expected, _ = oracle_loss(world, batch, world.anchor.model, [1, 0, 2], 6, 3, 0.5)
    assert_same_step(loss, expected, world.policy)
    ctx = world.context()
    recorder = Recorder(ctx)
    IterativeBond(IterativeBondSection(n=2, mc_samples=2)).rollout(ctx, world.prompts())
    assert recorder.draws == [(world.policy, 3), (world.anchor.model, 6)]


def test_iterative_bond_copies_the_policy_into_the_anchor_every_k_steps(world):
    algorithm = IterativeBond(IterativeBondSection(anchor_period=3))
    ctx = world.context()
    copied_at = []
    for step in range(1, 8):
        with torch.no_grad():  # the policy moves every step
            for param in world.policy.parameters():
                param.add_(0.01)
        before = [p.detach().clone() for p in world.anchor.model.parameters()]
        algorithm.after_step(ctx, step)
        after = list(world.anchor.model.parameters())
        if all(torch.equal(a, p.detach()) for a, p in zip(after, world.policy.parameters())):
            copied_at.append(step)
        else:
            assert all(torch.equal(a, b) for a, b in zip(after, before)), f"anchor moved at step {step}"
    assert copied_at == [3, 6]


def test_quantile_metric_matches_the_smoothed_estimator():
    """(1 + #{r_j ≤ r}) / (k + 1): a sample below every reference sample still has log p̂≤ > −∞."""
    from fastbond.bon import mc_quantile

    rewards, ref = torch.tensor([-10.0, 0.5]), torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.5, 2.0]])
    assert mc_quantile(rewards, ref).tolist() == [0.25, 0.75]
    assert math.isfinite(math.log(0.25))
