"""A tiny world for driving one algorithm at a time: three different small LMs, hand-made
samples, rewards set by the test, and an independent oracle of sequence log-probs.

The policy, the anchor and π_ref are the embedded π_ref with different small
perturbations, so a term computed under the wrong model gives a different number.
The oracle runs each model's full forward (logits and log-softmax, float64), a path
that shares nothing with the fused head the algorithms use.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastbond.algorithms.base import Context
from fastbond.anchor import EMAAnchor
from fastbond.rollout import Prompts, Samples, encode_prompts

PROMPTS = ["review of the dark river :", "i thought the lost machine was", "the cast was"]
# Responses as words of the embedded grammar; "." then EOS ends each.
RESPONSES = [
    "good and the plot was bad .",
    "not very dull .",
    "charming but the music was weak .",
    "bad .",
    "great .",
    "really boring and the ending was messy .",
    "simple .",
    "wonderful and the cast was superb .",
    "quite tedious .",
]
JBOND_PENALTY = -math.log(16.0)


def perturbed(model, seed: int, scale: float = 0.05):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return other


class World:
    def __init__(self, model, tokenizer):
        self.tokenizer = tokenizer
        self.reference = model.eval().requires_grad_(False)
        self.policy = perturbed(model, 1).train().requires_grad_(True)
        anchor_start = perturbed(model, 2)
        self.anchor = EMAAnchor(anchor_start, torch.float32)

    def context(self, **kwargs) -> Context:
        reward_fn = kwargs.pop("reward_fn", lambda prompts, texts: torch.tensor([float(len(t)) for t in texts]))
        return Context(self.policy, self.reference, self.tokenizer, reward_fn, self.anchor, max_new_tokens=6,
                       backend="chunked", **kwargs)

    def prompts(self, texts=PROMPTS) -> Prompts:
        ids, mask = encode_prompts(self.tokenizer, list(texts), 32, torch.device("cpu"))
        return Prompts(list(texts), ids, mask)

    def samples(self, prompts: Prompts, responses: list[str]) -> Samples:
        """Rows of `prompts` (in order) answered with `responses` (words, EOS appended)."""
        ids = [self.tokenizer.convert_tokens_to_ids(text.split()) + [self.tokenizer.eos_token_id]
               for text in responses]
        return Samples.from_responses(prompts.ids, prompts.mask, ids, self.tokenizer.pad_token_id, texts=responses)


def seq_logps(model, samples: Samples) -> torch.Tensor:
    """[B] Σ log π(y_t) over response tokens, from the model's full logits, float64 (the oracle)."""
    positions = (samples.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(samples.sequences, attention_mask=samples.attention_mask, position_ids=positions).logits
    start = samples.prompt_length
    logp = torch.log_softmax(logits[:, start - 1 : -1].double(), -1)
    logp = logp.gather(-1, samples.responses.unsqueeze(-1)).squeeze(-1)
    return torch.where(samples.response_mask, logp, torch.zeros_like(logp)).sum(-1)


def leave_one_out(values: torch.Tensor) -> torch.Tensor:
    return (values.sum() - values) / (values.numel() - 1)


def policy_grads(loss: torch.Tensor, policy) -> list[torch.Tensor]:
    params = [p for p in policy.parameters() if p.requires_grad]
    return [g.double() for g in torch.autograd.grad(loss, params, allow_unused=False)]


def assert_same_step(loss, expected, policy):
    """The algorithm's loss and its gradient w.r.t. every policy weight equal the oracle's.

    Both run the models in float32 along different paths, so the gradients agree to float32
    rounding (~1e-5 of the largest entry); a miswired term changes them at order 1.
    """
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-6)
    for got, want in zip(policy_grads(loss, policy), policy_grads(expected, policy)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-9)


@pytest.fixture
def world(reference):
    model, tokenizer = reference
    torch.manual_seed(0)
    return World(copy.deepcopy(model), tokenizer)


class Recorder:
    """Wraps a Context's sampling to record which model each draw used, and how many per prompt."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.draws: list[tuple[object, int]] = []
        real_draw = ctx.draw

        def draw(model, prompts):
            self.draws.append((model, len(prompts.texts)))
            return real_draw(model, prompts)

        ctx.draw = draw
