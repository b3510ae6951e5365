"""What each algorithm samples and which loss it minimizes, per training step.

An algorithm has three hooks the trainer calls in order:
  rollout(ctx, prompts) -> Batch       sample responses and score them (no grad)
  loss(ctx, batch) -> (loss, metrics)  log-probs through the fused LM head, then the objective
  after_step(ctx, step)                move the anchor (EMA or hard copy)

The objectives themselves live in `fastbond.losses` (and the fused J-BOND
head in `fastbond.kernels.jbond_loss`); nothing here touches an optimizer.

Under DeepSpeed each rank holds a share of the batch; the Context then
carries the two collectives an algorithm needs (gathering a ZeRO-3 model
around sampling, and a sum over ranks for the batch-wide leave-one-out
baselines), and is otherwise the same.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from fastbond import losses
from fastbond.anchor import EMAAnchor
from fastbond.bon import best_of_n_index
from fastbond.config import AlgorithmConfig, TrainConfig
from fastbond.kernels.jbond_loss import jbond_loss as fused_jbond_loss
from fastbond.logprobs import response_logprobs
from fastbond.rollout import KeyedNoise, Samples, sample


def _no_gather(model: nn.Module) -> AbstractContextManager[bool]:
    """One process: nothing to gather before sampling, and no rank to keep in step with."""
    return nullcontext(False)


@dataclass
class Context:
    """Everything an algorithm may read: models, tokenizer, reward, config."""

    config: TrainConfig
    policy: nn.Module
    reference: nn.Module
    tokenizer: object
    reward_fn: Callable[[list[str], list[str]], torch.Tensor]
    anchor: EMAAnchor | None = None
    backend: str = "auto"
    # Under DeepSpeed: gathers a ZeRO-3 model for sampling and yields whether `generate`
    # needs synced_gpus (`fastbond.deepspeed_engine.gathered_for_generation`).
    generation: Callable[[nn.Module], AbstractContextManager[bool]] = _no_gather
    # Under DeepSpeed: the sum of a tensor over all ranks (each holds a share of the batch).
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    # rollout.sampler=keyed: the row keys of the split-invariant sampler.
    noise: KeyedNoise | None = None

    @property
    def algo(self) -> AlgorithmConfig:
        return self.config.algorithm


@dataclass
class Prompts:
    texts: list[str]
    ids: torch.Tensor  # [B, P] left-padded
    mask: torch.Tensor  # [B, P]
    # Each row's prompt index in the whole step's batch (over all ranks) and its sample number.
    index: list[int] = field(default_factory=list)
    sample: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.index = self.index or list(range(len(self.texts)))
        self.sample = self.sample or [0] * len(self.texts)

    def repeated(self, times: int) -> "Prompts":
        """Each prompt `times` times in a row: [p0, p0, …, p1, p1, …]."""
        return Prompts(
            [t for t in self.texts for _ in range(times)],
            self.ids.repeat_interleave(times, dim=0),
            self.mask.repeat_interleave(times, dim=0),
            [i for i in self.index for _ in range(times)],
            [j for _ in self.index for j in range(times)],
        )

    def rows(self, rows: list[int]) -> "Prompts":
        """The rows `rows` of these prompts, keeping their batch index and sample number."""
        index = torch.tensor(rows, device=self.ids.device, dtype=torch.long)
        return Prompts([self.texts[i] for i in rows], self.ids[index], self.mask[index],
                       [self.index[i] for i in rows], [self.sample[i] for i in rows])


@dataclass
class Batch:
    """A scored rollout. `samples` name → Samples; `rewards` name → [B] or [B, k]."""

    samples: dict[str, Samples]
    rewards: dict[str, torch.Tensor]

    @property
    def policy_rewards(self) -> torch.Tensor:
        return self.rewards["policy"]

    def all_rewards(self) -> list[torch.Tensor]:
        return list(self.rewards.values())


def concat_samples(first: Samples, second: Samples, pad_token_id: int) -> Samples:
    """Stack two batches over the same prompt layout into one, padding responses
    to a common length, so both go through one forward pass."""
    assert first.prompt_length == second.prompt_length
    length = max(first.responses.shape[1], second.responses.shape[1])

    def pad(samples: Samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        extra = length - samples.responses.shape[1]
        seq = nn.functional.pad(samples.sequences, (0, extra), value=pad_token_id)
        att = nn.functional.pad(samples.attention_mask, (0, extra), value=0)
        res = nn.functional.pad(samples.response_mask, (0, extra), value=False)
        return seq, att, res

    a, b = pad(first), pad(second)
    return Samples(
        torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), torch.cat([a[2], b[2]]),
        first.prompt_length, first.texts + second.texts,
    )


def _score(ctx: Context, prompts: list[str], samples: Samples) -> torch.Tensor:
    return ctx.reward_fn(prompts, samples.texts).to(samples.sequences.device)


def _draw(ctx: Context, model: nn.Module, prompts: Prompts) -> Samples:
    rollout = ctx.config.rollout
    keys = ctx.noise.row_keys(prompts.index, prompts.sample) if ctx.noise is not None else None
    with ctx.generation(model) as synced:
        return sample(model, ctx.tokenizer, prompts.ids, prompts.mask, rollout.max_new_tokens, rollout.temperature,
                      synced_gpus=synced, row_keys=keys)


def _batch_baseline(ctx: Context, returns: Callable[[], torch.Tensor]) -> dict:
    """The loss's baseline arguments: {} in one process (the baseline of the rows at hand);
    over ranks, Σ `returns()` and the size of the whole batch, so that every rank's
    leave-one-out baseline is the one-process baseline of the whole batch."""
    if ctx.all_reduce_sum is None:
        return {}
    local = returns().detach().double()
    total = ctx.all_reduce_sum(torch.stack([local.sum(), torch.tensor(float(local.numel()), dtype=torch.float64,
                                                                        device=local.device)]))
    return {"baseline_sum": total[0].float(), "baseline_count": int(round(float(total[1])))}


def _draw_k(ctx: Context, model: nn.Module, prompts: Prompts, k: int) -> tuple[Samples, torch.Tensor]:
    """k samples per prompt in one generate call; rewards [B, k]."""
    many = prompts.repeated(k)
    drawn = _draw(ctx, model, many)
    return drawn, _score(ctx, many.texts, drawn).view(len(prompts.texts), k)


def _logps(ctx: Context, model: nn.Module, samples: Samples, entropy: bool = False):
    return response_logprobs(
        model, samples, temperature=ctx.config.rollout.temperature, backend=ctx.backend, return_entropy=entropy
    )


@torch.no_grad()
def _frozen_logps(ctx: Context, model: nn.Module, samples: Samples) -> torch.Tensor:
    return _logps(ctx, model, samples)


def _common_metrics(ctx: Context, policy_samples: Samples, policy_logps, ref_logps, entropy) -> dict:
    mask = policy_samples.response_mask
    seq = (policy_logps.detach() * mask).sum(-1)
    ref_seq = (ref_logps * mask).sum(-1)
    return {
        "kl_ref": (seq - ref_seq).mean(),
        "length": policy_samples.lengths.float().mean(),
        "entropy": (entropy * mask).sum() / mask.sum().clamp(min=1),
    }


class Algorithm:
    """Base: an algorithm holds no state across steps unless it says so."""

    needs_anchor = False

    def after_step(self, ctx: Context, step: int) -> None:
        """Move the anchor, if the algorithm has one."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class JBond(Algorithm):
    """J-BOND (SPEC §5): 1 policy sample + 2 anchor samples per prompt, EMA anchor."""

    needs_anchor = True

    def rollout(self, ctx: Context, prompts: Prompts) -> Batch:
        policy_samples = _draw(ctx, ctx.policy, prompts)
        anchor_samples, anchor_rewards = _draw_k(ctx, ctx.anchor.model, prompts, 2)
        rewards = _score(ctx, prompts.texts, policy_samples)
        return Batch({"policy": policy_samples, "anchor": anchor_samples},
                     {"policy": rewards, "anchor": anchor_rewards})

    def loss(self, ctx: Context, batch: Batch):
        policy_samples = batch.samples["policy"]
        anchor_rewards = batch.rewards["anchor"]
        size = anchor_rewards.shape[0]
        # The better of the two anchor samples, first on a tie (SPEC §5 step 2).
        best = best_of_n_index(anchor_rewards)
        best_rows = torch.arange(size, device=best.device) * 2 + best
        best_anchor = batch.samples["anchor"].select(best_rows)

        both = concat_samples(policy_samples, best_anchor, ctx.tokenizer.pad_token_id)
        logps, entropy = _logps(ctx, ctx.policy, both, entropy=True)
        policy_logps, best_logps = logps[:size], logps[size:]
        anchor_logps = _frozen_logps(ctx, ctx.anchor.model, policy_samples)
        ref_logps = _frozen_logps(ctx, ctx.reference, policy_samples)
        width = policy_samples.responses.shape[1]
        baseline = _batch_baseline(ctx, lambda: losses.jbond_returns(
            policy_logps[:, :width], policy_samples.response_mask, anchor_logps, batch.policy_rewards, anchor_rewards,
        ))
        loss, metrics = fused_jbond_loss(
            policy_logps[:, :width], policy_samples.response_mask,
            best_logps, both.response_mask[size:],
            anchor_logps, batch.policy_rewards, anchor_rewards,
            beta=ctx.algo.beta, gamma=ctx.algo.gamma, backend=ctx.backend, **baseline,
        )
        metrics = dict(metrics)
        metrics.update(_common_metrics(ctx, policy_samples, policy_logps[:, :width], ref_logps, entropy[:size, :width]))
        metrics["anchor_reward"] = anchor_rewards.float().mean()
        return loss, metrics

    def after_step(self, ctx: Context, step: int) -> None:
        ctx.anchor.update(ctx.policy, ctx.config.anchor.eta)


class BondN(Algorithm):
    """BOND-N (SPEC §6): Jeffreys divergence to BoN_N of a fixed base (π_ref), MC quantiles."""

    needs_anchor = False

    def base(self, ctx: Context) -> nn.Module:
        return ctx.reference

    def rollout(self, ctx: Context, prompts: Prompts) -> Batch:
        policy_samples = _draw(ctx, ctx.policy, prompts)
        k = max(ctx.algo.mc_samples, ctx.algo.n)
        base_samples, base_rewards = _draw_k(ctx, self.base(ctx), prompts, k)
        rewards = _score(ctx, prompts.texts, policy_samples)
        return Batch({"policy": policy_samples, "base": base_samples}, {"policy": rewards, "base": base_rewards})

    def loss(self, ctx: Context, batch: Batch):
        policy_samples = batch.samples["policy"]
        base_rewards = batch.rewards["base"]
        size, k = base_rewards.shape
        # Forward KL: the best of the first N base samples is a BoN_N sample.
        best = best_of_n_index(base_rewards[:, : ctx.algo.n])
        best_base = batch.samples["base"].select(torch.arange(size, device=best.device) * k + best)

        both = concat_samples(policy_samples, best_base, ctx.tokenizer.pad_token_id)
        logps, entropy = _logps(ctx, ctx.policy, both, entropy=True)
        width = policy_samples.responses.shape[1]
        policy_logps, best_logps = logps[:size, :width], logps[size:]
        base_logps = _frozen_logps(ctx, self.base(ctx), policy_samples)
        ref_logps = base_logps if self.base(ctx) is ctx.reference else _frozen_logps(ctx, ctx.reference, policy_samples)
        mc_rewards = base_rewards[:, : ctx.algo.mc_samples]
        baseline = _batch_baseline(ctx, lambda: losses.bond_returns(
            policy_logps, policy_samples.response_mask, base_logps, batch.policy_rewards, mc_rewards, n=ctx.algo.n,
        ))
        loss, metrics = losses.bond_loss(
            policy_logps, policy_samples.response_mask, best_logps, both.response_mask[size:],
            base_logps, batch.policy_rewards, mc_rewards,
            n=ctx.algo.n, beta=ctx.algo.beta, **baseline,
        )
        metrics = dict(metrics)
        metrics.update(_common_metrics(ctx, policy_samples, policy_logps, ref_logps, entropy[:size, :width]))
        return loss, metrics


class IterativeBond(BondN):
    """Iterative BOND (SPEC §4): BOND-n against a moving anchor, hard-copied every K steps."""

    needs_anchor = True

    def base(self, ctx: Context) -> nn.Module:
        return ctx.anchor.model

    def after_step(self, ctx: Context, step: int) -> None:
        if step % ctx.algo.anchor_period == 0:
            ctx.anchor.reset_to(ctx.policy)


class VBoN(Algorithm):
    """vBoN (Amini et al.): backward KL to BoN_N(π_ref) through the reward CDF, fixed π_ref."""

    needs_anchor = False

    def rollout(self, ctx: Context, prompts: Prompts) -> Batch:
        policy_samples = _draw(ctx, ctx.policy, prompts)
        _, ref_rewards = _draw_k(ctx, ctx.reference, prompts, ctx.algo.mc_samples)
        rewards = _score(ctx, prompts.texts, policy_samples)
        return Batch({"policy": policy_samples}, {"policy": rewards, "reference": ref_rewards})

    def loss(self, ctx: Context, batch: Batch):
        policy_samples = batch.samples["policy"]
        policy_logps, entropy = _logps(ctx, ctx.policy, policy_samples, entropy=True)
        ref_logps = _frozen_logps(ctx, ctx.reference, policy_samples)
        baseline = _batch_baseline(ctx, lambda: losses.vbon_returns(
            policy_logps, policy_samples.response_mask, ref_logps, batch.policy_rewards, batch.rewards["reference"],
            n=ctx.algo.n,
        ))
        loss, metrics = losses.vbon_loss(
            policy_logps, policy_samples.response_mask, ref_logps,
            batch.policy_rewards, batch.rewards["reference"], n=ctx.algo.n, **baseline,
        )
        metrics = dict(metrics)
        metrics.update(_common_metrics(ctx, policy_samples, policy_logps, ref_logps, entropy))
        return loss, metrics


class Rloo(Algorithm):
    """REINFORCE with a leave-one-out baseline over 2 policy samples per prompt (the paper's baseline)."""

    needs_anchor = False
    samples_per_prompt = 2

    def rollout(self, ctx: Context, prompts: Prompts) -> Batch:
        drawn, rewards = _draw_k(ctx, ctx.policy, prompts, self.samples_per_prompt)
        return Batch({"policy": drawn}, {"policy": rewards})

    def loss(self, ctx: Context, batch: Batch):
        drawn = batch.samples["policy"]
        rewards = batch.rewards["policy"]  # [B, S]
        size, per = rewards.shape
        policy_logps, entropy = _logps(ctx, ctx.policy, drawn, entropy=True)
        ref_logps = _frozen_logps(ctx, ctx.reference, drawn)
        shape = (size, per, -1)
        loss, metrics = losses.rloo_loss(
            policy_logps.view(shape), drawn.response_mask.view(shape), ref_logps.view(shape),
            rewards, beta_rl=ctx.algo.beta_rl,
        )
        metrics = dict(metrics)
        metrics.update(_common_metrics(ctx, drawn, policy_logps, ref_logps, entropy))
        return loss, metrics


class BoNBoN(Algorithm):
    """BoNBoN (Gui et al.), offline: the best and worst of n π_ref samples per
    prompt, drawn the first time a prompt is seen and reused for the whole run."""

    needs_anchor = False

    def __init__(self):
        # prompt text → (best response ids, worst response ids), as token lists
        self._pairs: dict[str, tuple[list[int], list[int]]] = {}

    def _draw_pairs(self, ctx: Context, prompts: Prompts) -> None:
        fresh = [i for i, text in enumerate(prompts.texts) if text not in self._pairs]
        if not fresh:
            return
        subset = prompts.rows(fresh)
        n = ctx.algo.n
        drawn, rewards = _draw_k(ctx, ctx.reference, subset, n)
        best, worst = best_of_n_index(rewards).tolist(), best_of_n_index(-rewards).tolist()
        for row, text in enumerate(subset.texts):
            chosen, rejected = drawn.response_ids(row * n + best[row]), drawn.response_ids(row * n + worst[row])
            self._pairs[text] = (chosen, rejected)

    def rollout(self, ctx: Context, prompts: Prompts) -> Batch:
        self._draw_pairs(ctx, prompts)
        pad = ctx.tokenizer.pad_token_id
        pairs = [self._pairs[text] for text in prompts.texts]
        chosen = Samples.from_responses(prompts.ids, prompts.mask, [c for c, _ in pairs], pad)
        rejected = Samples.from_responses(prompts.ids, prompts.mask, [r for _, r in pairs], pad)
        policy = _draw(ctx, ctx.policy, prompts)  # only to monitor the policy's reward and KL
        return Batch(
            {"chosen": chosen, "rejected": rejected, "policy": policy},
            {"policy": _score(ctx, prompts.texts, policy)},
        )

    # The offline pairs are part of a run's state: a resumed run must train on
    # the same pairs, not on freshly drawn ones.
    def state_dict(self) -> dict:
        return {"pairs": {text: [chosen, rejected] for text, (chosen, rejected) in self._pairs.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._pairs = {text: (list(pair[0]), list(pair[1])) for text, pair in state.get("pairs", {}).items()}

    def loss(self, ctx: Context, batch: Batch):
        chosen, rejected = batch.samples["chosen"], batch.samples["rejected"]
        size = chosen.sequences.shape[0]
        both = concat_samples(chosen, rejected, ctx.tokenizer.pad_token_id)
        logps = _logps(ctx, ctx.policy, both)
        ref = _frozen_logps(ctx, ctx.reference, both)
        mask = both.response_mask
        loss, metrics = losses.bonbon_loss(
            logps[:size], mask[:size], logps[size:], mask[size:], ref[:size], ref[size:],
            n=ctx.algo.n, alpha=ctx.algo.bonbon_alpha,
        )
        policy_samples = batch.samples["policy"]
        with torch.no_grad():
            policy_logps, entropy = _logps(ctx, ctx.policy, policy_samples, entropy=True)
        metrics = dict(metrics)
        metrics.update(_common_metrics(
            ctx, policy_samples, policy_logps, _frozen_logps(ctx, ctx.reference, policy_samples), entropy
        ))
        return loss, metrics


ALGORITHMS = {
    "jbond": JBond,
    "bond": BondN,
    "iterative_bond": IterativeBond,
    "vbon": VBoN,
    "bonbon": BoNBoN,
    "rloo": Rloo,
}


def make_algorithm(name: str):
    return ALGORITHMS[name]()
