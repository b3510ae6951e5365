"""BoNBoN's wiring: the pair of each prompt is (best, worst) of n π_ref samples, first on a tie
each way, drawn once and reused; the loss fits SFT on the best and the margin to 1/(2β*_n)."""

from __future__ import annotations

import pytest
import torch

from conftest import RESPONSES, assert_same_step, seq_logps
from fastbond.algorithms.base import Batch
from fastbond.algorithms.bonbon import BoNBoN
from fastbond.algorithms.sections import BoNBoNSection
from fastbond.bon import bonbon_beta


def stub_draws(world, ctx, rewards: torch.Tensor):
    """ctx.draw_k answers with RESPONSES in order and the given rewards; records the models."""
    models = []

    def draw_k(model, prompts, k):
        models.append((model, len(prompts.texts), k))
        many = prompts.repeated(k)
        return world.samples(many, [RESPONSES[i % len(RESPONSES)] for i in range(len(many.texts))]), rewards

    ctx.draw_k = draw_k
    return models


def test_pairs_are_best_and_worst_first_on_ties_and_drawn_once(world):
    ctx = world.context()
    rewards = torch.tensor([[1.0, 3.0, 3.0, -1.0], [0.0, 0.0, 0.0, 0.0], [2.0, -5.0, 7.0, -5.0]])
    models = stub_draws(world, ctx, rewards)
    algorithm = BoNBoN(BoNBoNSection(n=4))
    prompts = world.prompts()
    batch = algorithm.rollout(ctx, prompts)
    assert models == [(world.reference, 3, 4)]
    # prompt 0: best column 1 (tie with 2 → first), worst 3; prompt 1: all tied → 0 and 0; prompt 2: 2 and 1
    best, worst = [1, 0, 2], [3, 0, 1]
    for row, (b, w) in enumerate(zip(best, worst)):
        assert batch.samples["chosen"].response_ids(row) == world.samples(
            world.prompts([prompts.texts[row]]), [RESPONSES[(row * 4 + b) % len(RESPONSES)]]).response_ids(0)
        assert batch.samples["rejected"].response_ids(row) == world.samples(
            world.prompts([prompts.texts[row]]), [RESPONSES[(row * 4 + w) % len(RESPONSES)]]).response_ids(0)
    # the pairs are kept: a second rollout draws nothing new from π_ref
    algorithm.rollout(ctx, prompts)
    assert models == [(world.reference, 3, 4)]
    assert set(algorithm.state_dict()["pairs"]) == set(prompts.texts)


@pytest.mark.parametrize("alpha", [0.005, 0.5])
def test_loss_and_gradient_are_the_oracles(world, alpha):
    prompts = world.prompts()
    chosen, rejected = world.samples(prompts, RESPONSES[:3]), world.samples(prompts, RESPONSES[3:6])
    policy = world.samples(prompts, RESPONSES[6:9])
    batch = Batch({"chosen": chosen, "rejected": rejected, "policy": policy}, {"policy": torch.zeros(3)})
    n = 8
    loss, _ = BoNBoN(BoNBoNSection(n=n, alpha=alpha)).loss(world.context(), batch)

    ell_w, ell_l = seq_logps(world.policy, chosen), seq_logps(world.policy, rejected)
    with torch.no_grad():
        ref_w, ref_l = seq_logps(world.reference, chosen), seq_logps(world.reference, rejected)
    margin = (ell_w - ref_w) - (ell_l - ref_l)
    expected = (alpha * -ell_w + (1 - alpha) * (margin - 1 / (2 * bonbon_beta(n))) ** 2).mean()
    assert_same_step(loss, expected, world.policy)
