"""Judging a policy at a point of its run: the reward of one sample and KL(π‖π_ref), on held-out prompts.

Each is a mean over prompts of per-prompt means, with a 95% interval of ±1.96 standard errors
over prompts. KL(π‖π_ref) is estimated by the mean of log π(y) − log π_ref(y) over the
policy's own samples, unbiased, and 0 exactly for π = π_ref. The random stream is reseeded
before every point, so a point is the same whether its run was resumed or not, and all points
share their sampling noise (common random numbers), which sharpens comparisons between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastbond.checkpoint import checkpoint_step, list_checkpoints, model_dir_damage
from fastbond.config import TrainConfig
from fastbond.evaluate import judge_policy, mean_and_stderr, reference_rewards
from fastbond.errors import FastbondError
from fastbond.process import seed_everything

Z95 = 1.96  # a two-sided 95% normal interval


@dataclass
class Judge:
    """The world every point is judged in: π_ref, the reward, the held-out prompts, sample sizes.

    Its models load when first used and are released before a run trains, so a run never holds
    them beside its own (which matters for a model that fills a GPU)."""

    config: TrainConfig
    prompts: list[str]
    _models: object = None  # fastbond.engines.Models; its policy is the initial one (step 0)

    @property
    def models(self):
        if self._models is None:
            from fastbond.models import judged_models, model_sources, resolve_device
            from fastbond.process import prepare_process

            device = resolve_device(self.config.device)
            prepare_process(self.config, device, self.config.seed)
            self._models = judged_models(self.config, model_sources(self.config)[0], device)  # the initial policy
        return self._models

    def release(self) -> None:
        if self._models is not None:
            self._models = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @property
    def settings(self) -> dict:
        """What a saved point depends on besides its run: a change re-judges every point."""
        c = self.config
        return {"prompts": len(self.prompts), "policy_samples": c.frontier.policy_samples,
                "reference_samples": c.frontier.reference_samples, "max_new_tokens": c.rollout.max_new_tokens,
                "temperature": c.rollout.temperature, "seed": c.seed}

    def _sizes(self) -> dict:
        c = self.config
        return dict(max_new_tokens=c.rollout.max_new_tokens, max_prompt_tokens=c.data.max_prompt_tokens,
                    temperature=c.rollout.temperature, batch_size=c.rollout.batch_size)

    def point(self, policy, step: int) -> dict:
        seed_everything(self.config.seed)
        rewards, kls = judge_policy(policy, self.models.reference, self.models.tokenizer, self.models.reward_fn,
                                    self.prompts, samples=self.config.frontier.policy_samples, **self._sizes())
        reward, reward_se = mean_and_stderr(rewards)
        kl, kl_se = mean_and_stderr(kls)
        return {"step": step, "reward": reward, "reward_ci": Z95 * reward_se, "kl": kl, "kl_ci": Z95 * kl_se}

    def reference_rewards(self) -> torch.Tensor:
        """[P, m] rewards of π_ref samples per held-out prompt, for the Best-of-N curve."""
        seed_everything(self.config.seed)
        return reference_rewards(self.models.reference, self.models.tokenizer, self.models.reward_fn, self.prompts,
                                 samples=self.config.frontier.reference_samples, **self._sizes())


def load_judge(config: TrainConfig) -> Judge:
    """The judge of `config`'s held-out prompts, rendered as the runs render them (data.chat_template);
    its models load when first used."""
    from fastbond.chat import render_prompts
    from fastbond.data import prompts_for
    from fastbond.models import load_tokenizer, model_sources

    data = config.data
    prompts = prompts_for(data, "eval")[: config.evaluation.max_prompts]
    if len(prompts) < 2:
        raise FastbondError(f"the frontier judges on at least 2 held-out prompts (its intervals are over prompts); "
                            f"data.eval_prompts and evaluation.max_prompts give {len(prompts)}")
    tokenizer = load_tokenizer(model_sources(config)[0], config.model.trust_remote_code)
    prompts = render_prompts(prompts, tokenizer, data.chat_template, f"data.eval_prompts ({data.eval_prompts})")
    return Judge(config, prompts)


def checkpoint_policies(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, policy directory) of every checkpoint of a run, oldest first."""
    found = []
    for checkpoint in list_checkpoints(run_dir / "checkpoints"):
        policy = checkpoint / "policy"
        problem = model_dir_damage(policy)
        if problem:
            raise FastbondError(f"cannot judge {checkpoint}: {problem}")
        found.append((checkpoint_step(checkpoint), policy))
    return found


def load_policy_at(judge: Judge, policy_dir: Path):
    from fastbond.models import load_policy

    device = next(judge.models.reference.parameters()).device
    return load_policy(judge.config, policy_dir, torch.float32, device).eval()
