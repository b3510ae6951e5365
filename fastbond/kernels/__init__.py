"""Fused ops of fastbond, each with `reference`, `chunked` and `triton` backends.

The public API, importable as `from fastbond.kernels import …`:

    linear_logprobs(hidden, weight, targets, …)       token log-probs (and entropy) from hidden
                                                      states and the LM head, no [N, V] logits
    jbond_loss(policy_logps, policy_mask, …)          the J-BOND loss head: token log-probs → loss
    jbond_linear_loss(policy_hidden, …, weight, …)    J-BOND from hidden states and the LM head
    ema_(anchor, policy, eta, …)                      the anchor's EMA, in place, fp32 state

and the plain PyTorch references each is tested against: `linear_logprobs_ref`,
`jbond_loss_ref`, `jbond_linear_loss_ref`, `ema_reference`. Every op takes
`backend="auto" | "reference" | "chunked" | "triton"`; `auto` runs Triton on
CUDA and the chunked PyTorch backend elsewhere.

Submodules (`fastbond.kernels.linear_logprobs`, …) share names with the
functions above; import them with `importlib.import_module` when the module
itself is wanted. `fastbond.kernels.tuning` lists the tile configurations the
CUDA dispatch may launch and `python -m fastbond.kernels.compile_check`
compiles every one of them for sm_80 and sm_90.
"""

from fastbond.kernels.ema import ema_, ema_reference
from fastbond.kernels.jbond_linear import jbond_linear_loss, jbond_linear_loss_ref
from fastbond.kernels.jbond_loss import jbond_loss, jbond_loss_ref
from fastbond.kernels.linear_logprobs import linear_logprobs, linear_logprobs_ref
from fastbond.kernels.sequences import BatchSum

__all__ = [
    "BatchSum",
    "ema_",
    "ema_reference",
    "jbond_linear_loss",
    "jbond_linear_loss_ref",
    "jbond_loss",
    "jbond_loss_ref",
    "linear_logprobs",
    "linear_logprobs_ref",
]
