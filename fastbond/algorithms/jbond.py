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

J-BOND needs only two decisions per prompt, so it also runs on a pairwise
judge (reward.kind=pairwise, `fastbond.judges`) in 3 comparisons a prompt:
y'₁ against y'₂ (which anchor sample is y_bo2) and y against each of y'₁, y'₂
(whether y is worse than both). `judged_rewards` writes the outcomes as
pseudo-rewards on which the scalar path takes exactly those decisions.
"""

from __future__ import annotations

import torch

from fastbond.algorithms.base import Algorithm, Batch, Context, policy_metrics
from fastbond.algorithms.sections import JBondSection
from fastbond.bon import best_of_n_index
from fastbond.judges import wins
from fastbond.kernels.jbond_linear import jbond_linear_loss
from fastbond.logprobs import LMHead, response_tokens, through_lm_head
from fastbond.rollout import Prompts, Samples, concat_samples


def better_anchor_rows(anchor_rewards: torch.Tensor) -> torch.Tensor:
    """[B] row of each prompt's better anchor sample in the [p0 × 2, p1 × 2, …] layout (first on a tie)."""
    best = best_of_n_index(anchor_rewards)
    return torch.arange(anchor_rewards.shape[0], device=best.device) * anchor_rewards.shape[1] + best


def judged_rewards(ctx: Context, prompts: Prompts, policy_samples: Samples,
                   anchor_samples: Samples) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """J-BOND's decisions by the run's pairwise judge, 3 comparisons a prompt in one call:
    (pseudo-rewards [B] of the policy samples, [B, 2] of the anchor samples, metrics).

    Pseudo-rewards rather than a second decision path: the fused loss (and its Triton kernel) then
    takes the decisions with the very comparisons it makes on scalar rewards, and no decision is
    written twice. They encode exactly the two decisions of SPEC §5, with the scalar rules for ties:

        anchor samples   1 for the one that beat the other, 0 otherwise; a tie is [0, 0], so the
                         first maximal one, y'₁, is y_bo2 (`better_anchor_rows`), as on equal rewards
        policy sample    −1 if it lost to both anchor samples, else +1; the anchors' minimum is 0, so
                         r(y) < min(r(y'₁), r(y'₂)) exactly when y lost both, and a tie with either
                         anchor sample is not "worse than both", as r(y) = r(y') is not (`jbond_reward`)

    They are no rewards: the batch says so (`scalar=False`) and the loop logs none.
    """
    size, judge = len(prompts.texts), ctx.judge
    policy, first, second = policy_samples.texts, anchor_samples.texts[0::2], anchor_samples.texts[1::2]
    before = judge.comparisons
    # rows: y'₁ vs y'₂, then y vs y'₁, then y vs y'₂ (+1 where the first of a pair is better)
    outcomes = judge(prompts.texts * 3, first + policy + policy, second + first + second)
    outcomes = outcomes.view(3, size).to(policy_samples.sequences.device)
    between_anchors, against_first, against_second = outcomes
    anchor_rewards = torch.stack([between_anchors > 0, between_anchors < 0], dim=-1).float()
    lost_both = (against_first < 0) & (against_second < 0)
    rewards = torch.where(lost_both, -1.0, 1.0)
    metrics = {
        "judge_comparisons_per_prompt": torch.tensor((judge.comparisons - before) / size),
        # the policy sample's share of its 2 comparisons with the anchor samples, a tie counting half
        "win_rate_vs_anchor": wins(outcomes[1:]).mean().float(),
    }
    return rewards, anchor_rewards, metrics


class JBond(Algorithm):
    config: JBondSection

    def rollout(self, ctx: Context, prompts: Prompts) -> Batch:
        policy_samples = ctx.draw(ctx.policy, prompts)
        if ctx.judge is not None:
            anchor_samples = ctx.draw(ctx.anchor.model, prompts.repeated(2))  # as `draw_k` draws them
            rewards, anchor_rewards, metrics = judged_rewards(ctx, prompts, policy_samples, anchor_samples)
            return Batch({"policy": policy_samples, "anchor": anchor_samples},
                         {"policy": rewards, "anchor": anchor_rewards}, scalar=False, metrics=metrics)
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
        if batch.scalar:
            metrics["anchor_reward"] = anchor_rewards.float().mean()
        return loss, metrics

    def after_step(self, ctx: Context, step: int) -> None:
        ctx.anchor.update(ctx.policy, self.config.eta)
