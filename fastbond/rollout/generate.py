"""Sampling with transformers' `generate`: responses drawn from the model's own distribution."""

from __future__ import annotations

import torch
from torch import nn

from fastbond.chat import prompt_token_ids
from fastbond.errors import FastbondError
from fastbond.rollout.samples import Samples


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int, device: torch.device):
    """Padded prompt ids and mask (on the tokenizer's padding side, left for generation); a prompt over the
    limit is an error naming it. A rendered chat prompt is encoded as its template wrote it (`fastbond.chat`)."""
    rows = prompt_token_ids(tokenizer, prompts)
    lengths = [len(row) for row in rows]
    too_long = [i for i, length in enumerate(lengths) if length > max_prompt_tokens]
    if too_long:
        i = too_long[0]
        raise FastbondError(
            f"prompt {i} has {lengths[i]} tokens, over data.max_prompt_tokens={max_prompt_tokens}: "
            f"{prompts[i][:60]!r}"
        )
    width = max(lengths, default=0)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        place = slice(width - len(row), width) if tokenizer.padding_side == "left" else slice(0, len(row))
        ids[i, place] = torch.tensor(row, dtype=torch.long)
        mask[i, place] = 1
    return ids.to(device), mask.to(device)


def response_mask_from(responses: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """[B, T] bool: tokens up to and including the first EOS (all tokens if none)."""
    is_eos = torch.zeros_like(responses, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= responses == eos
    # Number of EOS strictly before each position: 0 means "still in the response".
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    return eos_before == 0


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """The ids that end a response: the model's generation config's EOS, else the tokenizer's."""
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
    row_keys: torch.Tensor | None = None,
) -> Samples:
    """One response per prompt, drawn from the model's own distribution.

    top_k=0 and top_p=1 are passed explicitly: many checkpoints ship a
    generation_config with top_k=50 or top_p<1, and a truncated sampler would
    draw from a distribution other than the π whose log-probs the loss uses.
    `synced_gpus`: keep stepping until every rank is done — needed when a
    ZeRO-3 model gathers its layers during generation (each forward is a
    collective), see `fastbond.engines.deepspeed.zero3.gathered_for_generation`.
    `row_keys` ([B] int64): sample with the keyed sampler (`fastbond.rollout.keyed.KeyedGumbel`)
    instead of the global torch generator.
    """
    was_training = model.training
    model.eval()
    eos_ids = eos_token_ids(model, tokenizer)
    if row_keys is None:
        how = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        from transformers import LogitsProcessorList

        from fastbond.rollout.keyed import KeyedGumbel

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
