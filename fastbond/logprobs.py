"""Token log-probs of response tokens, from final hidden states through the fused LM head.

The full `[tokens × vocab]` logits are never formed: the decoder runs without
its LM head, the hidden states of the positions that predict response tokens
are gathered (`response_tokens`), and a fused op reduces them against the
head chunk by chunk (Triton on CUDA): `fastbond.kernels.linear_logprobs` for
log-probs (`response_logprobs`), or a whole fused objective such as
`fastbond.kernels.jbond_linear_loss`. Soft-cap and temperature are applied as
the sampler applied them.

Under DeepSpeed ZeRO-3 the head's weight is an empty shard outside the head's
own forward. A fused op therefore runs *as* the head's forward
(`through_lm_head`), so ZeRO's hooks gather the weight before it, gather it
again before its backward, and reduce-scatter its gradient into the
partitioned parameter — exactly what happens to an ordinary `nn.Linear` head.
A LoRA-adapted head runs it as the forward of its base layer and of its
adapter's two factors, nested, and hands it the merged weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastbond.kernels.linear_logprobs import linear_logprobs
from fastbond.lora import head_parts, head_weight
from fastbond.models import final_hidden_states, final_logit_softcap, lm_head
from fastbond.rollout import Samples


@dataclass
class ResponseTokens:
    """The response tokens of a batch of samples, packed row by row (no padding)."""

    hidden: torch.Tensor  # [N, H] final hidden state at the position predicting each token
    targets: torch.Tensor  # [N] the token
    rows: torch.Tensor  # [N] the sample (row) each token belongs to


@dataclass
class LMHead:
    """What a fused op needs of the LM head, read inside the head's forward."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    softcap: float | None  # Gemma 2/3's final logit soft-cap


def response_tokens(model: nn.Module, samples: Samples) -> ResponseTokens:
    """Run the decoder (no LM head) over `samples`; the packed response tokens, row-major.

    Row-major packing is what `tensor[samples.response_mask]` gives, so any
    [B, T] per-token quantity masked the same way lines up with these tokens.
    """
    hidden = final_hidden_states(model, samples.sequences, samples.attention_mask)  # [B, P+T, H]
    start = samples.prompt_length
    predicting = hidden[:, start - 1 : -1]  # the hidden state at position i predicts token i + 1
    mask = samples.response_mask
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
    return ResponseTokens(predicting[mask], samples.responses[mask], rows[mask])


def through_lm_head(model: nn.Module, function: Callable[..., object], *args):
    """`function(head: LMHead, *args)` run as the model's LM-head forward.

    Under ZeRO-3 every hook registered on the head fires around it (gather
    before, re-gather before the backward, reduce-scatter of the gradient);
    elsewhere it is a plain call. The function must read the head only
    through its `LMHead` argument.
    """
    head = lm_head(model)
    softcap = final_logit_softcap(model)

    def forward(*inner):
        return function(LMHead(head_weight(head), getattr(head, "bias", None), softcap), *inner)

    return call_through([m for m in head_parts(head) if is_zero3_partitioned(m)], forward, *args)


def response_logprobs(
    model: nn.Module,
    samples: Samples,
    temperature: float = 1.0,
    backend: str = "auto",
    return_entropy: bool = False,
):
    """[B, T] log π(y_t | x, y_<t) on response tokens (0 elsewhere), fp32.

    Differentiable in the model's parameters when grad is enabled. With
    `return_entropy`, also [B, T] per-token entropies (detached).
    """
    tokens = response_tokens(model, samples)

    def fused_head(head: LMHead, hidden: torch.Tensor, targets: torch.Tensor):
        return linear_logprobs(hidden, head.weight, targets, bias=head.bias, temperature=temperature,
                               softcap=head.softcap, return_entropy=return_entropy, backend=backend)

    result = through_lm_head(model, fused_head, tokens.hidden, tokens.targets)
    token_logps, entropy = result if return_entropy else (result, None)
    mask = samples.response_mask
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, token_logps)
    if not return_entropy:
        return logps
    entropies = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return logps, entropies.masked_scatter(mask, entropy.detach())


def is_zero3_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters(recurse=False))


def call_through(modules: list[nn.Module], function, *args):
    """`function(*args)` run as the forward of each of `modules`, nested (the first outermost): under
    ZeRO-3 every one of them has its parameters gathered for the call and again before its backward, and
    its gradients reduce-scattered, as when a module calls its children. No modules: a plain call.
    (An adapted LM head reads three modules: the base layer and its adapter's two factors.)"""
    if not modules:
        return function(*args)
    return call_as_forward(modules[0], lambda *inner: call_through(modules[1:], function, *inner), *args)


def call_as_forward(module: nn.Module, function, *args):
    """`function(*args)` run through `module.__call__` in place of its forward, so every hook
    registered on the module (ZeRO-3's gather / release / pre-backward) fires around it."""
    previous = module.__dict__.get("forward")  # a wrapper someone installed on the instance, if any
    module.forward = function  # an instance attribute shadows the class's forward
    try:
        return module(*args)
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous
