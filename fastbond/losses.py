"""The BOND family of objectives on token log-probs, in plain PyTorch.

These functions are the oracles the trainer's objectives are checked against:
short, literal transcriptions of SPEC §5-§6. Each takes padded token
log-probs `[B, T]` with boolean-or-0/1 masks `[B, T]` (a sequence log-prob is
the masked sum over its response tokens) and returns `(loss, metrics)`;
`loss` is a scalar to minimize, `metrics` a dict of detached scalar tensors.

J-BOND's reference lives beside its fused kernel (`fastbond.kernels.jbond_loss`,
re-exported here as `jbond_loss`), with the helpers every objective shares
(`fastbond.kernels.sequences`): the kernels never import this module.

Surrogate losses: every loss below is built so that its *gradient* is the
estimator of the paper (stop-gradients written `sg` in SPEC). Its value is not
the divergence itself; the divergences are reported in the metrics.

Returns (what a leave-one-out baseline averages) are computed in one place
per objective: `jbond_returns`, `bond_returns` (vBoN's are BOND-N's on the
paper's scale, `vbon_returns`). A loss given `batch_sum` (its rows are one
rank's share of a batch) takes the baseline over the whole batch.
"""

from __future__ import annotations

import torch

from fastbond.bon import bond_beta, bonbon_beta, mc_quantile
from fastbond.kernels.jbond_loss import jbond_loss_ref as jbond_loss
from fastbond.kernels.jbond_loss import jbond_returns
from fastbond.kernels.sequences import BatchSum, batch_total, leave_one_out_baseline, sequence_logps

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


def _baseline(returns: torch.Tensor, batch_sum: BatchSum | None) -> torch.Tensor:
    """Leave-one-out baseline over these rows, or over the whole batch they are a share of."""
    if batch_sum is None:
        return leave_one_out_baseline(returns)
    total, count = batch_total(returns, batch_sum)
    return leave_one_out_baseline(returns, total=total, count=count)


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


def bond_returns(policy_seq: torch.Tensor, ref_seq: torch.Tensor, log_quantiles: torch.Tensor, n: int) -> torch.Tensor:
    """[B] BOND-N returns R = (N−1)·log p̂≤(y) − (ℓ − log π_ref(y)), detached (see `bond_loss`).

    `policy_seq`, `ref_seq`: sequence log-probs of the policy sample under π and π_ref;
    `log_quantiles`: r_BOND ≈ log p̂≤ of its reward.
    """
    log_ratio = policy_seq.detach() - ref_seq.detach()
    return (1.0 / bond_beta(n)) * log_quantiles.detach().to(log_ratio.dtype) - log_ratio


def vbon_returns(policy_seq: torch.Tensor, ref_seq: torch.Tensor, log_cdf: torch.Tensor, n: int) -> torch.Tensor:
    """[B] vBoN returns A = log F(r(y)) − (ℓ − log π_ref(y))/(N−1), detached (see `vbon_loss`):
    BOND-N's returns on the paper's scale, R / (N−1)."""
    return bond_beta(n) * bond_returns(policy_seq, ref_seq, log_cdf, n)


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
    batch_sum: BatchSum | None = None,
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
        batch_sum: these rows are one rank's share of a larger batch; a function summing a
            tensor over every share (e.g. an all-reduce): the baseline is the whole batch's.
    """
    _check_unit_interval("beta", beta)
    batch = policy_logps.shape[0]
    policy_seq = sequence_logps(policy_logps, policy_mask)
    best_ref_seq = sequence_logps(best_ref_logps, best_ref_mask)
    ref_seq = sequence_logps(ref_logps.detach(), policy_mask)

    bond_rewards = _log_quantiles("bond_loss", "bond_rewards", bond_rewards, rewards, ref_rewards, batch, smoothing)

    log_ratio = policy_seq.detach() - ref_seq
    returns = bond_returns(policy_seq, ref_seq, bond_rewards, n)
    advantages = returns - _baseline(returns, batch_sum)

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
    batch_sum: BatchSum | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """vBoN (Amini et al. 2024): maximize E_π[log F(r(y))] − 1/(N−1)·KL(π ‖ π_ref).

    F is the reward CDF under π_ref, estimated from k reference samples per
    prompt (`mc_quantile`), or given as `log_cdf` [B]. REINFORCE with a
    leave-one-out baseline:

        A = log F(r(y)) − (ℓ − log π_ref(y))/(N−1),  L = −mean[sg(A − b)·ℓ]

    Its gradient is exactly 1/(N−1) times that of `bond_loss` with β = 1: the
    same objective on the scale of the paper. `batch_sum`: as in `bond_loss`.
    """
    batch = policy_logps.shape[0]
    policy_seq = sequence_logps(policy_logps, policy_mask)
    ref_seq = sequence_logps(ref_logps.detach(), policy_mask)
    log_cdf = _log_quantiles("vbon_loss", "log_cdf", log_cdf, rewards, ref_rewards, batch, smoothing)

    log_ratio = policy_seq.detach() - ref_seq
    returns = vbon_returns(policy_seq, ref_seq, log_cdf, n)
    advantages = returns - _baseline(returns, batch_sum)
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
