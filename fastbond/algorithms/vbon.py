"""vBoN (Amini et al. 2024): backward KL to Best-of-N of π_ref through π_ref's reward CDF.

Per prompt: 1 policy sample y, and `mc_samples` π_ref samples that only
estimate the CDF F of π_ref's rewards. REINFORCE with a leave-one-out
baseline on A = log F(r(y)) − (ℓ(y) − log π_ref(y))/(N−1): BOND-N with β = 1,
on the paper's scale (`fastbond.losses.vbon_loss`). No anchor.
"""

from __future__ import annotations

from fastbond import losses
from fastbond.algorithms.base import Algorithm, Batch, Context, mean_token_entropy, policy_metrics
from fastbond.algorithms.sections import VBoNSection
from fastbond.kernels.sequences import sequence_logps
from fastbond.rollout import Prompts


class VBoN(Algorithm):
    config: VBoNSection

    def rollout(self, ctx: Context, prompts: Prompts) -> Batch:
        policy_samples = ctx.draw(ctx.policy, prompts)
        _, ref_rewards = ctx.draw_k(ctx.reference, prompts, self.config.mc_samples)
        rewards = ctx.score(prompts.texts, policy_samples)
        return Batch({"policy": policy_samples}, {"policy": rewards, "reference": ref_rewards})

    def loss(self, ctx: Context, batch: Batch):
        policy_samples = batch.samples["policy"]
        mask = policy_samples.response_mask
        policy_logps, entropy = ctx.logps(ctx.policy, policy_samples, entropy=True)
        ref_logps = ctx.frozen_logps(ctx.reference, policy_samples)
        loss, metrics = losses.vbon_loss(
            policy_logps, mask, ref_logps, batch.policy_rewards, batch.rewards["reference"],
            n=self.config.n, batch_sum=ctx.batch_sum,
        )
        metrics = dict(metrics)
        metrics.update(policy_metrics(policy_samples, sequence_logps(policy_logps.detach(), mask), ref_logps,
                                      mean_token_entropy(entropy, mask)))
        return loss, metrics
