"""BoNBoN (Gui et al. 2024), offline: fit the best and worst of n π_ref samples per prompt.

The first time a prompt is seen, n responses are drawn from π_ref and the
(best, worst) pair kept (first on a tie, each way); the pair is reused for
the whole run and is part of its checkpoint, so a resumed run trains on the
same pairs. The loss is SFT on the best plus an IPO-style fit of the
log-ratio margin to 1/(2β*_n) (`fastbond.losses.bonbon_loss`). A policy
sample is drawn each step only to monitor the policy's reward and KL.
"""

from __future__ import annotations

import torch

from fastbond import losses
from fastbond.algorithms.base import Algorithm, Batch, Context, mean_token_entropy, policy_metrics
from fastbond.algorithms.sections import BoNBoNSection
from fastbond.bon import best_of_n_index
from fastbond.kernels.sequences import sequence_logps
from fastbond.rollout import Prompts, Samples, concat_samples


class BoNBoN(Algorithm):
    config: BoNBoNSection

    def __init__(self, config: BoNBoNSection):
        super().__init__(config)
        # prompt text → (best response ids, worst response ids), as token lists
        self._pairs: dict[str, tuple[list[int], list[int]]] = {}

    def _draw_pairs(self, ctx: Context, prompts: Prompts) -> None:
        fresh = [i for i, text in enumerate(prompts.texts) if text not in self._pairs]
        if not fresh:
            return
        subset = prompts.rows(fresh)
        n = self.config.n
        drawn, rewards = ctx.draw_k(ctx.reference, subset, n)
        best, worst = best_of_n_index(rewards).tolist(), best_of_n_index(-rewards).tolist()
        for row, text in enumerate(subset.texts):
            chosen, rejected = drawn.response_ids(row * n + best[row]), drawn.response_ids(row * n + worst[row])
            self._pairs[text] = (chosen, rejected)

    def rollout(self, ctx: Context, prompts: Prompts) -> Batch:
        self._draw_pairs(ctx, prompts)
        pairs = [self._pairs[text] for text in prompts.texts]
        chosen = Samples.from_responses(prompts.ids, prompts.mask, [c for c, _ in pairs], ctx.pad_token_id)
        rejected = Samples.from_responses(prompts.ids, prompts.mask, [r for _, r in pairs], ctx.pad_token_id)
        policy = ctx.draw(ctx.policy, prompts)  # only to monitor the policy's reward and KL
        return Batch({"chosen": chosen, "rejected": rejected, "policy": policy},
                     {"policy": ctx.score(prompts.texts, policy)})

    # The offline pairs are part of a run's state: a resumed run must train on
    # the same pairs, not on freshly drawn ones.
    def state_dict(self) -> dict:
        return {"pairs": {text: [chosen, rejected] for text, (chosen, rejected) in self._pairs.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._pairs = {text: (list(pair[0]), list(pair[1])) for text, pair in state.get("pairs", {}).items()}

    def loss(self, ctx: Context, batch: Batch):
        chosen, rejected = batch.samples["chosen"], batch.samples["rejected"]
        size = len(chosen)
        both = concat_samples(chosen, rejected, ctx.pad_token_id)
        logps = ctx.logps(ctx.policy, both)
        ref = ctx.frozen_logps(ctx.reference, both)
        mask = both.response_mask
        loss, metrics = losses.bonbon_loss(
            logps[:size], mask[:size], logps[size:], mask[size:], ref[:size], ref[size:],
            n=self.config.n, alpha=self.config.alpha,
        )
        policy_samples = batch.samples["policy"]
        with torch.no_grad():
            policy_logps, entropy = ctx.logps(ctx.policy, policy_samples, entropy=True)
        policy_mask = policy_samples.response_mask
        metrics = dict(metrics)
        metrics.update(policy_metrics(policy_samples, sequence_logps(policy_logps, policy_mask),
                                      ctx.frozen_logps(ctx.reference, policy_samples),
                                      mean_token_entropy(entropy, policy_mask)))
        return loss, metrics
