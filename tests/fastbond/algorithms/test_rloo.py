"""REINFORCE with a leave-one-out baseline: S policy samples a prompt, each one's baseline the
mean return of the prompt's *other* samples, return r − β_RL (ℓ − log π_ref)."""

from __future__ import annotations

import pytest
import torch

from conftest import RESPONSES, Recorder, assert_same_step, seq_logps
from fastbond.algorithms.base import Batch
from fastbond.algorithms.rloo import Rloo
from fastbond.algorithms.sections import RlooSection


@pytest.mark.parametrize("per_prompt", [2, 3])
def test_loss_and_gradient_are_the_oracles(world, per_prompt):
    prompts = world.prompts()
    drawn = world.samples(prompts.repeated(per_prompt), RESPONSES[: 3 * per_prompt])
    rewards = torch.arange(3 * per_prompt, dtype=torch.float32).view(3, per_prompt).flip(-1) * 0.7 - 1.0
    batch = Batch({"policy": drawn}, {"policy": rewards})
    beta_rl = 0.2
    loss, _ = Rloo(RlooSection(beta_rl=beta_rl, samples_per_prompt=per_prompt)).loss(world.context(), batch)

    ell = seq_logps(world.policy, drawn).view(3, per_prompt)
    with torch.no_grad():
        ref = seq_logps(world.reference, drawn).view(3, per_prompt)
    returns = rewards.double() - beta_rl * (ell.detach() - ref)
    baseline = (returns.sum(-1, keepdim=True) - returns) / (per_prompt - 1)  # the same prompt's others
    expected = (-(returns - baseline) * ell).mean()
    assert_same_step(loss, expected, world.policy)


def test_rollout_draws_every_sample_from_the_policy(world):
    ctx = world.context()
    recorder = Recorder(ctx)
    batch = Rloo(RlooSection(samples_per_prompt=3)).rollout(ctx, world.prompts())
    assert recorder.draws == [(world.policy, 9)]
    assert batch.rewards["policy"].shape == (3, 3)
