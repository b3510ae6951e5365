"""The BOND family of objectives on token log-probs, in plain PyTorch.

These functions are the oracles the fused kernels are tested against: short,
literal transcriptions of SPEC §5-§6. Each takes padded token log-probs
`[B, T]` with boolean-or-0/1 masks `[B, T]` (a sequence log-prob is the masked
sum over its response tokens) and returns `(loss, metrics)`; `loss` is a
scalar to minimize, `metrics` a dict of detached scalar tensors.

Surrogate losses: every loss below is built so that its *gradient* is the
estimator of the paper (stop-gradients written `sg` in SPEC). Its value is not
the divergence itself; the divergences are reported in the metrics.
"""

from __future__ import annotations

import torch

from fastbond.bon import bond_beta, bonbon_beta, jbond_reward, mc_quantile

__all__ = [
    "sequence_logps",
    "leave_one_out_baseline",
    "jbond_returns",
    "jbond_loss",
    "bond_returns",
    "bond_loss",
    "vbon_returns",
    "vbon_loss",
    "bonbon_loss",
    "rloo_loss",
]


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t mask · log π(y_t | …) over the last axis, in float32 at least.

    `where` rather than multiply: padded positions may hold −inf or NaN (a
    masked-out logit), and 0 · −inf would poison the sum.
    """
    if token_logps.shape != mask.shape:
        raise ValueError(f"log-probs {tuple(token_logps.shape)} and mask {tuple(mask.shape)} differ in shape")
    values = token_logps.float() if token_logps.dtype in (torch.float16, torch.bfloat16) else token_logps
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum(-1)


def leave_one_out_baseline(
    returns: torch.Tensor,
    dim: int = 0,
    total: torch.Tensor | float | None = None,
    count: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """For each element, the mean of the *other* elements along `dim` (0 if alone).

    The baseline of sample i must not depend on sample i, or the policy
    gradient becomes biased; the leave-one-out mean is the cheapest such.

    `total` and `count` (1-D `returns` only) make the baseline one over a
    larger batch this one is a part of: the sum of all its returns and their
    number, e.g. all-reduced over the ranks that each hold a share. By
    default the batch is `returns` itself.
    """
    if total is None:
        total, count = returns.sum(dim=dim, keepdim=True), returns.shape[dim]
    elif count is None or returns.dim() != 1:
        raise ValueError("a batch-wide baseline needs 1-D returns, the batch's total and its count")
    else:
        total = torch.as_tensor(total, dtype=returns.dtype, device=returns.device)
    if int(count) == 1:
        return torch.zeros_like(returns)
    return (total - returns) / (count - 1)


def _baseline(returns: torch.Tensor, baseline_sum, baseline_count) -> torch.Tensor:
    if (baseline_sum is None) != (baseline_count is None):
        raise ValueError("baseline_sum and baseline_count go together")
    return leave_one_out_baseline(returns, total=baseline_sum, count=baseline_count)


def _check_batch(name: str, tensor: torch.Tensor, batch: int, ndim: int = 1) -> None:
    if tensor.dim() != ndim or tensor.shape[0] != batch:
        raise ValueError(f"{name} must have {ndim} dims with batch {batch}, got shape {tuple(tensor.shape)}")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _log_quantiles(loss_name, given_name, given, rewards, ref_rewards, batch: int, smoothing: str) -> torch.Tensor:
    """[B] log p̂≤ of each policy sample among its k reference samples, or the
    caller's own values (`given`: exact or learned quantiles) when passed."""
    if given is None:
        if rewards is None or ref_rewards is None:
            raise ValueError(f"{loss_name} needs rewards and ref_rewards, or {given_name}")
        _check_batch("rewards", rewards, batch)
        _check_batch("ref_rewards", ref_rewards, batch, ndim=2)
        given = torch.log(mc_quantile(rewards, ref_rewards, smoothing=smoothing))
    _check_batch(given_name, given, batch)
    return given


def jbond_returns(
    policy_logps: torch.Tensor,
    policy_mask: torch.Tensor,
    anchor_logps: torch.Tensor,
    rewards: torch.Tensor,
    anchor_rewards: torch.Tensor,
) -> torch.Tensor:
    """[B] J-BOND returns R = r_J(y) − (ℓ − a), detached: what the leave-one-out baseline averages."""
    policy_seq = sequence_logps(policy_logps.detach(), policy_mask)
    log_ratio = policy_seq - sequence_logps(anchor_logps.detach(), policy_mask)
    return jbond_reward(rewards, anchor_rewards).to(log_ratio.dtype) - log_ratio


def jbond_loss(
    policy_logps: torch.Tensor,
    policy_mask: torch.Tensor,
    best_anchor_logps: torch.Tensor,
    best_anchor_mask: torch.Tensor,
    anchor_logps: torch.Tensor,
    rewards: torch.Tensor,
    anchor_rewards: torch.Tensor,
    beta: float = 0.5,
    gamma: float = 0.0,
    baseline_sum: torch.Tensor | float | None = None,
    baseline_count: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """J-BOND surrogate loss, SPEC §5 step 6 (BOND paper, Algorithm 2).

        ℓ = log π_t(y),  a = log π_anc(y),  ℓ₂ = log π_t(y_bo2)
        R = r_J(y) − (ℓ − a),   b = leave-one-out mean of R over the batch
        L = mean[ (1−β)·(−ℓ₂)  +  β·(−sg(R − b)·ℓ)  +  γ·sg(ℓ − a)·ℓ ]

    The γ term is the gradient of KL(π ‖ π_anc) (eq. 19); Algorithm 2 prints it
    with the opposite sign, which would push the policy *away* from the anchor.

    Args:
        policy_logps:      [B, T] log π_t of the policy sample's tokens (with grad).
        policy_mask:       [B, T] its response mask.
        best_anchor_logps: [B, T'] log π_t of the better anchor sample's tokens (with grad).
        best_anchor_mask:  [B, T'] its response mask.
        anchor_logps:      [B, T] log π_anc of the policy sample's tokens (no grad; masked by policy_mask).
        rewards:           [B] reward of the policy sample.
        anchor_rewards:    [B, 2] rewards of the two anchor samples.
        beta:  Jeffreys weight in [0, 1]: 0 = forward KL only, 1 = backward KL only.
        gamma: weight ≥ 0 of the extra KL(π ‖ π_anc) regularizer.
        baseline_sum, baseline_count: when these rows are one rank's share of a
            larger batch, the sum of the returns R over the whole batch and its
            size, so the leave-one-out baseline is the whole batch's (see
            `jbond_returns`). Default: the baseline over these rows.
    """
    _check_unit_interval("beta", beta)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    batch = policy_logps.shape[0]
    _check_batch("rewards", rewards, batch)
    _check_batch("anchor_rewards", anchor_rewards, batch, ndim=2)

    policy_seq = sequence_logps(policy_logps, policy_mask)
    best_anchor_seq = sequence_logps(best_anchor_logps, best_anchor_mask)
    anchor_seq = sequence_logps(anchor_logps.detach(), policy_mask)

    log_ratio = policy_seq.detach() - anchor_seq  # sample estimate of KL(π ‖ π_anc)
    jbond_rewards = jbond_reward(rewards, anchor_rewards).to(log_ratio.dtype)
    returns = jbond_rewards - log_ratio
    advantages = returns - _baseline(returns, baseline_sum, baseline_count)

    forward_term = -best_anchor_seq
    backward_term = -advantages * policy_seq
    anchor_kl_term = log_ratio * policy_seq
    loss = ((1.0 - beta) * forward_term + beta * backward_term + gamma * anchor_kl_term).mean()

    metrics = {
        "loss": loss.detach(),
        "forward_term": forward_term.detach().mean(),
        "backward_term": backward_term.detach().mean(),
        "kl_anchor": log_ratio.mean(),
        "frac_worse_than_both": (jbond_rewards < 0).float().mean(),
        "jbond_reward": jbond_rewards.mean(),
        "return_mean": returns.mean(),
        "advantage_std": advantages.std(unbiased=False),
        "policy_logp": policy_seq.detach().mean(),
        "best_anchor_logp": best_anchor_seq.detach().mean(),
    }
    return loss, metrics


def bond_returns(
    policy_logps: torch.Tensor,
    policy_mask: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    ref_rewards: torch.Tensor,
    n: int,
    smoothing: str = "self",
) -> torch.Tensor:
    """[B] BOND-N returns R = (N−1)·log p̂≤(y) − (ℓ − log π_ref(y)), detached (see `bond_loss`)."""
    log_ratio = sequence_logps(policy_logps.detach(), policy_mask) - sequence_logps(ref_logps.detach(), policy_mask)
    log_quantile = torch.log(mc_quantile(rewards, ref_rewards, smoothing=smoothing))
    return (1.0 / bond_beta(n)) * log_quantile.to(log_ratio.dtype) - log_ratio


def vbon_returns(
    policy_logps: torch.Tensor,
    policy_mask: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    ref_rewards: torch.Tensor,
    n: int,
    smoothing: str = "self",
) -> torch.Tensor:
    """[B] vBoN returns A = log F(r(y)) − (ℓ − log π_ref(y))/(N−1), detached (see `vbon_loss`):
    BOND-N's returns on the paper's scale, R / (N−1)."""
    return bond_beta(n) * bond_returns(policy_logps, policy_mask, ref_logps, rewards, ref_rewards, n, smoothing)


def bond_loss(
    policy_logps: torch.Tensor,
    policy_mask: torch.Tensor,
    best_ref_logps: torch.Tensor,
    best_ref_mask: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor | None,
    ref_rewards: torch.Tensor | None,
    n: int,
    beta: float = 0.5,
    smoothing: str = "self",
    bond_rewards: torch.Tensor | None = None,
    baseline_sum: torch.Tensor | float | None = None,
    baseline_count: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BOND-N: Jeffreys divergence to BoN_N(π_ref) (SPEC §3, §6; paper eqs. 11-15).

    Forward KL: SFT on the best of N reference samples, −ℓ(y_boN).
    Backward KL: eq. (15), −(N−1)·E_π[∇ℓ · (r_BOND − (ℓ − log π_ref)/(N−1))]. The
    factor (N−1) is folded in so that the backward term is the gradient of
    KL(π ‖ π_BoN) itself and β weighs two divergences on the same scale:

        R = (N−1)·r_BOND(y) − (ℓ − log π_ref(y)),   b = leave-one-out mean
        L = mean[ (1−β)·(−ℓ(y_boN)) + β·(−sg(R − b)·ℓ(y)) ]

    r_BOND defaults to log p̂≤, the Monte-Carlo quantile of the policy sample's
    reward among k reference samples (`mc_quantile`, smoothed by `smoothing`);
    pass `bond_rewards` [B] to use other quantiles (exact ones, a learned model).

    Args:
        policy_logps, policy_mask:   [B, T] policy sample (with grad).
        best_ref_logps, best_ref_mask: [B, T'] log π of the best of N reference samples (with grad).
        ref_logps:   [B, T] log π_ref of the policy sample (no grad; masked by policy_mask).
        rewards:     [B] reward of the policy sample (unused with `bond_rewards`).
        ref_rewards: [B, k] rewards of k reference samples (unused with `bond_rewards`).
        baseline_sum, baseline_count: the whole batch's Σ R and size when these rows are
            one rank's share (`bond_returns`), as in `jbond_loss`.
    """
    _check_unit_interval("beta", beta)
    n_minus_1 = 1.0 / bond_beta(n)
    batch = policy_logps.shape[0]
    policy_seq = sequence_logps(policy_logps, policy_mask)
    best_ref_seq = sequence_logps(best_ref_logps, best_ref_mask)
    ref_seq = sequence_logps(ref_logps.detach(), policy_mask)

    bond_rewards = _log_quantiles("bond_loss", "bond_rewards", bond_rewards, rewards, ref_rewards, batch, smoothing)

    log_ratio = policy_seq.detach() - ref_seq
    returns = n_minus_1 * bond_rewards.to(log_ratio.dtype) - log_ratio
    advantages = returns - _baseline(returns, baseline_sum, baseline_count)

    forward_term = -best_ref_seq
    backward_term = -advantages * policy_seq
    loss = ((1.0 - beta) * forward_term + beta * backward_term).mean()
    metrics = {
        "loss": loss.detach(),
        "forward_term": forward_term.detach().mean(),
        "backward_term": backward_term.detach().mean(),
        "kl_ref": log_ratio.mean(),
        "log_quantile": bond_rewards.detach().float().mean(),
        "return_mean": returns.mean(),
    }
    return loss, metrics


def vbon_loss(
    policy_logps: torch.Tensor,
    policy_mask: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor | None,
    ref_rewards: torch.Tensor | None,
    n: int,
    smoothing: str = "self",
    log_cdf: torch.Tensor | None = None,
    baseline_sum: torch.Tensor | float | None = None,
    baseline_count: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """vBoN (Amini et al. 2024): maximize E_π[log F(r(y))] − 1/(N−1)·KL(π ‖ π_ref).

    F is the reward CDF under π_ref, estimated from k reference samples per
    prompt (`mc_quantile`), or given as `log_cdf` [B]. REINFORCE with a
    leave-one-out baseline:

        A = log F(r(y)) − (ℓ − log π_ref(y))/(N−1),  L = −mean[sg(A − b)·ℓ]

    Its gradient is exactly 1/(N−1) times that of `bond_loss` with β = 1: the
    same objective on the scale of the paper. `baseline_sum` / `baseline_count`:
    the whole batch's Σ A and size when these rows are one rank's share (`vbon_returns`).
    """
    batch = policy_logps.shape[0]
    policy_seq = sequence_logps(policy_logps, policy_mask)
    ref_seq = sequence_logps(ref_logps.detach(), policy_mask)
    log_cdf = _log_quantiles("vbon_loss", "log_cdf", log_cdf, rewards, ref_rewards, batch, smoothing)

    log_ratio = policy_seq.detach() - ref_seq
    returns = log_cdf.to(log_ratio.dtype) - bond_beta(n) * log_ratio
    advantages = returns - _baseline(returns, baseline_sum, baseline_count)
    loss = (-advantages * policy_seq).mean()
    metrics = {
        "loss": loss.detach(),
        "kl_ref": log_ratio.mean(),
        "log_quantile": log_cdf.detach().float().mean(),
        "return_mean": returns.mean(),
    }
    return loss, metrics


def bonbon_loss(
    chosen_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    n: int = 8,
    alpha: float = 0.005,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BoNBoN (Gui et al. 2024), offline, SPEC §6.

    From n reference samples per prompt, y_w is the best and y_l the worst:

        h = (ℓ(y_w) − log π_ref(y_w)) − (ℓ(y_l) − log π_ref(y_l))
        L = mean[ α·(−ℓ(y_w)) + (1−α)·(h − 1/(2β*_n))² ],  β*_n = 1/(2(n−1)H_{n−1})

    `ref_chosen_logps` / `ref_rejected_logps` are token log-probs under π_ref,
    masked by the chosen / rejected masks.
    """
    _check_unit_interval("alpha", alpha)
    chosen_seq = sequence_logps(chosen_logps, chosen_mask)
    rejected_seq = sequence_logps(rejected_logps, rejected_mask)
    ref_chosen_seq = sequence_logps(ref_chosen_logps.detach(), chosen_mask)
    ref_rejected_seq = sequence_logps(ref_rejected_logps.detach(), rejected_mask)

    margin = (chosen_seq - ref_chosen_seq) - (rejected_seq - ref_rejected_seq)
    target = 1.0 / (2.0 * bonbon_beta(n))
    sft_term = -chosen_seq
    ipo_term = (margin - target) ** 2
    loss = (alpha * sft_term + (1.0 - alpha) * ipo_term).mean()
    metrics = {
        "loss": loss.detach(),
        "sft_term": sft_term.detach().mean(),
        "ipo_term": ipo_term.detach().mean(),
        "margin": margin.detach().mean(),
        "margin_target": torch.tensor(target),
    }
    return loss, metrics


def rloo_loss(
    policy_logps: torch.Tensor,
    policy_mask: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    beta_rl: float = 0.01,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE with a leave-one-out baseline, the BOND paper's RLHF baseline.

    S ≥ 2 policy samples per prompt (the paper uses 2); the baseline of a
    sample is the mean return of the *other* samples of the same prompt:

        R = r(y) − β_RL·(ℓ − log π_ref(y)),   L = −mean[sg(R − b)·ℓ]

    Args:
        policy_logps, policy_mask: [B, S, T] policy samples (with grad).
        ref_logps: [B, S, T] log π_ref of the same tokens (no grad).
        rewards:   [B, S].
        beta_rl:   KL-regularization strength β_RL ≥ 0.
    """
    if beta_rl < 0:
        raise ValueError(f"beta_rl must be >= 0, got {beta_rl}")
    if policy_logps.dim() != 3 or rewards.shape != policy_logps.shape[:2]:
        raise ValueError(
            f"expected policy_logps [B, S, T] and rewards [B, S], got "
            f"{tuple(policy_logps.shape)} and {tuple(rewards.shape)}"
        )
    if policy_logps.shape[1] < 2:
        raise ValueError("rloo_loss needs at least 2 samples per prompt for its baseline")
    policy_seq = sequence_logps(policy_logps, policy_mask)  # [B, S]
    ref_seq = sequence_logps(ref_logps.detach(), policy_mask)
    log_ratio = policy_seq.detach() - ref_seq
    returns = rewards.to(log_ratio.dtype) - beta_rl * log_ratio
    advantages = returns - leave_one_out_baseline(returns, dim=1)
    loss = (-advantages * policy_seq).mean()
    metrics = {
        "loss": loss.detach(),
        "kl_ref": log_ratio.mean(),
        "reward": rewards.detach().float().mean(),
        "return_mean": returns.mean(),
    }
    return loss, metrics
