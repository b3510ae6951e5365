"""vBoN's wiring: REINFORCE on the policy sample with A = log F̂(r) − (ℓ − log π_ref)/(N−1),
F̂ from the π_ref samples' rewards; no forward term, no anchor."""

from __future__ import annotations

import pytest
import torch

from conftest import RESPONSES, Recorder, assert_same_step, leave_one_out, seq_logps
from fastbond.algorithms.base import Batch
from fastbond.algorithms.sections import VBoNSection
from fastbond.algorithms.vbon import VBoN


def test_loss_and_gradient_are_the_oracles(world):
    prompts = world.prompts()
    policy = world.samples(prompts, RESPONSES[:3])
    rewards = torch.tensor([0.5, -1.0, 2.0])
    ref_rewards = torch.tensor([[0.0, 1.0, 0.5, 2.0], [-2.0, -1.0, 0.0, 1.0], [3.0, 2.5, 2.0, 1.0]])
    batch = Batch({"policy": policy}, {"policy": rewards, "reference": ref_rewards})
    n = 4
    loss, metrics = VBoN(VBoNSection(n=n, mc_samples=4)).loss(world.context(), batch)

    ell = seq_logps(world.policy, policy)
    with torch.no_grad():
        ref = seq_logps(world.reference, policy)
    log_cdf = torch.log((1 + (ref_rewards.double() <= rewards.double()[:, None]).sum(-1)) / 5)
    returns = log_cdf - (ell.detach() - ref) / (n - 1)
    expected = (-(returns - leave_one_out(returns)) * ell).mean()
    assert_same_step(loss, expected, world.policy)
    assert metrics["kl_ref"].item() == pytest.approx(float((ell.detach() - ref).mean()), rel=1e-4, abs=1e-5)


def test_rollout_scores_k_reference_samples(world):
    ctx = world.context()
    recorder = Recorder(ctx)
    batch = VBoN(VBoNSection(mc_samples=3)).rollout(ctx, world.prompts())
    assert recorder.draws == [(world.policy, 3), (world.reference, 9)]
    assert batch.rewards["reference"].shape == (3, 3)
