"""The Best-of-N curve of π_ref on held-out prompts: reward against KL(BoN_N ‖ π_ref).

Rewards: the unbiased estimate of E[max of N] from m ≥ N π_ref samples per prompt
(`fastbond.evaluate.expected_max_of_n`).

KL, two ways. The bound log N − (N−1)/N (`fastbond.bon.bon_kl_bound`) is the KL when rewards
never tie; a reward with few levels (a lexicon score is an integer) ties often, and then
BoN_N moves less far from π_ref. Since BoN_N(y)/π_ref(y) depends on y only through its reward
level v (SPEC §1),

    KL(BoN_N ‖ π_ref) = Σ_v P_BoN(v) · log[(F(v)^N − F<(v)^N) / (F(v) − F<(v))],
    P_BoN(v) = F(v)^N − F<(v)^N,

with F and F< π_ref's reward CDF (≤ and <) for the prompt. The estimate plugs in the m samples'
empirical CDF: it is `bon_distribution` of the empirical distribution (mass 1/m a sample, ties
exact), compared with it by `kl_divergence`, then averaged over prompts. The plug-in cannot see
reward levels the m samples missed, so it errs low for N near m; it can never exceed log m.
"""

from __future__ import annotations

import math

import torch

from fastbond.bon import bon_distribution, bon_kl_bound, kl_divergence
from fastbond.evaluate import expected_max_of_n

from .points import Z95


def bon_kl_estimate(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """[P] plug-in estimate of KL(BoN_n ‖ π_ref) per prompt from [P, m] i.i.d. π_ref rewards."""
    empirical = torch.full(rewards.shape, 1.0 / rewards.shape[-1], dtype=torch.float64)
    return kl_divergence(bon_distribution(empirical, rewards.double(), n), empirical)


def bon_sizes(samples: int) -> list[int]:
    """N = 1, 2, 4, … up to the π_ref samples per prompt."""
    return [2**i for i in range(int(math.log2(samples)) + 1)]


def bon_curve(rewards: torch.Tensor) -> list[dict]:
    """One row per N: reward (with a 95% interval over prompts), the KL bound and the KL estimate."""
    rows = []
    prompts = rewards.shape[0]
    for n in bon_sizes(rewards.shape[-1]):
        best = expected_max_of_n(rewards, n)
        stderr = float(best.std() / math.sqrt(prompts)) if prompts > 1 else math.nan
        rows.append({"n": n, "reward": float(best.mean()), "reward_ci": Z95 * stderr,
                     "kl_bound": bon_kl_bound(n), "kl_estimate": float(bon_kl_estimate(rewards, n).mean())})
    return rows
