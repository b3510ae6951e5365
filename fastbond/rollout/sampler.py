"""How responses are drawn: the `Sampler` seam (`rollout.backend`), and the `generate` sampler.

A sampler draws one response per prompt row from a role (the policy, the
anchor, π_ref) with that role's current weights. The training loop and the
evaluation sample through it alone and tell it where the run is:

    start_step(step)                    a step begins (keyed noise and checks are per step)
    draw(role, prompts, trainer_logps)  one response per row → `Samples`
    check(step, all_true)               after the rollout: one error on every rank if the draws
                                        of any rank failed the sampler's own check
    after_update()                      the policy (and the anchor) moved
    metrics()                           this step's numbers (e.g. rollout/logp_gap_max), reset
    close()                             the run is over

`trainer_logps(role, samples)` is the trainer's log-probs of drawn tokens,
for a sampler that checks itself against them (vLLM's). Implementations,
one module and a line in `fastbond.rollout.backends.SAMPLERS` each:

    generate   `GenerateSampler` (here): transformers' `generate`, from π itself
    vllm       `VLLMSampler` (vllm_sampler.py): a colocated vLLM engine, weights pushed as they change

The noise (`rollout.noise`): `torch` samples from the global torch generator;
`keyed` from hashed row keys (`KeyedNoise`), so a row's draw does not depend
on how the batch is split over ranks. vLLM always seeds each request with
its row key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from fastbond.roles import as_module
from fastbond.rollout.generate import sample
from fastbond.rollout.keyed import KeyedNoise
from fastbond.rollout.samples import Prompts, Samples

TrainerLogps = Callable[[object, Samples], torch.Tensor]


def no_gather(module: nn.Module) -> AbstractContextManager[bool]:
    """One process: nothing to gather before sampling, and no rank to keep in step with."""
    return nullcontext(False)


class Sampler(ABC):
    """What the loop and the evaluation call to draw responses; see the module docstring."""

    def start_step(self, step: int) -> None:
        """A training step begins."""

    @abstractmethod
    def draw(self, role, prompts: Prompts, trainer_logps: TrainerLogps | None = None) -> Samples:
        """One response per row of `prompts` from `role`'s current weights."""

    def check(self, step: int, all_true: Callable[[bool], bool]) -> None:
        """Raise one FastbondError, on every rank, if any rank's draws of `step` failed this sampler's check."""

    def after_update(self) -> None:
        """The trained weights moved: anything holding a copy of them is stale."""

    def metrics(self) -> dict[str, float]:
        """This step's numbers for metrics.jsonl; resets them."""
        return {}

    def close(self) -> None:
        """The run is over: release what the sampler holds."""


class GenerateSampler(Sampler):
    """`rollout.backend: generate`: transformers' `generate` on the role's module (top-k and top-p off).

    `generation(module)` is the engine's context around a draw (ZeRO-3 gathers
    the module and yields whether `generate` needs synced_gpus).
    """

    def __init__(self, tokenizer, max_new_tokens: int, temperature: float = 1.0, noise: KeyedNoise | None = None,
                 generation: Callable[[nn.Module], AbstractContextManager[bool]] = no_gather):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.noise = noise
        self.generation = generation

    def start_step(self, step: int) -> None:
        if self.noise is not None:
            self.noise.start_step(step)

    def draw(self, role, prompts: Prompts, trainer_logps: TrainerLogps | None = None) -> Samples:
        keys = self.noise.row_keys(prompts.index, prompts.sample) if self.noise is not None else None
        with as_module(role) as module, self.generation(module) as synced:
            return sample(module, self.tokenizer, prompts.ids, prompts.mask, self.max_new_tokens, self.temperature,
                          synced_gpus=synced, row_keys=keys)
