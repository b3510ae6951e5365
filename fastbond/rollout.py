"""Sampling responses with transformers' `generate` and packing them for the losses.

A `Samples` holds one response per prompt, laid out as `[prompt | response]`
with the prompts left-padded (as `generate` wants them) and the responses
right-padded after their first EOS. `response_mask` marks the response tokens
a sequence log-prob sums over: every generated token up to and including the
first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastbond.errors import FastbondError


@dataclass
class Samples:
    sequences: torch.Tensor  # [B, P + T] prompt (left-padded) then response (right-padded)
    attention_mask: torch.Tensor  # [B, P + T] 1 on real prompt tokens and response tokens
    response_mask: torch.Tensor  # [B, T] bool, response tokens (through the first EOS)
    prompt_length: int  # P
    texts: list[str]  # decoded responses, without special tokens

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def response_ids(self, row: int) -> list[int]:
        """The response tokens of one row (through its EOS), as a list."""
        return self.responses[row][self.response_mask[row]].tolist()

    @staticmethod
    def from_responses(
        prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: list[list[int]], pad_token_id: int,
        texts: list[str] | None = None,
    ) -> "Samples":
        """Re-assemble a batch from stored response token lists (offline data)."""
        length = max(1, max(len(r) for r in responses))
        padded = torch.full((len(responses), length), pad_token_id, dtype=prompt_ids.dtype)
        mask = torch.zeros((len(responses), length), dtype=torch.bool)
        for row, tokens in enumerate(responses):
            padded[row, : len(tokens)] = torch.tensor(tokens, dtype=prompt_ids.dtype)
            mask[row, : len(tokens)] = True
        padded, mask = padded.to(prompt_ids.device), mask.to(prompt_ids.device)
        return Samples(
            torch.cat([prompt_ids, padded], dim=1),
            torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1),
            mask,
            prompt_ids.shape[1],
            texts if texts is not None else [""] * len(responses),
        )

    def select(self, index: torch.Tensor) -> "Samples":
        """The rows `index` ([B'] long) of this batch."""
        rows = index.tolist()
        return Samples(
            self.sequences[index],
            self.attention_mask[index],
            self.response_mask[index],
            self.prompt_length,
            [self.texts[i] for i in rows],
        )


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int, device: torch.device):
    """Left-padded prompt ids and mask; a prompt over the limit is an error naming it."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
    lengths = encoded["attention_mask"].sum(-1)
    too_long = (lengths > max_prompt_tokens).nonzero().flatten().tolist()
    if too_long:
        i = too_long[0]
        raise FastbondError(
            f"prompt {i} has {int(lengths[i])} tokens, over data.max_prompt_tokens={max_prompt_tokens}: "
            f"{prompts[i][:60]!r}"
        )
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def response_mask_from(responses: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """[B, T] bool: tokens up to and including the first EOS (all tokens if none)."""
    is_eos = torch.zeros_like(responses, dtype=torch.bool)
    for eos in eos_token_ids:
        is_eos |= responses == eos
    # Number of EOS strictly before each position: 0 means "still in the response".
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    return eos_before == 0


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    synced_gpus: bool = False,
) -> Samples:
    """One response per prompt, drawn from the model's own distribution.

    top_k=0 and top_p=1 are passed explicitly: many checkpoints ship a
    generation_config with top_k=50 or top_p<1, and a truncated sampler would
    draw from a distribution other than the π whose log-probs the loss uses.
    `synced_gpus`: keep stepping until every rank is done — needed when a
    ZeRO-3 model gathers its layers during generation (each forward is a
    collective), see `fastbond.deepspeed_engine.gathered_for_generation`.
    """
    was_training = model.training
    model.eval()
    eos_ids = _eos_ids(model, tokenizer)
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids or None,
        synced_gpus=synced_gpus,
    )
    model.train(was_training)
    prompt_length = prompt_ids.shape[1]
    responses = output[:, prompt_length:]
    mask = response_mask_from(responses, eos_ids)
    # Pad after the first EOS, so identical responses are identical tensors.
    responses = torch.where(mask, responses, torch.full_like(responses, tokenizer.pad_token_id))
    sequences = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Samples(sequences, attention_mask, mask, prompt_length, texts)
