"""Unit tests of fastbond.bon (SPEC §1-§6) on small hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from fastbond.bon import (
    JBOND_PENALTY,
    best_of_n_index,
    bon_distribution,
    bon_kl_bound,
    bonbon_beta,
    bond_beta,
    bond_reward,
    jbond_reward,
    kl_divergence,
    mc_quantile,
    reward_quantiles,
)

F64 = torch.float64


def t(*values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


# ------------------------------------------------------------- reward_quantiles


def test_reward_quantiles_by_hand_with_ties():
    probs = t(0.1, 0.2, 0.3, 0.4)
    rewards = t(3.0, 1.0, 3.0, 2.0)
    p_lt, p_le = reward_quantiles(probs, rewards)
    # levels: r=1 {0.2}, r=2 {0.4}, r=3 {0.1, 0.3}
    torch.testing.assert_close(p_lt, t(0.6, 0.0, 0.6, 0.2))
    torch.testing.assert_close(p_le, t(1.0, 0.2, 1.0, 0.6))


def test_reward_quantiles_batched_rows_are_independent():
    probs = torch.softmax(torch.randn(3, 5, 7, dtype=F64), -1)
    rewards = torch.randint(0, 4, (3, 5, 7)).to(F64)
    p_lt, p_le = reward_quantiles(probs, rewards)
    for i in range(3):
        for j in range(5):
            row_lt, row_le = reward_quantiles(probs[i, j], rewards[i, j])
            torch.testing.assert_close(p_lt[i, j], row_lt)
            torch.testing.assert_close(p_le[i, j], row_le)
    # p≤ − p< is the mass of the outcome's own level.
    same_level = rewards.unsqueeze(-1) == rewards.unsqueeze(-2)
    torch.testing.assert_close(p_le - p_lt, (probs.unsqueeze(-2) * same_level).sum(-1))


def test_reward_quantiles_integer_rewards():
    p_lt, p_le = reward_quantiles(t(0.5, 0.5), torch.tensor([7, 3]))
    torch.testing.assert_close(p_lt, t(0.5, 0.0))
    torch.testing.assert_close(p_le, t(1.0, 0.5))


def test_reward_quantiles_shape_mismatch():
    with pytest.raises(ValueError, match=r"ref_probs \(3,\) and rewards \(4,\) differ in shape"):
        reward_quantiles(torch.ones(3) / 3, torch.zeros(4))


# ------------------------------------------------------------- bon_distribution


def test_bon_distribution_by_hand_distinct():
    # N = 2, distinct rewards: π_BoN = p≤² − p<².
    probs, rewards = t(0.5, 0.3, 0.2), t(1.0, 2.0, 3.0)
    torch.testing.assert_close(bon_distribution(probs, rewards, 2), t(0.25, 0.64 - 0.25, 1.0 - 0.64))


def test_bon_distribution_by_hand_ties():
    # Outcomes 0 and 1 share the bottom level (mass 0.8): BoN_2 gives the level
    # 0.8² = 0.64 and splits it in proportion to π: 0.4 and 0.24.
    probs, rewards = t(0.5, 0.3, 0.2), t(1.0, 1.0, 3.0)
    torch.testing.assert_close(bon_distribution(probs, rewards, 2), t(0.4, 0.24, 0.36))


def test_bon_distribution_matches_theorem_1_for_distinct_rewards():
    probs = torch.softmax(torch.randn(2, 9, dtype=F64), -1)
    rewards = torch.randn(2, 9, dtype=F64)
    p_lt, p_le = reward_quantiles(probs, rewards)
    for n in (1, 2, 5, 16):
        ratio = p_lt / p_le
        correction = sum(ratio**i for i in range(n))  # (B) of Theorem 1, in [1, N]
        assert (correction >= 1 - 1e-12).all() and (correction <= n + 1e-12).all()
        theorem_1 = probs * p_le ** (n - 1) * correction
        torch.testing.assert_close(bon_distribution(probs, rewards, n), theorem_1)


def test_bon_distribution_level_set_form_and_normalization():
    probs = torch.softmax(torch.randn(11, dtype=F64), -1)
    rewards = torch.randint(0, 4, (11,)).to(F64)
    p_lt, p_le = reward_quantiles(probs, rewards)
    for n in (1, 3, 8):
        bon = bon_distribution(probs, rewards, n)
        torch.testing.assert_close(bon, probs / (p_le - p_lt) * (p_le**n - p_lt**n))
        assert bon.sum().item() == pytest.approx(1.0, abs=1e-14)
    torch.testing.assert_close(bon_distribution(probs, rewards, 1), probs)


def test_bon_distribution_tiny_level_is_accurate_and_zero_mass_stays_zero():
    # The level-set quotient (p≤^N − p<^N)/(p≤ − p<) cancels catastrophically
    # for a level of mass 1e-13; the summed form must not.
    tiny = 1e-13
    probs = t(0.5 - tiny, tiny, 0.0, 0.5)
    rewards = t(1.0, 2.0, 3.0, 4.0)
    bon = bon_distribution(probs, rewards, 3)
    # p< = p≤ ≈ 1/2 at the tiny level: π_BoN ≈ 3 · tiny · (1/2)²
    assert bon[1].item() == pytest.approx(3 * tiny * 0.25, rel=1e-9)
    assert bon[2].item() == 0.0
    assert torch.isfinite(bon).all()


@pytest.mark.parametrize("n", [0, -1, 2.5])
def test_bon_distribution_rejects_bad_n(n):
    with pytest.raises(ValueError, match="N must be an integer >= 1"):
        bon_distribution(t(0.5, 0.5), t(0.0, 1.0), n)


# ------------------------------------------------------------------ bond_reward


def test_bond_reward_without_correction_is_log_quantile():
    p_lt, p_le = t(0.0, 0.2, 0.6), t(0.2, 0.6, 1.0)
    torch.testing.assert_close(bond_reward(p_lt, p_le, 4, correction=False), p_le.log())


def test_bond_reward_correction_range():
    probs = torch.softmax(torch.randn(50, dtype=F64), -1)
    p_lt, p_le = reward_quantiles(probs, torch.randn(50, dtype=F64))
    for n in (2, 4, 16):
        term = bond_reward(p_lt, p_le, n) - bond_reward(p_lt, p_le, n, correction=False)
        assert (term >= 0).all()
        assert (term <= math.log(n) / (n - 1) + 1e-12).all()
    # The lowest outcome has p< = 0: no correction.
    lowest = torch.argmin(p_lt)
    assert term[lowest].item() == 0.0


@pytest.mark.parametrize("levels", [0, 3])
def test_bond_reward_tilts_ref_into_bon(levels):
    """π_BoN ∝ π_ref · exp(r_BOND / β_BOND) (SPEC §2), with ties too."""
    probs = torch.softmax(torch.randn(20, dtype=F64), -1)
    rewards = torch.randint(0, levels, (20,)).to(F64) if levels else torch.randn(20, dtype=F64)
    p_lt, p_le = reward_quantiles(probs, rewards)
    n = 6
    tilted = probs * torch.exp(bond_reward(p_lt, p_le, n) / bond_beta(n))
    torch.testing.assert_close(tilted / tilted.sum(), bon_distribution(probs, rewards, n))


def test_bond_reward_and_beta_reject_n_below_2():
    with pytest.raises(ValueError, match="N must be an integer >= 2"):
        bond_reward(t(0.0), t(1.0), 1)
    with pytest.raises(ValueError, match="N must be an integer >= 2"):
        bond_beta(1)
    assert bond_beta(8) == pytest.approx(1 / 7)


# ------------------------------------------------------------------ mc_quantile


def test_mc_quantile_by_hand():
    refs = t(1.0, 2.0, 3.0, 4.0).unsqueeze(0)  # [1, k=4]
    sample = t(2.0)  # two refs ≤ it, one strictly below
    assert mc_quantile(sample, refs).item() == pytest.approx(3 / 5)  # (1 + 2) / (k + 1)
    assert mc_quantile(sample, refs, smoothing="none").item() == pytest.approx(2 / 4)
    assert mc_quantile(sample, refs, strict=True).item() == pytest.approx(1 / 5)
    assert mc_quantile(sample, refs, smoothing="none", strict=True).item() == pytest.approx(1 / 4)


def test_mc_quantile_smoothing_keeps_log_finite():
    refs = torch.arange(16, dtype=F64).unsqueeze(0) + 10.0
    below_all = t(0.0)
    assert mc_quantile(below_all, refs, smoothing="none").item() == 0.0
    assert torch.log(mc_quantile(below_all, refs, smoothing="none")).item() == -math.inf
    assert mc_quantile(below_all, refs).item() == pytest.approx(1 / 17)
    above_all = t(100.0)
    assert mc_quantile(above_all, refs).item() == 1.0
    assert mc_quantile(above_all, refs, smoothing="none").item() == 1.0


def test_mc_quantile_trailing_shape_and_dtype():
    refs = torch.randn(3, 8)
    samples = torch.randn(3, 5, 2)
    est = mc_quantile(samples, refs)
    assert est.shape == (3, 5, 2) and est.dtype == torch.float32
    expected = ((refs[:, None, None, :] <= samples[..., None]).sum(-1) + 1) / 9
    torch.testing.assert_close(est, expected.float())
    assert mc_quantile(samples.double(), refs).dtype == F64
    assert mc_quantile(torch.tensor([1, 2]), torch.tensor([[0, 1], [5, 6]])).dtype == torch.float32


def test_mc_quantile_unsmoothed_is_unbiased():
    probs = t(0.1, 0.3, 0.2, 0.4)
    rewards = t(0.0, 1.0, 2.0, 3.0)
    _, p_le = reward_quantiles(probs, rewards)
    generator = torch.Generator().manual_seed(0)
    draws = 40_000
    refs = rewards[torch.multinomial(probs, draws * 8, replacement=True, generator=generator)].reshape(draws, 8)
    est = mc_quantile(rewards.expand(draws, 4), refs, smoothing="none").mean(0)
    # std of a mean of 40k frequencies of 8 draws ≤ 0.5 / sqrt(320k) < 1e-3
    torch.testing.assert_close(est, p_le, atol=5e-3, rtol=0)


def test_mc_quantile_errors():
    with pytest.raises(ValueError, match=r"expected sample_rewards \[B, \.\.\.\] and ref_rewards \[B, k\]"):
        mc_quantile(torch.zeros(3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="ref_rewards"):
        mc_quantile(torch.zeros(2), torch.zeros(2, 4, 1))
    with pytest.raises(ValueError, match="unknown smoothing 'laplace'"):
        mc_quantile(torch.zeros(2), torch.zeros(2, 4), smoothing="laplace")


# ----------------------------------------------------------------- jbond_reward


def test_jbond_reward_by_hand_with_ties():
    reward = t(0.0, 1.0, 2.0, 1.0, 5.0)
    anchors = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [3.0, 3.0], [1.0, 9.0]], dtype=F64)
    # Penalized only when strictly worse than both: a tie with the worse anchor is not.
    expected = t(JBOND_PENALTY, 0.0, 0.0, JBOND_PENALTY, 0.0)
    torch.testing.assert_close(jbond_reward(reward, anchors), expected)
    assert JBOND_PENALTY == pytest.approx(-math.log(16))
    assert JBOND_PENALTY / 4 == pytest.approx(math.log(0.5))


def test_jbond_reward_dtype():
    assert jbond_reward(torch.tensor([0, 3]), torch.tensor([[1, 2], [1, 2]])).dtype == torch.float32
    assert jbond_reward(torch.zeros(2, dtype=torch.bfloat16), torch.ones(2, 2)).dtype == torch.bfloat16


def test_jbond_reward_shape_errors():
    with pytest.raises(ValueError, match=r"expected reward \[B\] and anchor_rewards \[B, 2\]"):
        jbond_reward(torch.zeros(3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"got \(3,\) and \(2, 2\)"):
        jbond_reward(torch.zeros(3), torch.zeros(2, 2))


# --------------------------------------------------------------- small helpers


def test_best_of_n_index_picks_the_first_maximum():
    rewards = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 2.0, 5.0]])
    assert best_of_n_index(rewards).tolist() == [1, 0, 3]


def test_bonbon_beta():
    assert bonbon_beta(2) == pytest.approx(0.5)  # 1 / (2 · 1 · H_1)
    assert bonbon_beta(3) == pytest.approx(1 / (2 * 2 * 1.5))
    assert bonbon_beta(8) == pytest.approx(0.02755, abs=5e-6)
    with pytest.raises(ValueError, match="N must be an integer >= 2"):
        bonbon_beta(1)


def test_bon_kl_bound():
    assert bon_kl_bound(1) == 0.0
    assert bon_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl_bound(16) == pytest.approx(math.log(16) - 15 / 16)


def test_bon_kl_equals_bound_in_the_continuum_limit():
    """Uniform π over many distinct rewards approximates a continuous reward."""
    k, n = 20_000, 4
    probs = torch.full((k,), 1.0 / k, dtype=F64)
    bon = bon_distribution(probs, torch.arange(k, dtype=F64), n)
    assert kl_divergence(bon, probs).item() == pytest.approx(bon_kl_bound(n), abs=1e-3)


def test_kl_divergence_by_hand_and_edge_cases():
    p, q = t(0.5, 0.5, 0.0), t(0.25, 0.25, 0.5)
    assert kl_divergence(p, q).item() == pytest.approx(math.log(2))  # zero p terms contribute 0
    assert kl_divergence(q, p).item() == math.inf  # q > 0 where p = 0
    assert kl_divergence(p, p).item() == 0.0
    rows = torch.softmax(torch.randn(4, 6, dtype=F64), -1)
    assert kl_divergence(rows, rows.flip(0)).shape == (4,)
    assert (kl_divergence(rows, rows.flip(0)) >= 0).all()


def test_kl_divergence_gradient_is_finite_where_p_is_zero():
    p = torch.tensor([0.0, 0.25, 0.75], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    value = kl_divergence(p, q)
    value.backward()
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert math.isclose(value.detach().item(), expected, rel_tol=1e-12)
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    assert q.grad[0] == 0
