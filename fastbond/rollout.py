"""Sampling responses with transformers' `generate` and packing them for the losses.

A `Samples` holds one response per prompt, laid out as `[prompt | response]`
with the prompts left-padded (as `generate` wants them) and the responses
right-padded after their first EOS. `response_mask` marks the response tokens
a sequence log-prob sums over: every generated token up to and including the
first EOS.

Two samplers (config `rollout.sampler`): `torch` draws with `generate`'s own
multinomial sampling from the global torch generator; `keyed` draws by
Gumbel-max with noise from a counter-based hash of (seed, step, draw, prompt
index in the batch, sample index, position, token) — the same distribution,
but a row's tokens no longer depend on which other rows share its batch or
rank, so a run split over K ranks samples exactly what one process samples.
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


# --------------------------------------------------------------------------- #
# keyed (split-invariant) sampling
# --------------------------------------------------------------------------- #

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x · constant) mod 2³² on int64 tensors holding uint32 values, without int64 overflow."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) of int64 tensors holding uint32 values."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def combine_keys(*parts: int) -> int:
    """One uint32 key of several non-negative integers, hashed in order."""
    key = torch.tensor(0x9E3779B9, dtype=torch.int64)
    for part in parts:
        key = hash32(key ^ (int(part) & _MASK32))
    return int(key)


def keyed_uniform(row_keys: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """[R, V] uniforms in (0, 1), a pure function of (row key, position, token id)."""
    device = row_keys.device
    at = hash32(row_keys.to(torch.int64) ^ hash32(torch.tensor(position + 0x632BE5AB, device=device)))
    tokens = hash32(torch.arange(vocab, device=device, dtype=torch.int64) * 0x2545 + 0x1B873593)
    bits = hash32(at[:, None] ^ tokens[None, :]) >> 8  # 24 bits: exact in float32
    return (bits.to(torch.float32) + 0.5) / float(1 << 24)


class KeyedGumbel:
    """A logits processor for greedy `generate`: logits / T plus Gumbel noise keyed per row.

    argmax(logits/T + G) with G = −log(−log U), U uniform, is a draw from
    softmax(logits/T) (the Gumbel-max trick); U comes from `keyed_uniform`.
    """

    def __init__(self, row_keys: torch.Tensor, prompt_length: int, temperature: float):
        self.row_keys = row_keys
        self.prompt_length = prompt_length
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = input_ids.shape[1] - self.prompt_length
        uniform = keyed_uniform(self.row_keys.to(scores.device), position, scores.shape[-1])
        gumbel = -torch.log(-torch.log(uniform))
        return scores.float() / self.temperature + gumbel


class KeyedNoise:
    """Row keys of the keyed sampler: (seed, step, draw within the step, prompt, sample).

    `start_step(step)` at the start of each step; each `row_keys` call is the
    next draw of that step. Every rank makes the same draws in the same order,
    so a draw number names the same rollout phase everywhere.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.step = 0
        self.draw = 0

    def start_step(self, step: int) -> None:
        self.step, self.draw = step, 0

    def row_keys(self, prompt_index: list[int], sample_index: list[int]) -> torch.Tensor:
        self.draw += 1
        base = combine_keys(self.seed, self.step, self.draw)
        return torch.tensor([combine_keys(base, p, s) for p, s in zip(prompt_index, sample_index)], dtype=torch.int64)


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    synced_gpus: bool = False,
    row_keys: torch.Tensor | None = None,
) -> Samples:
    """One response per prompt, drawn from the model's own distribution.

    top_k=0 and top_p=1 are passed explicitly: many checkpoints ship a
    generation_config with top_k=50 or top_p<1, and a truncated sampler would
    draw from a distribution other than the π whose log-probs the loss uses.
    `synced_gpus`: keep stepping until every rank is done — needed when a
    ZeRO-3 model gathers its layers during generation (each forward is a
    collective), see `fastbond.deepspeed_engine.gathered_for_generation`.
    `row_keys` ([B] int64): sample with the keyed sampler (`KeyedGumbel`)
    instead of the global torch generator.
    """
    was_training = model.training
    model.eval()
    eos_ids = _eos_ids(model, tokenizer)
    if row_keys is None:
        how = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        from transformers import LogitsProcessorList

        # Greedy over the keyed-noise scores; no warper may reshape them.
        how = dict(do_sample=False, temperature=None, top_k=None, top_p=None,
                   logits_processor=LogitsProcessorList([KeyedGumbel(row_keys, prompt_ids.shape[1], temperature)]))
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        **how,
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
