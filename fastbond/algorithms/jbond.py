"""J-BOND (SPEC §5, BOND paper Algorithm 2): distil Best-of-2 of an EMA anchor, one policy sample a prompt.

Per prompt: 1 policy sample y and 2 anchor samples y'₁, y'₂; y_bo2 is the
better of the two (first on a tie). The loss is the Jeffreys surrogate

    L = mean[ (1−β)·(−ℓ(y_bo2)) + β·(−sg(R − b)·ℓ(y)) + γ·sg(ℓ(y) − a(y))·ℓ(y) ]

with ℓ = log π_t, a = log π_anc, R = r_J(y) − (ℓ(y) − a(y)), r_J = −log 16
when y is worse than both anchor samples, b the leave-one-out mean of R over
the whole batch. After each optimizer step the anchor moves toward the policy
by η (fp32 EMA state, `fastbond.anchor`).

The loss runs as one fused op from final hidden states and the LM head
(`fastbond.kernels.jbond_linear_loss`): the policy sample's and the better
anchor sample's tokens go through one decoder forward and one pass over the
vocabulary, and no [tokens × vocab] logits exist. Where this departs from
the paper: the γ term's sign is that of eq. (19), not the one printed in
Algorithm 2 (SPEC §5).
"""

from __future__ import annotations

import torch

from fastbond.algorithms.base import Algorithm, Batch, Context, policy_metrics
from fastbond.algorithms.sections import JBondSection
from fastbond.bon import best_of_n_index
from fastbond.kernels.jbond_linear import jbond_linear_loss
from fastbond.logprobs import LMHead, response_tokens, through_lm_head
from fastbond.rollout import Prompts, Samples, concat_samples


def better_anchor_rows(anchor_rewards: torch.Tensor) -> torch.Tensor:
    """[B] row of each prompt's better anchor sample in the [p0 × 2, p1 × 2, …] layout (first on a tie)."""
    best = best_of_n_index(anchor_rewards)
    return torch.arange(anchor_rewards.shape[0], device=best.device) * anchor_rewards.shape[1] + best


class JBond(Algorithm):
    config: JBondSection

    def rollout(self, ctx: Context, prompts: Prompts) -> Batch:
        policy_samples = ctx.draw(ctx.policy, prompts)
        anchor_samples, anchor_rewards = ctx.draw_k(ctx.anchor.model, prompts, 2)
        rewards = ctx.score(prompts.texts, policy_samples)
        return Batch({"policy": policy_samples, "anchor": anchor_samples},
                     {"policy": rewards, "anchor": anchor_rewards})

    def loss(self, ctx: Context, batch: Batch):
        policy_samples: Samples = batch.samples["policy"]
        anchor_rewards = batch.rewards["anchor"]
        size = len(policy_samples)
        best_anchor = batch.samples["anchor"].select(better_anchor_rows(anchor_rewards))

        # One decoder forward over both sets; the policy sample's tokens come first (rows < B).
        tokens = response_tokens(ctx.policy, concat_samples(policy_samples, best_anchor, ctx.pad_token_id))
        n_policy = int(policy_samples.response_mask.sum())
        # Masked like the policy rows, so these line up with the packed policy tokens.
        anchor_token_logps = ctx.frozen_logps(ctx.anchor.model, policy_samples)[policy_samples.response_mask]
        ref_logps = ctx.frozen_logps(ctx.reference, policy_samples)

        def fused_loss(head: LMHead, hidden: torch.Tensor):
            return jbond_linear_loss(
                hidden[:n_policy], tokens.targets[:n_policy], tokens.rows[:n_policy],
                hidden[n_policy:], tokens.targets[n_policy:], tokens.rows[n_policy:] - size,
                head.weight, anchor_token_logps, batch.policy_rewards, anchor_rewards,
                beta=self.config.beta, gamma=self.config.gamma, bias=head.bias,
                temperature=ctx.temperature, softcap=head.softcap, backend=ctx.backend,
                return_entropy=True, batch_sum=ctx.batch_sum,
            )

        loss, metrics = through_lm_head(ctx.policy, fused_loss, tokens.hidden)
        metrics = dict(metrics)
        entropy = metrics.pop("policy_entropy")
        metrics.update(policy_metrics(policy_samples, metrics["policy_logp"], ref_logps, entropy))
        metrics["anchor_reward"] = anchor_rewards.float().mean()
        return loss, metrics

    def after_step(self, ctx: Context, step: int) -> None:
        ctx.anchor.update(ctx.policy, self.config.eta)
