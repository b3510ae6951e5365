"""What an algorithm is, and what it may use.

An algorithm has three hooks the training loop calls in order, each step:

    rollout(ctx, prompts) -> Batch       sample responses and score them (no grad)
    loss(ctx, batch) -> (loss, metrics)  log-probs through the fused LM head, then the objective
    after_step(ctx, step)                move the anchor (EMA or hard copy), if it has one

It is configured by its section of the config (`fastbond.algorithms.sections`)
and holds no state across steps unless it says so in `state_dict`. It never
touches an optimizer, a file or a process group: everything it needs from
the run comes through the `Context`, so an algorithm can be driven in a test
with a tiny model and a stub reward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from fastbond.algorithms.sections import AlgorithmSection
from fastbond.errors import FastbondError
from fastbond.judges import PairwiseJudge
from fastbond.kernels.sequences import BatchSum
from fastbond.logprobs import response_logprobs
from fastbond.roles import as_module
from fastbond.rollout import Prompts, Samples
from fastbond.rollout.sampler import GenerateSampler, Sampler

if TYPE_CHECKING:
    from fastbond.anchor import EMAAnchor, ShardedEMAAnchor

RewardFn = Callable[[list[str], list[str]], torch.Tensor]


@dataclass
class Context:
    """What an algorithm may use: the models, the reward, how to sample and how to score.

    `reward_fn` scores one response at a time, or is a `PairwiseJudge` that compares two
    (reward.kind=pairwise: `judge` is then set, and `score` refuses). `sampler` draws
    responses (`fastbond.rollout.sampler`; by default `generate` with `max_new_tokens`
    and `temperature`). `batch_sum` is the engine's
    (`fastbond.engines`): under DeepSpeed it sums a tensor over the ranks that
    each hold a share of the batch (for batch-wide baselines).
    """

    policy: nn.Module
    reference: nn.Module
    tokenizer: object
    reward_fn: RewardFn | PairwiseJudge
    anchor: "EMAAnchor | ShardedEMAAnchor | None" = None
    max_new_tokens: int = 64
    temperature: float = 1.0
    backend: str = "auto"
    batch_sum: BatchSum | None = None
    sampler: Sampler | None = None

    def __post_init__(self):
        if self.sampler is None:
            self.sampler = GenerateSampler(self.tokenizer, self.max_new_tokens, self.temperature)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def draw(self, model: nn.Module, prompts: Prompts) -> Samples:
        """One response per prompt row from `model` (a role: `fastbond.roles`), through the run's sampler."""
        return self.sampler.draw(model, prompts, self.frozen_logps)

    @property
    def judge(self) -> PairwiseJudge | None:
        """The run's pairwise judge, or None when the reward scores each response."""
        return self.reward_fn if isinstance(self.reward_fn, PairwiseJudge) else None

    def score(self, prompts: list[str], samples: Samples) -> torch.Tensor:
        """[B] rewards of the samples' responses to `prompts`."""
        if self.judge is not None:  # the config refuses this pairing; a test or a new algorithm may not
            raise FastbondError(f"{self.judge.label} compares two responses, and this algorithm needs a scalar "
                                "reward of one (reward.kind)")
        return self.reward_fn(prompts, samples.texts).to(samples.sequences.device)


    def draw_k(self, model: nn.Module, prompts: Prompts, k: int) -> tuple[Samples, torch.Tensor]:
        """k responses per prompt in one generate call, [p0 × k, p1 × k, …]; rewards [B, k]."""
        many = prompts.repeated(k)
        drawn = self.draw(model, many)
        return drawn, self.score(many.texts, drawn).view(len(prompts.texts), k)

    def logps(self, model: nn.Module, samples: Samples, entropy: bool = False):
        """[B, T] token log-probs (and entropies) of the responses under `model`, through the fused head."""
        with as_module(model) as module:
            return response_logprobs(module, samples, temperature=self.temperature, backend=self.backend,
                                     return_entropy=entropy)

    @torch.no_grad()
    def frozen_logps(self, model: nn.Module, samples: Samples) -> torch.Tensor:
        """[B, T] token log-probs under a model that is not trained (anchor, reference)."""
        return self.logps(model, samples)


@dataclass
class Batch:
    """A scored rollout. `samples` name → Samples; `rewards` name → [B] or [B, k].

    `scalar` is False when `rewards` only encode a pairwise judge's decisions (J-BOND under
    reward.kind=pairwise): then there is no reward to log. `metrics`: what the rollout measured.
    """

    samples: dict[str, Samples]
    rewards: dict[str, torch.Tensor]
    scalar: bool = True
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def policy_rewards(self) -> torch.Tensor:
        return self.rewards["policy"]

    def all_rewards(self) -> list[torch.Tensor]:
        return list(self.rewards.values())


def policy_metrics(policy_samples: Samples, policy_seq: torch.Tensor, ref_logps: torch.Tensor,
                   entropy: torch.Tensor) -> dict[str, torch.Tensor]:
    """What every algorithm reports of its policy samples (SPEC §7).

    `policy_seq` [B]: their sequence log-probs under π; `ref_logps` [B, T]:
    token log-probs under π_ref; `entropy`: the mean token entropy.
    """
    mask = policy_samples.response_mask
    ref_seq = (ref_logps * mask).sum(-1)
    return {
        "kl_ref": (policy_seq.detach() - ref_seq).mean(),
        "length": policy_samples.lengths.float().mean(),
        "entropy": entropy,
    }


def mean_token_entropy(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of [B, T] token entropies over the tokens of `mask`."""
    return (entropy * mask).sum() / mask.sum().clamp(min=1)


class Algorithm:
    """Base class: configured by its section; no state across steps unless it says so."""

    def __init__(self, config: AlgorithmSection):
        self.config = config

    @property
    def needs_anchor(self) -> bool:
        return self.config.needs_anchor

    def rollout(self, ctx: Context, prompts: Prompts) -> Batch:
        raise NotImplementedError

    def loss(self, ctx: Context, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def after_step(self, ctx: Context, step: int) -> None:
        """Move the anchor, if the algorithm has one."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
