"""Per-sequence reductions shared by the fused losses and their references.

    sequence_logps(token_logps [B, T], mask [B, T]) -> [B]     masked sum over a response
    leave_one_out_baseline(returns, ...) -> same shape          mean of the *other* returns
    batch_total(returns [B], batch_sum) -> (Σ R, count)          over the whole batch, all ranks

`batch_sum` is how a loss computed on one rank's share of a batch reaches
the rest of it: a function that sums a small tensor over every share (an
all-reduce over ranks under DeepSpeed, `None` in one process). Losses take it
instead of pre-computed totals because the returns they sum depend on the
policy's own log-probs, which only exist inside the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["BatchSum", "batch_total", "leave_one_out_baseline", "sequence_logps"]

# Sums a tensor over every share of the batch (e.g. all-reduce over ranks); returns the sum.
BatchSum = Callable[[torch.Tensor], torch.Tensor]


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
    number (`batch_total`). By default the batch is `returns` itself.
    """
    if (total is None) != (count is None):
        raise ValueError("a batch-wide baseline needs both the batch's total and its count")
    if total is None:
        total, count = returns.sum(dim=dim, keepdim=True), returns.shape[dim]
    elif returns.dim() != 1:
        raise ValueError("a batch-wide baseline needs 1-D returns")
    else:
        total = torch.as_tensor(total, dtype=returns.dtype, device=returns.device)
    if int(count) == 1:
        return torch.zeros_like(returns)
    return (total - returns) / (count - 1)


def batch_total(returns: torch.Tensor, batch_sum: BatchSum) -> tuple[torch.Tensor, int]:
    """(Σ R, size) of the whole batch these 1-D `returns` are a share of, through `batch_sum`.

    Summed in float64 so the total does not depend on how the batch is split.
    """
    local = torch.stack([returns.detach().double().sum(),
                         torch.tensor(float(returns.numel()), dtype=torch.float64, device=returns.device)])
    total = batch_sum(local)
    return total[0].to(returns.dtype), int(round(float(total[1])))
