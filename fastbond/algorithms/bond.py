"""BOND-N (SPEC §6) and iterative BOND (SPEC §4): Jeffreys divergence to Best-of-N of a base policy.

Per prompt: 1 policy sample y and k base samples (k = max(mc_samples, n)).
The forward term is supervised learning on the best of the first N base
samples (a BoN_N sample); the backward term is REINFORCE with the return
R = (N−1)·log p̂≤(y) − (ℓ(y) − log π_base(y)), p̂≤ the Monte-Carlo quantile of
y's reward among the first `mc_samples` base samples (`fastbond.losses.bond_loss`).

BOND-N's base is π_ref, fixed. Iterative BOND's base is an anchor that is
replaced by the policy every `anchor_period` steps: each round distils
BoN_n of the previous round's policy, approaching BoN_{n^M}(π_ref) after M
rounds without fixing N in advance.
"""

from __future__ import annotations

import torch
from torch import nn

from fastbond import losses
from fastbond.algorithms.base import Algorithm, Batch, Context, mean_token_entropy, policy_metrics
from fastbond.algorithms.sections import BondSection, IterativeBondSection
from fastbond.bon import best_of_n_index
from fastbond.kernels.sequences import sequence_logps
from fastbond.rollout import Prompts, concat_samples


class BondN(Algorithm):
    config: BondSection

    def base(self, ctx: Context) -> nn.Module:
        """The policy whose Best-of-N is distilled."""
        return ctx.reference

    def base_samples(self) -> int:
        return max(self.config.mc_samples, self.config.n)

    def rollout(self, ctx: Context, prompts: Prompts) -> Batch:
        policy_samples = ctx.draw(ctx.policy, prompts)
        base_samples, base_rewards = ctx.draw_k(self.base(ctx), prompts, self.base_samples())
        rewards = ctx.score(prompts.texts, policy_samples)
        return Batch({"policy": policy_samples, "base": base_samples}, {"policy": rewards, "base": base_rewards})

    def loss(self, ctx: Context, batch: Batch):
        n = self.config.n
        policy_samples = batch.samples["policy"]
        base_rewards = batch.rewards["base"]
        size, k = base_rewards.shape
        # Forward KL: the best of the first N base samples is a BoN_N sample.
        best = best_of_n_index(base_rewards[:, :n])
        best_base = batch.samples["base"].select(torch.arange(size, device=best.device) * k + best)

        both = concat_samples(policy_samples, best_base, ctx.pad_token_id)
        logps, entropy = ctx.logps(ctx.policy, both, entropy=True)
        width = policy_samples.responses.shape[1]
        policy_logps, best_logps = logps[:size, :width], logps[size:]
        base = self.base(ctx)
        base_logps = ctx.frozen_logps(base, policy_samples)
        ref_logps = base_logps if base is ctx.reference else ctx.frozen_logps(ctx.reference, policy_samples)
        loss, metrics = losses.bond_loss(
            policy_logps, policy_samples.response_mask, best_logps, both.response_mask[size:],
            base_logps, batch.policy_rewards, base_rewards[:, : self.config.mc_samples],
            n=n, beta=self.config.beta, batch_sum=ctx.batch_sum,
        )
        metrics = dict(metrics)
        policy_seq = sequence_logps(policy_logps.detach(), policy_samples.response_mask)
        metrics.update(policy_metrics(policy_samples, policy_seq, ref_logps,
                                      mean_token_entropy(entropy[:size, :width], policy_samples.response_mask)))
        return loss, metrics


class IterativeBond(BondN):
    config: IterativeBondSection

    def base(self, ctx: Context) -> nn.Module:
        return ctx.anchor.model

    def after_step(self, ctx: Context, step: int) -> None:
        if step % self.config.anchor_period == 0:
            ctx.anchor.reset_to(ctx.policy)
