"""Unit tests of fastbond.losses (SPEC §5-§6): hand-computed values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from fastbond.bon import bonbon_beta, mc_quantile
from fastbond.losses import (
    bond_loss,
    bonbon_loss,
    jbond_loss,
    leave_one_out_baseline,
    rloo_loss,
    sequence_logps,
    vbon_loss,
)

F64 = torch.float64
LOG16 = math.log(16.0)


def t(rows, dtype=F64, grad=False):
    return torch.tensor(rows, dtype=dtype, requires_grad=grad)


def mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------- helpers


def test_sequence_logps_ignores_poisoned_padding():
    logps = t([[-1.0, -2.0, -math.inf], [-0.5, math.nan, -math.inf]])
    out = sequence_logps(logps, mask([[1, 1, 0], [1, 0, 0]]))
    torch.testing.assert_close(out, t([-3.0, -0.5]))


def test_sequence_logps_dtypes():
    logps = torch.full((2, 3), -0.25, dtype=torch.bfloat16)
    assert sequence_logps(logps, torch.ones(2, 3)).dtype == torch.float32
    assert sequence_logps(logps.double(), torch.ones(2, 3)).dtype == F64
    torch.testing.assert_close(sequence_logps(logps, torch.tensor([[1, 0, 1], [0, 0, 0]])), torch.tensor([-0.5, 0.0]))


def test_sequence_logps_shape_mismatch():
    with pytest.raises(ValueError, match=r"log-probs \(2, 3\) and mask \(2, 4\) differ in shape"):
        sequence_logps(torch.zeros(2, 3), torch.ones(2, 4))


def test_leave_one_out_baseline():
    torch.testing.assert_close(leave_one_out_baseline(t([1.0, 2.0, 3.0])), t([2.5, 2.0, 1.5]))
    torch.testing.assert_close(leave_one_out_baseline(t([4.0])), t([0.0]))
    torch.testing.assert_close(leave_one_out_baseline(t([[1.0, 3.0], [2.0, 6.0]]), dim=1), t([[3.0, 1.0], [6.0, 2.0]]))


# ----------------------------------------------------------------- J-BOND


def jbond_case(**kwargs):
    """B = 2, T = 2, masks of uneven length; see the hand computation below."""
    inputs = dict(
        policy_logps=t([[-0.5, -1.0], [-0.2, -0.3]], grad=True),
        policy_mask=mask([[1, 1], [1, 0]]),
        best_anchor_logps=t([[-0.1, -0.4], [-0.7, -0.2]], grad=True),
        best_anchor_mask=mask([[1, 0], [1, 1]]),
        anchor_logps=t([[-0.6, -0.6], [-0.4, 99.0]], grad=True),  # 99: padding, masked by policy_mask
        rewards=t([0.0, 5.0]),
        anchor_rewards=t([[1.0, 2.0], [1.0, 2.0]]),
    )
    inputs.update(kwargs)
    return inputs


def test_jbond_loss_value_and_gradients_by_hand():
    beta, gamma = 0.3, 0.2
    inputs = jbond_case()
    loss, metrics = jbond_loss(**inputs, beta=beta, gamma=gamma)

    policy = [-1.5, -0.2]  # ℓ(y)
    best = [-0.1, -0.9]  # ℓ(y_bo2)
    log_ratio = [-1.5 - (-1.2), -0.2 - (-0.4)]  # ℓ − a = [−0.3, 0.2]
    r_j = [-LOG16, 0.0]  # sample 0 is worse than both anchors, sample 1 is not
    returns = [r_j[i] - log_ratio[i] for i in range(2)]
    advantages = [returns[0] - returns[1], returns[1] - returns[0]]  # leave-one-out of two
    per_sample = [
        (1 - beta) * -best[i] + beta * -advantages[i] * policy[i] + gamma * log_ratio[i] * policy[i] for i in range(2)
    ]
    assert loss.item() == pytest.approx(sum(per_sample) / 2, abs=1e-12)
    assert metrics["frac_worse_than_both"].item() == 0.5
    assert metrics["kl_anchor"].item() == pytest.approx(sum(log_ratio) / 2)
    assert metrics["jbond_reward"].item() == pytest.approx(-LOG16 / 2)

    loss.backward()
    # Per-sequence weights differ between sequences, and padding gets none.
    weight = [(beta * -advantages[i] + gamma * log_ratio[i]) / 2 for i in range(2)]
    torch.testing.assert_close(inputs["policy_logps"].grad, t([[weight[0], weight[0]], [weight[1], 0.0]]))
    sft = -(1 - beta) / 2
    torch.testing.assert_close(inputs["best_anchor_logps"].grad, t([[sft, 0.0], [sft, sft]]))
    assert inputs["anchor_logps"].grad is None  # the anchor is never trained


def test_jbond_loss_batch_of_one_has_no_baseline():
    inputs = {key: value[:1] for key, value in jbond_case().items()}
    loss, metrics = jbond_loss(**inputs, beta=1.0, gamma=0.0)
    returns = -LOG16 - (-0.3)
    assert loss.item() == pytest.approx(-returns * -1.5)
    assert metrics["return_mean"].item() == pytest.approx(returns)


def test_jbond_loss_beta_zero_is_sft_on_best_anchor():
    loss, _ = jbond_loss(**jbond_case(), beta=0.0)
    assert loss.item() == pytest.approx((0.1 + 0.9) / 2)


def test_jbond_loss_gamma_term_is_kl_gradient_sign():
    """loss(γ=1) − loss(γ=0) on the same samples = mean(sg(ℓ − a)·ℓ): its gradient is
    +(ℓ − a)·∇ℓ / B, the gradient of KL(π ‖ π_anc), not Algorithm 2's printed −(ℓ − a)·∇ℓ."""
    inputs = jbond_case()
    gamma_term = jbond_loss(**inputs, beta=0.5, gamma=1.0)[0] - jbond_loss(**inputs, beta=0.5, gamma=0.0)[0]
    (policy_grad,) = torch.autograd.grad(gamma_term, inputs["policy_logps"])
    log_ratio = [-0.3, 0.2]
    torch.testing.assert_close(policy_grad, t([[log_ratio[0] / 2] * 2, [log_ratio[1] / 2, 0.0]]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=1.5), r"beta must lie in \[0, 1\], got 1.5"),
        (dict(gamma=-1.0), "gamma must be >= 0, got -1.0"),
        (dict(rewards=torch.zeros(3)), r"rewards must have 1 dims with batch 2, got shape \(3,\)"),
        (dict(anchor_rewards=torch.zeros(2)), r"anchor_rewards must be \[2, 2\], got shape \(2,\)"),
    ],
)
def test_jbond_loss_errors(kwargs, message):
    loss_kwargs = {key: kwargs.pop(key) for key in ("beta", "gamma") if key in kwargs}
    with pytest.raises(ValueError, match=message):
        jbond_loss(**jbond_case(**kwargs), **loss_kwargs)


# ------------------------------------------------------------- BOND, vBoN


def bond_case(batch=3, length=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    policy = torch.randn(batch, length, generator=generator, dtype=F64).requires_grad_(True)
    best = torch.randn(batch, length, generator=generator, dtype=F64).requires_grad_(True)
    ref = torch.randn(batch, length, generator=generator, dtype=F64)
    masks = torch.rand(batch, length, generator=generator) < 0.8
    masks[:, 0] = True
    rewards = torch.randn(batch, generator=generator, dtype=F64)
    ref_rewards = torch.randn(batch, 16, generator=generator, dtype=F64)
    return policy, masks, best, masks.clone(), ref, rewards, ref_rewards


def test_bond_loss_by_hand():
    n, beta = 4, 0.25
    policy, policy_mask, best, best_mask, ref, _, _ = bond_case(batch=2)
    bond_rewards = t([-0.7, -0.1])
    loss, metrics = bond_loss(policy, policy_mask, best, best_mask, ref, None, None, n=n, beta=beta, bond_rewards=bond_rewards)
    seq = sequence_logps(policy, policy_mask).detach()
    best_seq = sequence_logps(best, best_mask).detach()
    log_ratio = seq - sequence_logps(ref, policy_mask)
    returns = (n - 1) * bond_rewards - log_ratio
    advantages = returns - returns.flip(0)
    expected = ((1 - beta) * -best_seq + beta * -advantages * seq).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert metrics["log_quantile"].item() == pytest.approx(-0.4)


def test_bond_loss_default_quantiles_are_smoothed_mc():
    policy, policy_mask, best, best_mask, ref, rewards, ref_rewards = bond_case()
    rewards[0] = -100.0  # below all 16 references
    mc, _ = bond_loss(policy, policy_mask, best, best_mask, ref, rewards, ref_rewards, n=8)
    log_q = torch.log(mc_quantile(rewards, ref_rewards, smoothing="self"))
    given, _ = bond_loss(policy, policy_mask, best, best_mask, ref, None, None, n=8, bond_rewards=log_q)
    assert math.isfinite(mc.item())
    assert mc.item() == pytest.approx(given.item())
    # Unsmoothed, log p̂≤ = −inf for that sample, and the baseline spreads it to the batch.
    raw, _ = bond_loss(policy, policy_mask, best, best_mask, ref, rewards, ref_rewards, n=8, smoothing="none")
    assert not math.isfinite(raw.item())


@pytest.mark.parametrize("n", [2, 4, 16])
def test_vbon_gradient_is_bond_backward_gradient_over_n_minus_1(n):
    """SPEC §6: vBoN is BOND with β = 1 and a fixed π_ref, on a 1/(N−1) scale — baseline included."""
    policy, policy_mask, best, best_mask, ref, rewards, ref_rewards = bond_case(batch=5, seed=n)
    log_cdf = torch.log(mc_quantile(rewards, ref_rewards))
    bond, _ = bond_loss(policy, policy_mask, best, best_mask, ref, None, None, n=n, beta=1.0, bond_rewards=log_cdf)
    (bond_grad,) = torch.autograd.grad(bond, policy)
    vbon, _ = vbon_loss(policy, policy_mask, ref, None, None, n=n, log_cdf=log_cdf)
    (vbon_grad,) = torch.autograd.grad(vbon, policy)
    torch.testing.assert_close(vbon_grad, bond_grad / (n - 1))
    # The same through the Monte-Carlo path.
    bond, _ = bond_loss(policy, policy_mask, best, best_mask, ref, rewards, ref_rewards, n=n, beta=1.0)
    vbon, _ = vbon_loss(policy, policy_mask, ref, rewards, ref_rewards, n=n)
    torch.testing.assert_close(torch.autograd.grad(vbon, policy)[0], torch.autograd.grad(bond, policy)[0] / (n - 1))


def test_bond_and_vbon_errors():
    policy, policy_mask, best, best_mask, ref, rewards, ref_rewards = bond_case()
    with pytest.raises(ValueError, match="bond_loss needs rewards and ref_rewards, or bond_rewards"):
        bond_loss(policy, policy_mask, best, best_mask, ref, rewards, None, n=4)
    with pytest.raises(ValueError, match="vbon_loss needs rewards and ref_rewards, or log_cdf"):
        vbon_loss(policy, policy_mask, ref, None, ref_rewards, n=4)
    with pytest.raises(ValueError, match="N must be an integer >= 2"):
        bond_loss(policy, policy_mask, best, best_mask, ref, rewards, ref_rewards, n=1)
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\], got -0.1"):
        bond_loss(policy, policy_mask, best, best_mask, ref, rewards, ref_rewards, n=4, beta=-0.1)
    with pytest.raises(ValueError, match=r"ref_rewards must have 2 dims with batch 3, got shape \(3,\)"):
        bond_loss(policy, policy_mask, best, best_mask, ref, rewards, ref_rewards[:, 0], n=4)
    with pytest.raises(ValueError, match=r"bond_rewards must have 1 dims with batch 3, got shape \(2,\)"):
        bond_loss(policy, policy_mask, best, best_mask, ref, None, None, n=4, bond_rewards=torch.zeros(2))
    with pytest.raises(ValueError, match=r"log_cdf must have 1 dims with batch 3"):
        vbon_loss(policy, policy_mask, ref, None, None, n=4, log_cdf=torch.zeros(3, 1))


# ------------------------------------------------------------------- RLOO


def test_rloo_loss_by_hand():
    beta_rl = 0.1
    policy = t([[[-1.0, -0.5], [-2.0, 0.0]]], grad=True)  # [B=1, S=2, T=2]
    policy_mask = mask([[[1, 1], [1, 0]]])
    ref = t([[[-0.8, -0.8], [-1.0, 5.0]]])
    rewards = t([[1.0, 3.0]])
    loss, metrics = rloo_loss(policy, policy_mask, ref, rewards, beta_rl=beta_rl)
    seq = [-1.5, -2.0]
    log_ratio = [-1.5 + 1.6, -2.0 + 1.0]  # [0.1, −1.0]
    returns = [1.0 - beta_rl * log_ratio[0], 3.0 - beta_rl * log_ratio[1]]
    advantages = [returns[0] - returns[1], returns[1] - returns[0]]
    assert loss.item() == pytest.approx(-(advantages[0] * seq[0] + advantages[1] * seq[1]) / 2)
    assert metrics["reward"].item() == pytest.approx(2.0)
    loss.backward()
    torch.testing.assert_close(policy.grad, t([[[-advantages[0] / 2] * 2, [-advantages[1] / 2, 0.0]]]))


def test_rloo_loss_errors():
    with pytest.raises(ValueError, match="rloo_loss needs at least 2 samples per prompt"):
        rloo_loss(torch.zeros(2, 1, 3), torch.ones(2, 1, 3), torch.zeros(2, 1, 3), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"expected policy_logps \[B, S, T\] and rewards \[B, S\]"):
        rloo_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="beta_rl must be >= 0, got -1"):
        rloo_loss(torch.zeros(1, 2, 3), torch.ones(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2), beta_rl=-1)


# ----------------------------------------------------------------- BoNBoN


def test_bonbon_loss_by_hand():
    n, alpha = 8, 0.005
    chosen = t([[-1.0, -1.0, -1.0]], grad=True)
    chosen_mask = mask([[1, 1, 0]])
    rejected = t([[-3.0, -0.5, -0.5]], grad=True)
    rejected_mask = mask([[1, 1, 1]])
    ref_chosen = t([[-1.5, -1.5, 9.0]])
    ref_rejected = t([[-1.0, -1.0, -1.0]])
    loss, metrics = bonbon_loss(chosen, chosen_mask, rejected, rejected_mask, ref_chosen, ref_rejected, n=n, alpha=alpha)
    h = (-2.0 - -3.0) - (-4.0 - -3.0)  # 1 − (−1) = 2
    target = 1 / (2 * bonbon_beta(n))  # ≈ 18.15
    assert target == pytest.approx(1 / (2 * 0.027548), rel=1e-4)
    assert loss.item() == pytest.approx(alpha * 2.0 + (1 - alpha) * (h - target) ** 2)
    assert metrics["margin"].item() == pytest.approx(h)
    loss.backward()
    d_margin = 2 * (1 - alpha) * (h - target)
    torch.testing.assert_close(chosen.grad, t([[-alpha + d_margin, -alpha + d_margin, 0.0]]))
    torch.testing.assert_close(rejected.grad, t([[-d_margin] * 3]))


def test_bonbon_loss_alpha_range():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 2"):
        bonbon_loss(z, torch.ones(1, 2), z, torch.ones(1, 2), z, z, alpha=2)


# ---------------------------------------------------------------- a batch split over ranks


@pytest.mark.parametrize("name", ["bond", "vbon"])
def test_batch_baseline_over_two_shares_equals_the_whole_batch(name):
    """Each share sums its returns with the other's through `batch_sum` (what an all-reduce over
    ranks does): size-weighted losses and share-scaled gradients add up to the whole batch's."""
    from fastbond.losses import bond_returns, vbon_returns

    generator = torch.Generator().manual_seed(3)
    batch, length, k, n = 5, 4, 6, 4
    policy = (-torch.rand(batch, length, generator=generator, dtype=F64)).requires_grad_()
    best = (-torch.rand(batch, length, generator=generator, dtype=F64)).requires_grad_()
    ref = -torch.rand(batch, length, generator=generator, dtype=F64)
    masks = torch.rand(batch, length, generator=generator) < 0.8
    rewards = torch.randn(batch, generator=generator, dtype=F64)
    ref_rewards = torch.randn(batch, k, generator=generator, dtype=F64)

    def loss_of(rows, **baseline):
        if name == "bond":
            return bond_loss(policy[rows], masks[rows], best[rows], masks[rows], ref[rows], rewards[rows],
                             ref_rewards[rows], n=n, **baseline)[0]
        return vbon_loss(policy[rows], masks[rows], ref[rows], rewards[rows], ref_rewards[rows], n=n, **baseline)[0]

    returns_of = bond_returns if name == "bond" else vbon_returns
    returns = returns_of(sequence_logps(policy, masks), sequence_logps(ref, masks),
                         torch.log(mc_quantile(rewards, ref_rewards)), n=n)
    shares = (slice(0, 2), slice(2, batch))
    local = [torch.stack([returns[rows].sum(), torch.tensor(float(rows.stop - rows.start), dtype=F64)])
             for rows in shares]
    whole_sums = sum(local)
    whole = loss_of(slice(0, batch))
    split = [loss_of(rows, batch_sum=lambda mine, own=own: mine + (whole_sums - own)) * (rows.stop - rows.start) / batch
             for rows, own in zip(shares, local)]
    torch.testing.assert_close(sum(split), whole)
    grads = torch.autograd.grad(whole, [policy] + ([best] if name == "bond" else []))
    split_grads = torch.autograd.grad(sum(split), [policy] + ([best] if name == "bond" else []))
    for got, want in zip(split_grads, grads):
        torch.testing.assert_close(got, want)
    # without batch_sum the baseline is the share's own: a different gradient
    own = torch.autograd.grad(loss_of(slice(0, 2)) * 2 / batch + loss_of(slice(2, batch)) * 3 / batch, [policy])[0]
    assert not torch.allclose(own, grads[0])
