"""J-BOND's wiring (SPEC §5): which samples and which models feed which term, and the anchor's move.

Each test drives `JBond` alone on hand-made samples with rewards set by the test,
against an oracle that recomputes the surrogate from the models' full logits.
"""

from __future__ import annotations

import pytest
import torch

from conftest import JBOND_PENALTY, RESPONSES, Recorder, assert_same_step, leave_one_out, seq_logps
from fastbond.algorithms.base import Batch
from fastbond.algorithms.jbond import JBond
from fastbond.algorithms.sections import JBondSection
from fastbond.judges import PairwiseJudge


def jbond_batch(world, anchor_rewards, rewards=(0.5, -1.0, 2.0)):
    prompts = world.prompts()
    policy = world.samples(prompts, RESPONSES[:3])
    # anchor samples, two a prompt: [p0, p0, p1, p1, p2, p2]
    anchor = world.samples(prompts.repeated(2), RESPONSES[3:9])
    return Batch({"policy": policy, "anchor": anchor},
                 {"policy": torch.tensor(rewards), "anchor": torch.tensor(anchor_rewards)})


def oracle_loss(world, batch, best_rows, beta, gamma):
    """SPEC §5 step 6 from full logits: ℓ, a, ℓ(y_bo2), r_J, leave-one-out baseline."""
    policy_samples = batch.samples["policy"]
    best = batch.samples["anchor"].select(torch.tensor(best_rows))
    ell = seq_logps(world.policy, policy_samples)
    with torch.no_grad():
        a = seq_logps(world.anchor.model, policy_samples)
    ell_best = seq_logps(world.policy, best)
    rewards, anchor_rewards = batch.rewards["policy"].double(), batch.rewards["anchor"].double()
    worse = rewards < anchor_rewards.min(-1).values
    r_j = torch.where(worse, torch.tensor(JBOND_PENALTY, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    returns = r_j - (ell.detach() - a)
    advantages = returns - leave_one_out(returns)
    return ((1 - beta) * -ell_best + beta * -advantages * ell + gamma * (ell.detach() - a) * ell).mean()


@pytest.mark.parametrize("beta,gamma", [(0.0, 0.0), (1.0, 0.0), (0.5, 0.0), (0.3, 1.5)])
def test_loss_and_gradient_are_the_oracles(world, beta, gamma):
    # anchor sample 1 is better for prompt 0, sample 0 for prompt 1, a tie (→ sample 0) for prompt 2
    batch = jbond_batch(world, [[0.0, 1.0], [3.0, -2.0], [1.0, 1.0]])
    loss, _ = JBond(JBondSection(beta=beta, gamma=gamma)).loss(world.context(), batch)
    assert_same_step(loss, oracle_loss(world, batch, [1, 2, 4], beta, gamma), world.policy)


def test_forward_term_distils_the_better_anchor_sample_first_on_a_tie(world):
    """β = 0: the loss is −mean ℓ(y_bo2) alone; y_bo2 is the argmax, the first one on a tie."""
    algorithm = JBond(JBondSection(beta=0.0))
    for anchor_rewards, best_rows in (([[0.0, 1.0], [3.0, -2.0], [1.0, 1.0]], [1, 2, 4]),
                                      ([[2.0, 1.0], [-3.0, -2.0], [0.0, 5.0]], [0, 3, 5])):
        batch = jbond_batch(world, anchor_rewards)
        loss, metrics = algorithm.loss(world.context(), batch)
        best = batch.samples["anchor"].select(torch.tensor(best_rows))
        expected = -seq_logps(world.policy, best).mean()
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(metrics["best_anchor_logp"].double(), -expected.detach(), rtol=1e-5, atol=1e-6)


def test_backward_term_uses_the_policy_sample_and_r_j(world):
    """β = 1: REINFORCE on the policy sample with R = r_J − (ℓ − a); r_J = −log 16 only when
    the policy sample is worse than both anchor samples."""
    batch = jbond_batch(world, [[0.0, 1.0], [3.0, -2.0], [1.0, 1.0]], rewards=(-0.5, -1.0, 2.0))
    _, metrics = JBond(JBondSection(beta=1.0)).loss(world.context(), batch)
    # prompt 0: −0.5 < min(0, 1): worse than both; prompt 1: −1 ≥ −2; prompt 2: 2 ≥ 1
    assert metrics["frac_worse_than_both"] == pytest.approx(1 / 3)
    assert metrics["jbond_reward"].item() == pytest.approx(JBOND_PENALTY / 3, rel=1e-6)
    ell = seq_logps(world.policy, batch.samples["policy"]).detach()
    a = seq_logps(world.anchor.model, batch.samples["policy"]).detach()
    torch.testing.assert_close(metrics["policy_logp"].double(), ell.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["kl_anchor"].double(), (ell - a).mean(), rtol=1e-4, atol=1e-5)
    ref = seq_logps(world.reference, batch.samples["policy"]).detach()
    torch.testing.assert_close(metrics["kl_ref"].double(), (ell - ref).mean(), rtol=1e-4, atol=1e-5)


def test_rollout_draws_one_policy_sample_and_two_anchor_samples(world):
    ctx = world.context()
    recorder = Recorder(ctx)
    prompts = world.prompts()
    batch = JBond(JBondSection()).rollout(ctx, prompts)
    assert recorder.draws == [(world.policy, 3), (world.anchor.model, 6)]
    assert batch.rewards["policy"].shape == (3,) and batch.rewards["anchor"].shape == (3, 2)
    # rewards are the reward function's, on each row's own response
    lengths = [float(len(t)) for t in batch.samples["anchor"].texts]
    assert batch.rewards["anchor"].flatten().tolist() == lengths
    assert batch.rewards["policy"].tolist() == [float(len(t)) for t in batch.samples["policy"].texts]


def test_under_a_judge_the_rollout_draws_the_same_and_decides_in_3_comparisons_a_prompt(world):
    """reward.kind=pairwise: the same draws as with a reward, one judge call of 3 pairs a prompt, and a loss
    equal to the one on the rewards the judge compares (docs/judges.md)."""
    def length(texts):
        return torch.tensor([float(len(t.split())) for t in texts])

    calls = []

    def by_length(prompts, responses_a, responses_b):
        calls.append(len(prompts))
        return length(responses_a) - length(responses_b)

    ctx = world.context(reward_fn=PairwiseJudge(by_length, "pairwise judge test:by_length", "sign"))
    recorder = Recorder(ctx)
    torch.manual_seed(3)
    judged = JBond(JBondSection()).rollout(ctx, world.prompts())
    assert recorder.draws == [(world.policy, 3), (world.anchor.model, 6)]
    assert calls == [9] and not judged.scalar
    assert judged.metrics["judge_comparisons_per_prompt"].item() == 3.0

    samples = judged.samples
    scalar = Batch(samples, {"policy": length(samples["policy"].texts),
                             "anchor": length(samples["anchor"].texts).view(3, 2)})
    algorithm = JBond(JBondSection(beta=0.5, gamma=0.5))
    loss, metrics = algorithm.loss(ctx, judged)
    expected, expected_metrics = algorithm.loss(world.context(), scalar)
    assert_same_step(loss, expected, world.policy)
    assert "anchor_reward" not in metrics and "anchor_reward" in expected_metrics
    assert metrics["frac_worse_than_both"] == expected_metrics["frac_worse_than_both"]


def test_anchor_moves_by_exactly_eta_toward_the_policy(world):
    eta = 0.3
    before = [p.detach().clone() for p in world.anchor.model.parameters()]
    JBond(JBondSection(eta=eta)).after_step(world.context(), step=1)
    for old, new, policy in zip(before, world.anchor.model.parameters(), world.policy.parameters()):
        expected = old.double() + eta * (policy.detach().double() - old.double())
        torch.testing.assert_close(new.double(), expected, rtol=0, atol=3e-7)  # float32 rounding of the update
    assert any(not torch.equal(old, new) for old, new in zip(before, world.anchor.model.parameters()))
