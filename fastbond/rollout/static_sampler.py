"""`rollout.backend: static`: the decode loop of `fastbond.rollout.decode` behind the `Sampler` seam.

Each draw runs `Decoder.decode` on one of two models:

- **the role's own module** (`as_module(role)`, inside the engine's generation
  context, as `generate` runs): the default where nothing is captured and
  the role's weights already have the compute dtype's width. A LoRA role is
  its base with the role's adapter switched on.
- **a sampling copy** (`SamplingCopy`): one model in the compute dtype that
  every role is loaded into before its draw (`weights.stream(role)`, the
  stream vLLM reloads from: a LoRA role arrives merged, a ZeRO-3 model
  gathered a group at a time), refilled only when the role changes or its
  weights moved (`after_update`). Used when the step is captured (a graph
  reads its weights at fixed addresses, and one graph then serves every
  role) and when the role's weights are wider than the compute dtype (the
  one-process policy keeps fp32 master weights: decoding from them reads
  twice the bytes a bf16 copy does, every token, on CUDA; on CPU the
  trainer itself computes at fp32, and so does the sampler).

`rollout.static.capture`: auto captures the step on CUDA (`torch.compile`
with CUDA graphs); elsewhere, or when capture fails for an architecture,
the same loop runs eagerly and the sampler says so once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from fastbond.roles import as_module
from fastbond.rollout.decode import Decoder, transformers_model
from fastbond.rollout.generate import eos_token_ids, response_mask_from
from fastbond.rollout.keyed import KeyedNoise
from fastbond.rollout.sampler import Sampler, TrainerLogps, no_gather
from fastbond.rollout.samples import Prompts, Samples
from fastbond.rollout.weights import ModuleWeights


def say_once_on_main(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True)


def wider_than(module: nn.Module, dtype: torch.dtype) -> bool:
    """Whether most of `module`'s parameter bytes are in a floating dtype wider than `dtype`."""
    wide = total = 0
    for param in module.parameters():
        numel = int(getattr(param, "ds_numel", param.numel()))
        total += numel
        if param.is_floating_point() and param.element_size() > torch.finfo(dtype).bits // 8:
            wide += numel
    return wide * 2 > total


def needs_copy(device: torch.device, capture: bool, wide: bool) -> bool:
    """Whether to decode from a sampling copy: a captured step reads fixed addresses (one graph for every
    role); on CUDA, weights wider than the compute dtype would be read at their width every token (the
    trainer computes under autocast there). On CPU the trainer computes at the weights' own width, and so does
    eager decoding."""
    return capture or (wide and device.type == "cuda")


class SamplingCopy:
    """One model in the compute dtype that holds one role's weights at a time (see the module docstring)."""

    def __init__(self, like: nn.Module, dtype: torch.dtype, device: torch.device, weights):
        inner = transformers_model(like)
        with torch.device(device):
            self.model = type(inner)._from_config(inner.config, dtype=dtype)
        self.model.generation_config = inner.generation_config
        self.model.eval().requires_grad_(False)
        self.tensors = dict(self.model.named_parameters())
        self.tensors.update(self.model.state_dict(keep_vars=True))
        self.weights = weights
        self.held = None
        self.fills = 0
        self.fill_seconds = 0.0

    def bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.no_grad()
    def holding(self, role) -> nn.Module:
        """The copy, filled with `role`'s weights unless it holds them already."""
        if self.held is not role:
            started = time.perf_counter()
            filled = set()
            for name, tensor in self.weights.stream(role):
                if name not in self.tensors:
                    raise ValueError(f"static sampler: the sampling copy has no weight {name!r}")
                self.tensors[name].copy_(tensor)
                filled.add(name)
            unfilled = {name for name, p in self.model.named_parameters()} - filled
            if unfilled:
                raise ValueError(f"static sampler: the role's weights lack {sorted(unfilled)[0]!r}")
            self.held = role
            self.fills += 1
            self.fill_seconds += time.perf_counter() - started
        return self.model

    def stale(self) -> None:
        self.held = None


class StaticSampler(Sampler):
    """`rollout.backend: static`; see the module docstring."""

    def __init__(self, tokenizer, max_new_tokens: int, temperature: float = 1.0, noise: KeyedNoise | None = None,
                 generation: Callable[[nn.Module], AbstractContextManager[bool]] = no_gather, *,
                 max_prompt_tokens: int | None = None, capture: bool = False, eos_every: int = 0,
                 copy: SamplingCopy | None = None, say: Callable[[str], None] = say_once_on_main):
        self.tokenizer = tokenizer
        self.noise = noise
        self.generation = generation
        self.copy = copy
        self.decoder = Decoder(max_new_tokens, temperature, [], tokenizer.pad_token_id,
                               max_prompt_tokens=max_prompt_tokens, capture=capture,
                               eos_every=eos_every or (8 if capture else 1))
        self.say = say
        self._eos_known = False
        self._fills_reported = 0
        self._fill_seconds_reported = 0.0

    @classmethod
    def for_run(cls, *, config, tokenizer, policy, generation, gathered, device, weights, max_new_tokens,
                temperature, noise, **_) -> "StaticSampler":
        from fastbond.models import compute_dtype

        settings = config.rollout.static
        capture = settings.capture is True or (settings.capture == "auto" and torch.device(device).type == "cuda")
        dtype = compute_dtype(config)
        with as_module(policy) as module:
            copy = (SamplingCopy(module, dtype, torch.device(device), weights or ModuleWeights(gathered))
                    if needs_copy(torch.device(device), capture, wider_than(module, dtype)) else None)
        sampler = cls(tokenizer, max_new_tokens, temperature, noise, generation,
                      max_prompt_tokens=config.data.max_prompt_tokens, capture=capture,
                      eos_every=settings.eos_check_every, copy=copy)
        how = "a captured decode step" if capture else f"eager decoding on {torch.device(device).type}"
        if not capture and settings.capture == "auto":
            how += " (CUDA graphs need a GPU)"
        held = (f"a {str(dtype).removeprefix('torch.')} sampling copy ({copy.bytes() / 2**20:.0f} MiB)"
                if copy is not None else "each role's own weights")
        sampler.say(f"rollout.backend=static: {how}, from {held}")
        return sampler

    def start_step(self, step: int) -> None:
        if self.noise is not None:
            self.noise.start_step(step)

    def _decode(self, module: nn.Module, prompts: Prompts, keys, run_to_end: bool) -> torch.Tensor:
        if not self._eos_known:
            self.decoder.eos_ids = eos_token_ids(module, self.tokenizer)
            self._eos_known = True
        try:
            return self.decoder.decode(module, prompts.ids, prompts.mask, keys, run_to_end)
        except Exception as error:  # noqa: BLE001 - any failure to capture falls back to the eager loop
            if not self.decoder.capture:
                raise
            self.decoder.capture = False
            self.say(f"rollout.backend=static: capturing the decode step failed "
                     f"({type(error).__name__}: {str(error).splitlines()[0][:160]}); decoding eagerly")
            return self.decoder.decode(module, prompts.ids, prompts.mask, keys, run_to_end)

    def draw(self, role, prompts: Prompts, trainer_logps: TrainerLogps | None = None) -> Samples:
        keys = self.noise.row_keys(prompts.index, prompts.sample) if self.noise is not None else None
        if self.copy is not None:
            responses = self._decode(self.copy.holding(role), prompts, keys, run_to_end=False)
        else:
            with as_module(role) as module, self.generation(module) as synced:
                was_training = module.training
                module.eval()
                try:
                    responses = self._decode(module, prompts, keys, run_to_end=synced)
                finally:
                    module.train(was_training)
        return self._samples(prompts, responses)

    def _samples(self, prompts: Prompts, responses: torch.Tensor) -> Samples:
        """Laid out as `generate`'s draws are: responses as long as the longest, pad after the first EOS."""
        mask = response_mask_from(responses, self.decoder.eos_ids)
        longest = max(1, int(mask.sum(-1).max())) if len(responses) else 1
        responses, mask = responses[:, :longest], mask[:, :longest]
        responses = torch.where(mask, responses, torch.full_like(responses, self.tokenizer.pad_token_id))
        sequences = torch.cat([prompts.ids, responses], dim=1)
        attention_mask = torch.cat([prompts.mask, mask.to(prompts.mask.dtype)], dim=1)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return Samples(sequences, attention_mask, mask, prompts.ids.shape[1], texts)

    def after_update(self) -> None:
        if self.copy is not None:
            self.copy.stale()  # the policy moved, and the anchor with it

    def metrics(self) -> dict[str, float]:
        if self.copy is None:
            return {}
        metrics = {"rollout/weight_copies": float(self.copy.fills - self._fills_reported),
                   "time/sampler_copy": self.copy.fill_seconds - self._fill_seconds_reported}
        self._fills_reported, self._fill_seconds_reported = self.copy.fills, self.copy.fill_seconds
        return metrics
