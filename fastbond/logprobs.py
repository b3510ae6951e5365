"""Token log-probs of response tokens, from final hidden states through the fused LM head.

The full `[tokens × vocab]` logits are never formed: the decoder runs without
its LM head, the hidden states of the positions that predict response tokens
are gathered, and `fastbond.kernels.linear_logprobs` reduces them against the
head chunk by chunk (Triton on CUDA). Soft-cap and temperature are applied as
the sampler applied them.

Under DeepSpeed ZeRO-3 the head's weight is an empty shard outside the head's
own forward. The kernel then runs *as* the head's forward (`call_as_forward`),
so ZeRO's hooks gather the weight before it, gather it again before its
backward, and reduce-scatter its gradient into the partitioned parameter —
exactly what happens to an ordinary `nn.Linear` head.
"""

from __future__ import annotations

import torch
from torch import nn

from fastbond.kernels.linear_logprobs import linear_logprobs
from fastbond.models import final_hidden_states, final_logit_softcap, lm_head
from fastbond.rollout import Samples


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
    hidden = final_hidden_states(model, samples.sequences, samples.attention_mask)  # [B, P+T, H]
    start = samples.prompt_length
    # The hidden state at position i predicts token i + 1.
    predicting = hidden[:, start - 1 : -1]  # [B, T, H]
    mask = samples.response_mask
    head = lm_head(model)
    softcap = final_logit_softcap(model)

    def fused_head(hidden_states: torch.Tensor, targets: torch.Tensor):
        return linear_logprobs(
            hidden_states,
            head.weight,
            targets,
            bias=getattr(head, "bias", None),
            temperature=temperature,
            softcap=softcap,
            return_entropy=return_entropy,
            backend=backend,
        )

    # [N, H] hidden states of the N real response tokens, and their targets.
    inputs = (predicting[mask], samples.responses[mask])
    result = call_as_forward(head, fused_head, *inputs) if is_zero3_partitioned(head) else fused_head(*inputs)
    token_logps, entropy = result if return_entropy else (result, None)
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    logps = logps.masked_scatter(mask, token_logps)
    if not return_entropy:
        return logps
    entropies = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return logps, entropies.masked_scatter(mask, entropy.detach())


def is_zero3_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters(recurse=False))


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
