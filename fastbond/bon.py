"""Best-of-N theory: the exact BoN distribution, reward quantiles, BOND rewards.

Everything here follows SPEC §1-§6. Functions take tensors and return tensors,
are exact in float64, and batch over any leading dimensions: the outcome (or
sample) axis is always the last one.

Only the *order* of rewards matters for every quantity below, so rewards may be
of any real dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "reward_quantiles",
    "bon_distribution",
    "bond_reward",
    "bond_beta",
    "mc_quantile",
    "jbond_reward",
    "JBOND_PENALTY",
    "best_of_n_index",
    "bonbon_beta",
    "bon_kl_bound",
    "kl_divergence",
]

# r_J of a sample worse than both anchor samples (SPEC §5): −log 16, so that
# E[r_J] = −log 16 · (1 − p≤)² equals log p≤ at the median p≤ = 1/2.
JBOND_PENALTY = -math.log(16.0)


def _check_n(n: int, minimum: int = 1) -> int:
    if int(n) != n or n < minimum:
        raise ValueError(f"N must be an integer >= {minimum}, got {n!r}")
    return int(n)


def reward_quantiles(ref_probs: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p<, p≤) of each outcome: the π-mass of outcomes with a strictly lower /
    lower-or-equal reward.

    Args:
        ref_probs: [..., K] probabilities of K outcomes (rows sum to 1).
        rewards:   [..., K] their rewards.
    Returns:
        p_lt, p_le: [..., K] in the dtype of `ref_probs`.

    O(K log K): sort the rewards once, prefix-sum the probabilities, and look
    each reward's level up with a left / right binary search, so ties land
    exactly on their level's boundaries.
    """
    if ref_probs.shape != rewards.shape:
        raise ValueError(f"ref_probs {tuple(ref_probs.shape)} and rewards {tuple(rewards.shape)} differ in shape")
    sorted_rewards, order = torch.sort(rewards, dim=-1)
    cumulative = torch.cumsum(torch.gather(ref_probs, -1, order), dim=-1)
    cumulative = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative], dim=-1)  # [..., K+1]
    sorted_rewards = sorted_rewards.contiguous()
    query = rewards.contiguous()
    below = torch.searchsorted(sorted_rewards, query, right=False)
    at_or_below = torch.searchsorted(sorted_rewards, query, right=True)
    return torch.gather(cumulative, -1, below), torch.gather(cumulative, -1, at_or_below)


def _geometric_sum(p_le: torch.Tensor, p_lt: torch.Tensor, n: int) -> torch.Tensor:
    """Σ_{i=0..n−1} p≤^(n−1−i) · p<^i  =  (p≤^n − p<^n) / (p≤ − p<).

    The sum form avoids the cancellation of the quotient when a reward level
    holds little mass (p≤ ≈ p<), and is well defined when it holds none.
    """
    total = torch.ones_like(p_le)
    p_lt_power = torch.ones_like(p_lt)
    for _ in range(n - 1):
        p_lt_power = p_lt_power * p_lt
        total = total * p_le + p_lt_power
    return total


def bon_distribution(ref_probs: torch.Tensor, rewards: torch.Tensor, n: int) -> torch.Tensor:
    """π_BoN over a finite outcome set, exact with ties (SPEC §1, level-set form).

        π_BoN(y) = π(y) / π(level of y) · (p≤(y)^N − p<(y)^N)

    Best-of-N returns the *first* maximal of N i.i.d. draws, so among outcomes
    of equal reward it picks in proportion to π. With distinct rewards this is
    Theorem 1 of BOND: π(y) · p≤^(N−1) · Σ_i (p</p≤)^(i−1).

    Args:
        ref_probs: [..., K] the base distribution π (the paper's π_ref).
        rewards:   [..., K] rewards of the K outcomes.
        n:         N ≥ 1.
    Returns:
        [..., K] probabilities under BoN_N(π).
    """
    n = _check_n(n)
    p_lt, p_le = reward_quantiles(ref_probs, rewards)
    return ref_probs * _geometric_sum(p_le, p_lt, n)


def bond_reward(p_lt: torch.Tensor, p_le: torch.Tensor, n: int, correction: bool = True) -> torch.Tensor:
    """r_BOND of SPEC §2, the reward whose KL-regularized optimum is π_BoN:

        r_BOND = log p≤ + 1/(N−1) · log Σ_{i=1..N} (p</p≤)^(i−1)

    With `correction=False` only log p≤ is kept, as in practice; the dropped
    term lies in [0, log N / (N−1)].
    """
    n = _check_n(n, minimum=2)
    reward = torch.log(p_le)
    if correction:
        ratio = torch.where(p_le > 0, p_lt / p_le, torch.zeros_like(p_le))
        reward = reward + torch.log(_geometric_sum(torch.ones_like(ratio), ratio, n)) / (n - 1)
    return reward


def bond_beta(n: int) -> float:
    """β_BOND = 1/(N−1): the KL-regularization strength under which π_BoN is optimal."""
    return 1.0 / (_check_n(n, minimum=2) - 1)


def mc_quantile(
    sample_rewards: torch.Tensor,
    ref_rewards: torch.Tensor,
    smoothing: str = "self",
    strict: bool = False,
) -> torch.Tensor:
    """Monte-Carlo estimate of p≤ (or p< with `strict=True`) from k reference samples (SPEC §3).

    Args:
        sample_rewards: [B, *S] rewards of the samples to rank (any trailing shape).
        ref_rewards:    [B, k] rewards of k samples of π_ref for the same prompt.
        smoothing:
            "self" (default): count each sample against itself too,
                p̂≤ = (1 + #{j: r'_j ≤ r}) / (k + 1),   p̂< = #{j: r'_j < r} / (k + 1).
                This is the rank of r among k+1 i.i.d. draws when r ~ π_ref, so
                p̂≤ ∈ [1/(k+1), 1] and log p̂≤ is always finite.
            "none": the raw frequency #{j: r'_j ≤ r} / k, which is 0 (log = −∞)
                for a sample below all k references.
        strict: estimate p< (strictly worse references) instead of p≤.
    Returns:
        [B, *S] estimates in float32 (float64 if the rewards are float64).
    """
    if ref_rewards.dim() != 2 or sample_rewards.dim() < 1 or sample_rewards.shape[0] != ref_rewards.shape[0]:
        raise ValueError(
            f"expected sample_rewards [B, ...] and ref_rewards [B, k], got "
            f"{tuple(sample_rewards.shape)} and {tuple(ref_rewards.shape)}"
        )
    k = ref_rewards.shape[1]
    refs = ref_rewards.reshape(ref_rewards.shape[0], *([1] * (sample_rewards.dim() - 1)), k)
    samples = sample_rewards.unsqueeze(-1)
    below = refs < samples if strict else refs <= samples
    dtype = torch.float64 if torch.float64 in (sample_rewards.dtype, ref_rewards.dtype) else torch.float32
    count = below.sum(-1).to(dtype)
    if smoothing == "self":
        return (count + (0.0 if strict else 1.0)) / (k + 1)
    if smoothing == "none":
        return count / k
    raise ValueError(f"unknown smoothing {smoothing!r}: use 'self' or 'none'")


def jbond_reward(reward: torch.Tensor, anchor_rewards: torch.Tensor) -> torch.Tensor:
    """r_J of SPEC §5: −log 16 where the sample is worse than *both* anchor samples, else 0.

    Args:
        reward:         [B] reward of the policy sample.
        anchor_rewards: [B, 2] rewards of the two anchor samples.
    Returns:
        [B] float tensor (the dtype of `reward` when floating, else float32).
    """
    if anchor_rewards.dim() != 2 or anchor_rewards.shape[1] != 2 or anchor_rewards.shape[0] != reward.shape[0]:
        raise ValueError(
            f"expected reward [B] and anchor_rewards [B, 2], got {tuple(reward.shape)} and {tuple(anchor_rewards.shape)}"
        )
    worse_than_both = reward < anchor_rewards.min(dim=-1).values
    dtype = reward.dtype if reward.is_floating_point() else torch.float32
    return worse_than_both.to(dtype) * JBOND_PENALTY


def best_of_n_index(rewards: torch.Tensor) -> torch.Tensor:
    """Index of the Best-of-N pick along the last axis: the *first* maximal reward.

    torch.argmax is documented to return the first maximal index, which is the
    tie rule every BoN formula here assumes.
    """
    return torch.argmax(rewards, dim=-1)


def bonbon_beta(n: int) -> float:
    """β*_n = 1 / (2 (n−1) H_{n−1}) of BoNBoN (Gui et al.), H_m the m-th harmonic number."""
    n = _check_n(n, minimum=2)
    harmonic = sum(1.0 / k for k in range(1, n))
    return 1.0 / (2.0 * (n - 1) * harmonic)


def bon_kl_bound(n: int) -> float:
    """KL(π_BoN ‖ π) ≤ log N − (N−1)/N, with equality for continuous rewards."""
    n = _check_n(n)
    return math.log(n) - (n - 1) / n


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ p log(p/q) over the last axis of two finite distributions.

    Terms with p = 0 contribute 0; a p > 0 where q = 0 gives +inf.
    """
    # Substituting 1 where p = 0 keeps both the value and the gradient finite
    # there (a bare where() would back-propagate 0 · log 0 = NaN).
    support = p > 0
    safe_p = torch.where(support, p, torch.ones_like(p))
    safe_q = torch.where(support, q, torch.ones_like(q))
    return torch.where(support, p * (torch.log(safe_p) - torch.log(safe_q)), torch.zeros_like(p)).sum(-1)
