"""REINFORCE with a leave-one-out baseline: the BOND paper's RLHF baseline.

Per prompt: `samples_per_prompt` policy samples (the paper: 2); each one's
return is r(y) − β_RL·(ℓ(y) − log π_ref(y)) and its baseline the mean return
of the prompt's other samples (`fastbond.losses.rloo_loss`). No anchor; the
baseline never leaves the prompt, so no sum over ranks is needed.
"""

from __future__ import annotations

from fastbond import losses
from fastbond.algorithms.base import Algorithm, Batch, Context, mean_token_entropy, policy_metrics
from fastbond.algorithms.sections import RlooSection
from fastbond.kernels.sequences import sequence_logps
from fastbond.rollout import Prompts


class Rloo(Algorithm):
    config: RlooSection

    def rollout(self, ctx: Context, prompts: Prompts) -> Batch:
        drawn, rewards = ctx.draw_k(ctx.policy, prompts, self.config.samples_per_prompt)
        return Batch({"policy": drawn}, {"policy": rewards})

    def loss(self, ctx: Context, batch: Batch):
        drawn = batch.samples["policy"]
        rewards = batch.rewards["policy"]  # [B, S]
        mask = drawn.response_mask
        policy_logps, entropy = ctx.logps(ctx.policy, drawn, entropy=True)
        ref_logps = ctx.frozen_logps(ctx.reference, drawn)
        shape = (*rewards.shape, -1)  # [B·S, T] → [B, S, T]
        loss, metrics = losses.rloo_loss(policy_logps.view(shape), mask.view(shape), ref_logps.view(shape),
                                         rewards, beta_rl=self.config.beta_rl)
        metrics = dict(metrics)
        metrics.update(policy_metrics(drawn, sequence_logps(policy_logps.detach(), mask), ref_logps,
                                      mean_token_entropy(entropy, mask)))
        return loss, metrics
