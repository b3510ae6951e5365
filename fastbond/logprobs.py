"""Token log-probs of response tokens, from final hidden states through the fused LM head.

The full `[tokens × vocab]` logits are never formed: the decoder runs without
its LM head, the hidden states of the positions that predict response tokens
are gathered, and `fastbond.kernels.linear_logprobs` reduces them against the
head chunk by chunk (Triton on CUDA). Soft-cap and temperature are applied as
the sampler applied them.
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
    result = linear_logprobs(
        predicting[mask],  # [N, H], only the N real response tokens
        head.weight,
        samples.responses[mask],
        bias=getattr(head, "bias", None),
        temperature=temperature,
        softcap=final_logit_softcap(model),
        return_entropy=return_entropy,
        backend=backend,
    )
    token_logps, entropy = result if return_entropy else (result, None)
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    logps = logps.masked_scatter(mask, token_logps)
    if not return_entropy:
        return logps
    entropies = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return logps, entropies.masked_scatter(mask, entropy.detach())
