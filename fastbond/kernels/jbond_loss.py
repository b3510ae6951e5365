"""Fused J-BOND loss head: token log-probs → (loss, metrics), and per-token gradients.

The J-BOND surrogate of SPEC §5 step 6; `jbond_loss_ref` below is the
`reference` backend and the test oracle (also exported as
`fastbond.losses.jbond_loss`):

    ℓ = Σ_t m·log π(y_t),  a = Σ_t m·log π_anc(y_t),  ℓ₂ = Σ_t m₂·log π(y_bo2,t)
    R = r_J − (ℓ − a),  b = leave-one-out mean of R,  A = R − b
    L = mean_b[ (1−β)·(−ℓ₂) + β·(−sg(A)·ℓ) + γ·sg(ℓ − a)·ℓ ]

When the rows are one rank's share of a batch split over ranks,
`batch_sum` (a sum over every share, e.g. an all-reduce) makes b the whole
batch's leave-one-out mean; the metrics stay the share's.

The returns R are computed in one place in PyTorch (`jbond_returns`), used by
the reference, the chunked backend and the batch-wide baseline; the Triton
forward computes the same in-kernel and is tested against it.

The stop-gradients make the advantages constants, so the gradient is closed
form and per sequence:

    ∂L/∂policy_logps[b, t]      = m[b, t] · (−β·A_b + γ·(ℓ_b − a_b)) · g / B
    ∂L/∂best_anchor_logps[b, t] = m₂[b, t] · (−(1−β)) · g / B

with g the upstream gradient of L. Neither backend builds an autograd graph:

* `chunked` — vectorized PyTorch in a `torch.autograd.Function` (the same
  masked sums as the reference, then the closed-form gradients); any device.
* `triton`  — one launch forward, one launch backward. Forward: one program
  per sequence reduces its three log-prob rows (masked with `where`: padded
  positions may hold −inf or NaN) and its J-BOND reward; the leave-one-out
  baseline needs the whole batch, so the *last* program to finish (an atomic
  ticket) reads the B per-row results and computes the baseline, the loss,
  every metric and the per-row gradient coefficients. Backward: a
  (B, T-blocks) grid writes both gradients.

Trade-off of the forward: a single program looping over the batch would need
no atomic, but reads B·(2T + T') elements on one SM; a two-kernel version
(rows, then a finish kernel) costs a second launch. The ticket keeps one
launch with the whole GPU reading, at the price of an atomic and a barrier;
the finish step is O(B) and deterministic (fixed order, one program).

Accumulation is fp32 whatever the input dtype (fp32/bf16/fp16); gradients come
back in the input dtype. float64 inputs go through `chunked` under
`backend="triton"` (Triton's fp32 accumulation would silently lower them).

Design of the fused-linear form (implemented in `fastbond/kernels/jbond_linear.py`)
-------------------------------------------------------------------------
The form that starts from final hidden states — policy samples and better-
anchor samples, the LM head, the anchor's token log-probs and the rewards —
and returns the loss and the gradients for the hidden states and the LM head
without ever holding [tokens × vocab] logits, is two passes over
`fastbond.kernels.linear_logprobs`:

1. forward: `linear_logprobs(hidden, weight, targets, ...)` gives fp32 token
   log-probs (one GEMM per vocabulary chunk, an online logsumexp, nothing kept
   beyond what its backward recomputes);
2. head: this op turns them into per-sequence weights — they depend on the
   policy's own sequence log-probs ℓ and on a batch-level baseline, so they
   cannot be known inside the first pass, but computing them is O(B·T);
3. backward: the per-token upstream gradients of step 2 (a different weight
   per sequence: `linear_logprobs` must honour a non-uniform grad_output,
   SPEC §8) flow into `linear_logprobs`' backward, which recomputes the logits
   chunk by chunk to produce ∂hidden and ∂W.

So the fused-linear J-BOND is linear_logprobs ∘ jbond_loss under autograd,
with a cheap first pass and one recomputing backward — no extra fusion is
needed for memory, and the GEMM cost is that of any fused cross-entropy.

Why not reuse the sampler's log-probs for ℓ and skip the first pass: they come
from the inference engine's kernels at its precision (bf16 logits, sometimes a
different soft-cap or temperature path), so they differ from the training
forward's by more than the signal in ℓ − a, and they carry no gradient — the
backward would still have to recompute the training log-probs. They are fine
for logging, not as the ℓ inside the loss.
"""

from __future__ import annotations

import itertools

import torch

from fastbond.bon import JBOND_PENALTY, jbond_reward
from fastbond.kernels import tuning
from fastbond.kernels._backend import resolve_backend
from fastbond.kernels.sequences import BatchSum, batch_total, leave_one_out_baseline, sequence_logps

try:  # the module must import where triton is absent
    import triton
    import triton.language as tl

    from fastbond.kernels._triton_common import cast_rtne
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

__all__ = ["METRIC_NAMES", "jbond_loss", "jbond_loss_ref", "jbond_objective", "jbond_returns"]

# Order of the metrics vector the backends fill; the dict keys of every backend besides "loss".
METRIC_NAMES = (
    "forward_term",
    "backward_term",
    "kl_anchor",
    "frac_worse_than_both",
    "jbond_reward",
    "return_mean",
    "advantage_std",
    "policy_logp",
    "best_anchor_logp",
)


# --------------------------------------------------------------------------- #
# The objective on sequence log-probs: one place for the math in PyTorch
# --------------------------------------------------------------------------- #


def _rewards_and_ratio(policy_seq, anchor_seq, rewards, anchor_rewards):
    """(r_J, ℓ − a, R = r_J − (ℓ − a)) per sequence, detached."""
    log_ratio = policy_seq.detach() - anchor_seq.detach()  # sample estimate of KL(π ‖ π_anc)
    jbond_rewards = jbond_reward(rewards, anchor_rewards).to(log_ratio.dtype)
    return jbond_rewards, log_ratio, jbond_rewards - log_ratio


def jbond_returns(policy_seq: torch.Tensor, anchor_seq: torch.Tensor, rewards: torch.Tensor,
                  anchor_rewards: torch.Tensor) -> torch.Tensor:
    """[B] J-BOND returns R = r_J(y) − (ℓ − a), detached: what the leave-one-out baseline averages.

    `policy_seq` ℓ and `anchor_seq` a are sequence log-probs [B] of the policy sample
    under π_t and π_anc; `rewards` [B] and `anchor_rewards` [B, 2] as in `jbond_loss`.
    """
    return _rewards_and_ratio(policy_seq, anchor_seq, rewards, anchor_rewards)[2]


def _baseline_totals(policy_logps, policy_mask, anchor_logps, rewards, anchor_rewards, batch_sum):
    """(Σ R, size) of the whole batch when these rows are a share of it, else (None, None)."""
    if batch_sum is None:
        return None, None
    returns = jbond_returns(sequence_logps(policy_logps.detach(), policy_mask),
                            sequence_logps(anchor_logps.detach(), policy_mask), rewards, anchor_rewards)
    return batch_total(returns, batch_sum)


def jbond_objective(policy_seq, best_anchor_seq, anchor_seq, rewards, anchor_rewards, beta: float, gamma: float,
                    baseline_total=None, baseline_count=None):
    """SPEC §5 step 6 on sequence log-probs [B]: (loss, metrics [9] in METRIC_NAMES order, A, ℓ − a).

    The stop-gradients are detaches here, so under autograd the gradient of
    `loss` is the J-BOND estimator; the chunked backend calls it without a
    graph and applies the closed-form gradient with the returned A and ℓ − a.
    `baseline_total` / `baseline_count`: Σ R and size of the whole batch (`batch_total`).
    """
    jbond_rewards, log_ratio, returns = _rewards_and_ratio(policy_seq, anchor_seq, rewards, anchor_rewards)
    advantages = returns - leave_one_out_baseline(returns, total=baseline_total, count=baseline_count)

    forward_term = -best_anchor_seq
    backward_term = -advantages * policy_seq
    anchor_kl_term = log_ratio * policy_seq
    loss = ((1.0 - beta) * forward_term + beta * backward_term + gamma * anchor_kl_term).mean()
    metrics = torch.stack([
        forward_term.detach().mean(),
        backward_term.detach().mean(),
        log_ratio.mean(),
        (jbond_rewards < 0).to(log_ratio.dtype).mean(),
        jbond_rewards.mean(),
        returns.mean(),
        advantages.std(unbiased=False),
        policy_seq.detach().mean(),
        best_anchor_seq.detach().mean(),
    ])
    return loss, metrics, advantages, log_ratio


# --------------------------------------------------------------------------- #
# Validation (one set of rules for every backend, checked before any kernel runs)
# --------------------------------------------------------------------------- #


def _validate(policy_logps, policy_mask, best_anchor_logps, best_anchor_mask, anchor_logps, rewards, anchor_rewards,
              beta, gamma) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if policy_logps.dim() != 2:
        raise ValueError(f"policy_logps must be [B, T], got shape {tuple(policy_logps.shape)}")
    if best_anchor_logps.dim() != 2:
        raise ValueError(f"best_anchor_logps must be [B, T'], got shape {tuple(best_anchor_logps.shape)}")
    for name, logps, mask in (
        ("policy_logps", policy_logps, policy_mask),
        ("best_anchor_logps", best_anchor_logps, best_anchor_mask),
        ("anchor_logps", anchor_logps, policy_mask),
    ):
        if logps.shape != mask.shape:
            raise ValueError(f"log-probs {tuple(logps.shape)} and mask {tuple(mask.shape)} differ in shape ({name})")
    batch = policy_logps.shape[0]
    if best_anchor_logps.shape[0] != batch:
        raise ValueError(f"best_anchor_logps must have batch {batch}, got shape {tuple(best_anchor_logps.shape)}")
    if rewards.dim() != 1 or rewards.shape[0] != batch:
        raise ValueError(f"rewards must have 1 dims with batch {batch}, got shape {tuple(rewards.shape)}")
    if anchor_rewards.dim() != 2 or anchor_rewards.shape[0] != batch or anchor_rewards.shape[1] != 2:
        raise ValueError(f"anchor_rewards must be [{batch}, 2], got shape {tuple(anchor_rewards.shape)}")


def _metrics_dict(loss: torch.Tensor, metrics: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"loss": loss.detach()}
    out.update({name: metrics[i] for i, name in enumerate(METRIC_NAMES)})
    return out


def _jbond_penalty(rewards: torch.Tensor) -> float:
    """−log 16 as the reference forms it: in the rewards' floating dtype (e.g. bf16-rounded), else fp32."""
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return float(torch.tensor(JBOND_PENALTY, dtype=dtype))


# --------------------------------------------------------------------------- #
# reference backend: plain autograd, the test oracle
# --------------------------------------------------------------------------- #


def jbond_loss_ref(
    policy_logps: torch.Tensor,
    policy_mask: torch.Tensor,
    best_anchor_logps: torch.Tensor,
    best_anchor_mask: torch.Tensor,
    anchor_logps: torch.Tensor,
    rewards: torch.Tensor,
    anchor_rewards: torch.Tensor,
    beta: float = 0.5,
    gamma: float = 0.0,
    *,
    batch_sum: BatchSum | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """J-BOND surrogate loss, SPEC §5 step 6 (BOND paper, Algorithm 2), in plain autograd.

        ℓ = log π_t(y),  a = log π_anc(y),  ℓ₂ = log π_t(y_bo2)
        R = r_J(y) − (ℓ − a),   b = leave-one-out mean of R over the batch
        L = mean[ (1−β)·(−ℓ₂)  +  β·(−sg(R − b)·ℓ)  +  γ·sg(ℓ − a)·ℓ ]

    The γ term is the gradient of KL(π ‖ π_anc) (eq. 19); Algorithm 2 prints it
    with the opposite sign, which would push the policy *away* from the anchor.
    Arguments and return as `jbond_loss`.
    """
    _validate(policy_logps, policy_mask, best_anchor_logps, best_anchor_mask, anchor_logps, rewards, anchor_rewards,
              beta, gamma)
    total, count = _baseline_totals(policy_logps, policy_mask, anchor_logps, rewards, anchor_rewards, batch_sum)
    loss, metrics, _, _ = jbond_objective(
        sequence_logps(policy_logps, policy_mask), sequence_logps(best_anchor_logps, best_anchor_mask),
        sequence_logps(anchor_logps.detach(), policy_mask), rewards, anchor_rewards, beta, gamma, total, count)
    return loss, _metrics_dict(loss, metrics)


# --------------------------------------------------------------------------- #
# chunked backend: vectorized PyTorch, closed-form backward
# --------------------------------------------------------------------------- #


class _JBondChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy_logps, policy_mask, best_anchor_logps, best_anchor_mask, anchor_logps, rewards,
                anchor_rewards, beta: float, gamma: float, baseline_total=None, baseline_count=None):
        loss, metrics, advantages, log_ratio = jbond_objective(
            sequence_logps(policy_logps, policy_mask), sequence_logps(best_anchor_logps, best_anchor_mask),
            sequence_logps(anchor_logps, policy_mask), rewards, anchor_rewards, beta, gamma,
            baseline_total, baseline_count)
        ctx.save_for_backward(policy_mask, best_anchor_mask, advantages, log_ratio)
        ctx.beta, ctx.gamma = beta, gamma
        ctx.dtypes = (policy_logps.dtype, best_anchor_logps.dtype)
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        policy_mask, best_anchor_mask, advantages, log_ratio = ctx.saved_tensors
        policy_dtype, best_dtype = ctx.dtypes
        grad_row = grad_loss / advantages.shape[0]  # the mean's backward
        grad_policy = grad_best = None
        if ctx.needs_input_grad[0]:
            # β·(−sg(A)·ℓ) + γ·sg(ℓ − a)·ℓ  →  ∂/∂ℓ, each term rounded as autograd would.
            per_row = (grad_row * ctx.beta) * -advantages + (grad_row * ctx.gamma) * log_ratio
            zero = torch.zeros((), dtype=per_row.dtype, device=per_row.device)
            grad_policy = torch.where(policy_mask.bool(), per_row[:, None], zero).to(policy_dtype)
        if ctx.needs_input_grad[2]:
            per_token = -(grad_row * (1.0 - ctx.beta))
            zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
            grad_best = torch.where(best_anchor_mask.bool(), per_token, zero).to(best_dtype)
        return grad_policy, None, grad_best, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- #
# triton backend
# --------------------------------------------------------------------------- #

if triton is not None:

    @triton.jit
    def _masked_row_sum(
        x_ptr,      # *T   one row of log-probs
        mask_ptr,   # *M   the row's mask (bool as uint8, or 0/1 of any dtype)
        n_cols,     # int  T
        BLOCK_T: tl.constexpr,
    ):
        acc = tl.zeros([BLOCK_T], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_T):
            cols = start + tl.arange(0, BLOCK_T)
            inside = cols < n_cols
            keep = tl.load(mask_ptr + cols, mask=inside, other=0) != 0
            x = tl.load(x_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            acc += tl.where(keep, x, 0.0)  # where, not multiply: padding may be −inf or NaN
        return tl.sum(acc, axis=0)

    # B is never specialized: a constexpr B = 1 would break B.to(...) (and recompile for it).
    @triton.jit(do_not_specialize=["B"])
    def _jbond_fwd_kernel(
        policy_ptr,          # [B, T]  policy token log-probs (row stride stride_p)
        policy_mask_ptr,     # [B, T]  response mask (row stride stride_pm)
        best_ptr,            # [B, T2] better-anchor-sample token log-probs under the policy
        best_mask_ptr,       # [B, T2]
        anchor_ptr,          # [B, T]  anchor token log-probs of the policy sample
        rewards_ptr,         # [B]     reward of the policy sample (any real dtype)
        anchor_rewards_ptr,  # [B, 2]  rewards of the two anchor samples
        rows_ptr,            # [B, 4]  fp32 scratch: ℓ, a, ℓ₂, r_J per sequence
        grad_rows_ptr,       # [B, 2]  fp32 out: −A and ℓ − a per sequence, for the backward
        loss_ptr,            # []      fp32 out
        metrics_ptr,         # [9]     fp32 out, in METRIC_NAMES order
        ticket_ptr,          # [1]     int32, zero on entry: programs finished so far
        baseline_ptr,        # [2]     fp32: Σ R and the size of the whole batch (GLOBAL_BASELINE only)
        B, T, T2,
        stride_p, stride_pm, stride_b, stride_bm, stride_a,
        stride_r, stride_ar0, stride_ar1,
        penalty,             # −log 16 as the reference rounds it
        beta, one_minus_beta, gamma,
        BLOCK_T: tl.constexpr,
        BLOCK_B: tl.constexpr,
        GLOBAL_BASELINE: tl.constexpr,  # these rows are a share of a batch: its baseline from baseline_ptr
    ):
        row = tl.program_id(0)
        row64 = row.to(tl.int64)
        policy_sum = _masked_row_sum(policy_ptr + row64 * stride_p, policy_mask_ptr + row64 * stride_pm, T, BLOCK_T)
        anchor_sum = _masked_row_sum(anchor_ptr + row64 * stride_a, policy_mask_ptr + row64 * stride_pm, T, BLOCK_T)
        best_sum = _masked_row_sum(best_ptr + row64 * stride_b, best_mask_ptr + row64 * stride_bm, T2, BLOCK_T)
        # Compare rewards in their own dtype, as the reference does; (r < r0) & (r < r1) is
        # r < min(r0, r1) including NaNs (any comparison with NaN is false).
        reward = tl.load(rewards_ptr + row64 * stride_r)
        worse = (reward < tl.load(anchor_rewards_ptr + row64 * stride_ar0)) & (
            reward < tl.load(anchor_rewards_ptr + row64 * stride_ar0 + stride_ar1))
        r_j = tl.where(worse, penalty, 0.0)
        tl.store(rows_ptr + row * 4 + 0, policy_sum)
        tl.store(rows_ptr + row * 4 + 1, anchor_sum)
        tl.store(rows_ptr + row * 4 + 2, best_sum)
        tl.store(rows_ptr + row * 4 + 3, r_j)

        # The leave-one-out baseline needs every row: the last program to arrive finishes.
        # Barrier, then a release-acquire ticket: this row's stores are visible to whoever
        # draws the last ticket, and that program sees all rows.
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == B - 1:
            tl.debug_barrier()
            if GLOBAL_BASELINE:
                count = tl.load(baseline_ptr + 1)
            else:
                count = B.to(tl.float32)
            loo = tl.maximum(count - 1.0, 1.0)  # a batch of 1: baseline 0, any divisor works
            # Pass 1: the sum of returns.
            acc_r = tl.zeros([BLOCK_B], dtype=tl.float32)
            for start in range(0, B, BLOCK_B):
                rows = start + tl.arange(0, BLOCK_B)
                inside = rows < B
                l = tl.load(rows_ptr + rows * 4 + 0, mask=inside, other=0.0, volatile=True)
                a = tl.load(rows_ptr + rows * 4 + 1, mask=inside, other=0.0, volatile=True)
                rj = tl.load(rows_ptr + rows * 4 + 3, mask=inside, other=0.0, volatile=True)
                acc_r += tl.where(inside, rj - (l - a), 0.0)
            sum_returns = tl.sum(acc_r, axis=0)
            if GLOBAL_BASELINE:
                batch_returns = tl.load(baseline_ptr)
            else:
                batch_returns = sum_returns
            # Pass 2: advantages, the loss, the means; per-row gradient coefficients.
            acc_loss = tl.zeros([BLOCK_B], dtype=tl.float32)
            acc_fwd = tl.zeros([BLOCK_B], dtype=tl.float32)
            acc_bwd = tl.zeros([BLOCK_B], dtype=tl.float32)
            acc_kl = tl.zeros([BLOCK_B], dtype=tl.float32)
            acc_worse = tl.zeros([BLOCK_B], dtype=tl.float32)
            acc_rj = tl.zeros([BLOCK_B], dtype=tl.float32)
            acc_adv = tl.zeros([BLOCK_B], dtype=tl.float32)
            acc_l = tl.zeros([BLOCK_B], dtype=tl.float32)
            acc_l2 = tl.zeros([BLOCK_B], dtype=tl.float32)
            for start in range(0, B, BLOCK_B):
                rows = start + tl.arange(0, BLOCK_B)
                inside = rows < B
                l = tl.load(rows_ptr + rows * 4 + 0, mask=inside, other=0.0, volatile=True)
                a = tl.load(rows_ptr + rows * 4 + 1, mask=inside, other=0.0, volatile=True)
                l2 = tl.load(rows_ptr + rows * 4 + 2, mask=inside, other=0.0, volatile=True)
                rj = tl.load(rows_ptr + rows * 4 + 3, mask=inside, other=0.0, volatile=True)
                log_ratio = l - a
                ret = rj - log_ratio
                if count > 1.0:
                    adv = ret - (batch_returns - ret) / loo
                else:
                    adv = ret
                fwd = -l2
                bwd = -adv * l
                per_row = one_minus_beta * fwd + beta * bwd + gamma * (log_ratio * l)
                acc_loss += tl.where(inside, per_row, 0.0)
                acc_fwd += tl.where(inside, fwd, 0.0)
                acc_bwd += tl.where(inside, bwd, 0.0)
                acc_kl += tl.where(inside, log_ratio, 0.0)
                acc_worse += tl.where(inside & (rj < 0), 1.0, 0.0)
                acc_rj += tl.where(inside, rj, 0.0)
                acc_adv += tl.where(inside, adv, 0.0)
                acc_l += tl.where(inside, l, 0.0)
                acc_l2 += tl.where(inside, l2, 0.0)
                tl.store(grad_rows_ptr + rows * 2 + 0, -adv, mask=inside)
                tl.store(grad_rows_ptr + rows * 2 + 1, log_ratio, mask=inside)
            n = B.to(tl.float32)
            mean_adv = tl.sum(acc_adv, axis=0) / n
            # Pass 3: the population std of the advantages, two-pass (no E[x²] − E[x]² cancellation).
            # Advantages are recomputed from the rows rather than read back from grad_rows:
            # this program's own stores are not ordered against its loads without a barrier.
            acc_var = tl.zeros([BLOCK_B], dtype=tl.float32)
            for start in range(0, B, BLOCK_B):
                rows = start + tl.arange(0, BLOCK_B)
                inside = rows < B
                l = tl.load(rows_ptr + rows * 4 + 0, mask=inside, other=0.0, volatile=True)
                a = tl.load(rows_ptr + rows * 4 + 1, mask=inside, other=0.0, volatile=True)
                rj = tl.load(rows_ptr + rows * 4 + 3, mask=inside, other=0.0, volatile=True)
                ret = rj - (l - a)
                if count > 1.0:
                    adv = ret - (batch_returns - ret) / loo
                else:
                    adv = ret
                centered = tl.where(inside, adv - mean_adv, 0.0)
                acc_var += centered * centered
            tl.store(loss_ptr, tl.sum(acc_loss, axis=0) / n)
            tl.store(metrics_ptr + 0, tl.sum(acc_fwd, axis=0) / n)
            tl.store(metrics_ptr + 1, tl.sum(acc_bwd, axis=0) / n)
            tl.store(metrics_ptr + 2, tl.sum(acc_kl, axis=0) / n)
            tl.store(metrics_ptr + 3, tl.sum(acc_worse, axis=0) / n)
            tl.store(metrics_ptr + 4, tl.sum(acc_rj, axis=0) / n)
            tl.store(metrics_ptr + 5, (sum_returns) / n)
            tl.store(metrics_ptr + 6, tl.sqrt(tl.sum(acc_var, axis=0) / n))
            tl.store(metrics_ptr + 7, tl.sum(acc_l, axis=0) / n)
            tl.store(metrics_ptr + 8, tl.sum(acc_l2, axis=0) / n)

    @triton.jit(do_not_specialize=["B"])
    def _jbond_bwd_kernel(
        grad_loss_ptr,       # []      upstream gradient of the loss (read on device: no host sync)
        grad_rows_ptr,       # [B, 2]  fp32: −A and ℓ − a per sequence
        policy_mask_ptr,     # [B, T]
        best_mask_ptr,       # [B, T2]
        grad_policy_ptr,     # [B, T]  out, contiguous, input dtype
        grad_best_ptr,       # [B, T2] out, contiguous, input dtype
        B, T, T2,
        stride_pm, stride_bm,
        beta, one_minus_beta, gamma,
        POLICY_GRAD: tl.constexpr,
        BEST_GRAD: tl.constexpr,
        POLICY_DTYPE: tl.constexpr,
        BEST_DTYPE: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        # The mean's backward, g / B, correctly rounded like PyTorch's division.
        grad_row = tl.math.div_rn(tl.load(grad_loss_ptr).to(tl.float32), B.to(tl.float32))
        if POLICY_GRAD:
            inside = cols < T
            neg_adv = tl.load(grad_rows_ptr + row * 2 + 0)
            log_ratio = tl.load(grad_rows_ptr + row * 2 + 1)
            # Same products as autograd: (g/B·β)·(−A) + (g/B·γ)·(ℓ − a).
            per_row = (grad_row * beta) * neg_adv + (grad_row * gamma) * log_ratio
            keep = tl.load(policy_mask_ptr + row * stride_pm + cols, mask=inside, other=0) != 0
            grad = tl.where(keep, per_row, 0.0)
            tl.store(grad_policy_ptr + row * T + cols, cast_rtne(grad, POLICY_DTYPE), mask=inside)
        if BEST_GRAD:
            inside = cols < T2
            keep = tl.load(best_mask_ptr + row * stride_bm + cols, mask=inside, other=0) != 0
            grad = tl.where(keep, -(grad_row * one_minus_beta), 0.0)
            tl.store(grad_best_ptr + row * T2 + cols, cast_rtne(grad, BEST_DTYPE), mask=inside)

    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A [B, T] operand the kernels can address by row stride: unit column stride, bool as uint8."""
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)  # free; triton has no byte-sized bool pointers on every version
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _block_t(*lengths: int) -> int:
    return max(16, min(triton.next_power_of_2(max(max(lengths), 1)), 2048))


class _JBondTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy_logps, policy_mask, best_anchor_logps, best_anchor_mask, anchor_logps, rewards,
                anchor_rewards, beta: float, gamma: float, baseline_total=None, baseline_count=None):
        device = policy_logps.device
        batch, n_policy = policy_logps.shape
        n_best = best_anchor_logps.shape[1]
        policy, pmask, best, bmask, anchor = map(_rows, (policy_logps, policy_mask, best_anchor_logps,
                                                         best_anchor_mask, anchor_logps))
        if rewards.dtype == torch.bool:
            rewards = rewards.to(torch.uint8)
        if anchor_rewards.dtype == torch.bool:
            anchor_rewards = anchor_rewards.to(torch.uint8)
        scratch = torch.empty(batch * 6 + len(METRIC_NAMES), dtype=torch.float32, device=device)
        rows = scratch[: batch * 4]
        grad_rows = scratch[batch * 4 : batch * 6]
        loss = torch.empty((), dtype=torch.float32, device=device)
        metrics = scratch[batch * 6 :]
        ticket = torch.zeros(1, dtype=torch.int32, device=device)
        global_baseline = baseline_total is not None
        baseline = metrics  # not read unless global_baseline
        if global_baseline:
            total = torch.as_tensor(baseline_total, dtype=torch.float32, device=device).reshape(1)
            baseline = torch.cat([total, torch.full((1,), float(baseline_count), dtype=torch.float32, device=device)])
        _jbond_fwd_kernel[(batch,)](
            policy, pmask, best, bmask, anchor, rewards, anchor_rewards,
            rows, grad_rows, loss, metrics, ticket, baseline,
            batch, n_policy, n_best,
            policy.stride(0), pmask.stride(0), best.stride(0), bmask.stride(0), anchor.stride(0),
            rewards.stride(0), anchor_rewards.stride(0), anchor_rewards.stride(1),
            _jbond_penalty(rewards), beta, 1.0 - beta, gamma,
            BLOCK_T=_block_t(n_policy, n_best) if device.type == "cuda" else _block_t(min(n_policy, 32), 16),
            # Small blocks under the CPU interpreter so tests walk the finish loop over several blocks.
            BLOCK_B=max(16, min(triton.next_power_of_2(batch), 1024 if device.type == "cuda" else 16)),
            GLOBAL_BASELINE=global_baseline,
            num_warps=4,
        )
        ctx.save_for_backward(pmask, bmask, grad_rows)
        ctx.beta, ctx.gamma = beta, gamma
        ctx.dtypes = (policy_logps.dtype, best_anchor_logps.dtype)
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        pmask, bmask, grad_rows = ctx.saved_tensors
        policy_dtype, best_dtype = ctx.dtypes
        batch, n_policy = pmask.shape
        n_best = bmask.shape[1]
        want_policy, want_best = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        device = grad_rows.device
        grad_policy = torch.empty((batch, n_policy), dtype=policy_dtype, device=device) if want_policy else None
        grad_best = torch.empty((batch, n_best), dtype=best_dtype, device=device) if want_best else None
        if not (want_policy or want_best) or batch == 0:
            return grad_policy, None, grad_best, None, None, None, None, None, None, None, None
        lengths = [n for n, want in ((n_policy, want_policy), (n_best, want_best)) if want]
        block_t = _block_t(*lengths) if device.type == "cuda" else 32
        grid = (batch, max(1, triton.cdiv(max(lengths), block_t)))
        _jbond_bwd_kernel[grid](
            grad_loss.float().contiguous(), grad_rows, pmask, bmask,
            grad_policy if want_policy else grad_rows, grad_best if want_best else grad_rows,
            batch, n_policy, n_best, pmask.stride(0), bmask.stride(0),
            ctx.beta, 1.0 - ctx.beta, ctx.gamma,
            POLICY_GRAD=want_policy,
            BEST_GRAD=want_best,
            POLICY_DTYPE=_TL_DTYPES[policy_dtype],
            BEST_DTYPE=_TL_DTYPES[best_dtype],
            BLOCK_T=block_t,
            num_warps=4,
        )
        return grad_policy, None, grad_best, None, None, None, None, None, None, None, None


def cuda_launches(arch: int):
    """Every launch the CUDA dispatch of this op can make (the compile check's list).

    Block sizes are powers of two chosen from B and T (`_block_t`, BLOCK_B up
    to 1024); log-probs come in fp32, bf16 or fp16, masks as bytes (bool) or
    in a float dtype. The two block sizes feed separate loops, so each is
    swept over its range with the other at its largest. The representative
    subset takes the extreme blocks.
    """
    if triton is None:
        return
    blocks_t = [2**k for k in range(4, 12)]  # _block_t: 16 … 2048
    blocks_b = [2**k for k in range(4, 11)]  # 16 … 1024
    block_pairs = [(t, blocks_b[-1]) for t in blocks_t] + [(blocks_t[-1], b) for b in blocks_b[:-1]]
    for dtype, mask, (block_t, block_b), global_baseline in itertools.product(
            ("fp32", "bf16", "fp16"), ("u8", "fp32"), block_pairs, (True, False)):
        types = {name: f"*{dtype}" for name in ("policy_ptr", "best_ptr", "anchor_ptr")}
        types.update({name: f"*{mask}" for name in ("policy_mask_ptr", "best_mask_ptr")})
        types.update(rewards_ptr="*fp32", anchor_rewards_ptr="*fp32", rows_ptr="*fp32", grad_rows_ptr="*fp32",
                     loss_ptr="*fp32", metrics_ptr="*fp32", ticket_ptr="*i32", baseline_ptr="*fp32",
                     penalty="fp32", beta="fp32", one_minus_beta="fp32", gamma="fp32")
        signature = tuning.runtime_signature(_jbond_fwd_kernel, types)
        yield tuning.Launch(
            kernel=_jbond_fwd_kernel, label=f"{dtype} mask:{mask} T{block_t} B{block_b}"
            + (" global-baseline" if global_baseline else ""), signature=signature,
            constexprs=dict(BLOCK_T=block_t, BLOCK_B=block_b, GLOBAL_BASELINE=global_baseline), num_warps=4,
            num_stages=3, aligned=frozenset(n for n, t in signature.items() if t.startswith("*")),
            representative=dtype == "fp32" and mask == "u8" and block_t in (16, 2048) and block_b == 1024,
        )
    for dtype, mask, block_t, (policy_grad, best_grad) in itertools.product(
            ("fp32", "bf16", "fp16"), ("u8", "fp32"), blocks_t, ((True, True), (True, False), (False, True))):
        types = {"grad_loss_ptr": "*fp32", "grad_rows_ptr": "*fp32", "policy_mask_ptr": f"*{mask}",
                 "best_mask_ptr": f"*{mask}", "grad_policy_ptr": f"*{dtype}", "grad_best_ptr": f"*{dtype}",
                 "beta": "fp32", "one_minus_beta": "fp32", "gamma": "fp32"}
        signature = tuning.runtime_signature(_jbond_bwd_kernel, types)
        tl_dtype = _TL_DTYPES[{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]]
        yield tuning.Launch(
            kernel=_jbond_bwd_kernel, label=f"{dtype} mask:{mask} T{block_t} policy:{policy_grad} best:{best_grad}",
            signature=signature,
            constexprs=dict(POLICY_GRAD=policy_grad, BEST_GRAD=best_grad, POLICY_DTYPE=tl_dtype, BEST_DTYPE=tl_dtype,
                            BLOCK_T=block_t),
            num_warps=4, num_stages=3, aligned=frozenset(n for n, t in signature.items() if t.startswith("*")),
            representative=mask == "u8" and block_t == 2048 and policy_grad and best_grad and dtype in ("fp32", "bf16"),
        )


# --------------------------------------------------------------------------- #
# Public entry point
# --------------------------------------------------------------------------- #


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
    *,
    backend: str = "auto",
    batch_sum: BatchSum | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """J-BOND surrogate loss and metrics (SPEC §5 step 6), fused.

    Args:
        policy_logps:      [B, T] log π_t of the policy sample's tokens (with grad).
        policy_mask:       [B, T] its response mask (bool or 0/1).
        best_anchor_logps: [B, T'] log π_t of the better anchor sample's tokens (with grad).
        best_anchor_mask:  [B, T'] its response mask.
        anchor_logps:      [B, T] log π_anc of the policy sample's tokens (no grad; masked by policy_mask).
        rewards:           [B] reward of the policy sample.
        anchor_rewards:    [B, 2] rewards of the two anchor samples.
        beta:  Jeffreys weight in [0, 1].
        gamma: weight ≥ 0 of the KL(π ‖ π_anc) regularizer.
        backend: "auto" (triton on CUDA, chunked elsewhere), "reference", "chunked" or "triton".
        batch_sum: these rows are one rank's share of a larger batch; a function summing a
            tensor over every share (e.g. an all-reduce over ranks). The leave-one-out baseline
            is then the whole batch's; the metrics stay those of these rows.
    Returns:
        (loss, metrics): a scalar to minimize (fp32; fp64 for fp64 log-probs) and a
        dict of detached scalars: "loss" and METRIC_NAMES.
    """
    resolved = resolve_backend(backend, policy_logps)
    if resolved == "reference":
        return jbond_loss_ref(policy_logps, policy_mask, best_anchor_logps, best_anchor_mask, anchor_logps,
                              rewards, anchor_rewards, beta=beta, gamma=gamma, batch_sum=batch_sum)
    _validate(policy_logps, policy_mask, best_anchor_logps, best_anchor_mask, anchor_logps, rewards, anchor_rewards,
              beta, gamma)
    beta, gamma = float(beta), float(gamma)
    total, count = _baseline_totals(policy_logps, policy_mask, anchor_logps, rewards, anchor_rewards, batch_sum)
    fused = resolved == "triton" and triton is not None
    if fused:
        dtypes = {policy_logps.dtype, best_anchor_logps.dtype, anchor_logps.dtype}
        fused = dtypes <= set(_TL_DTYPES) and policy_logps.shape[0] > 0
    function = _JBondTriton if fused else _JBondChunked
    loss, metrics = function.apply(policy_logps, policy_mask, best_anchor_logps, best_anchor_mask,
                                   anchor_logps.detach(), rewards, anchor_rewards, beta, gamma, total, count)
    return loss, _metrics_dict(loss, metrics)
