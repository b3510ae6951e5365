"""The models of a run, assembled once for every engine: the form's roles, the tokenizer, the reward."""

from __future__ import annotations

from pathlib import Path

import torch

from fastbond.models.form import Models, Placer, PolicyForm
from fastbond.models.loading import compute_dtype, load_frozen, load_run_reward, load_tokenizer, model_sources
from fastbond.models.registry import make_form


def build_models(config, form: PolicyForm, placer: Placer, needs_anchor: bool, resume: Path | None = None) -> Models:
    """The run's models placed by `placer`: `form`'s policy, anchor and π_ref, the initial policy's
    tokenizer, and the reward (a reward model placed like π_ref). `resume`: a checkpoint's `policy/`."""
    tokenizer = load_tokenizer(model_sources(config)[0], config.model.trust_remote_code)
    models = form.build(config, placer, needs_anchor, resume)
    models.tokenizer = tokenizer
    models.reward_fn = placer.reward(load_run_reward(config, tokenizer, placer.load_device, placer.compute_dtype))
    return models


def judged_models(config, policy_dir: Path, device: torch.device) -> Models:
    """One-process models that judge a trained policy against π_ref: `policy_dir` is an export, or a
    checkpoint's `policy/` (the form says how to read it); π_ref and the reward as in training."""
    policy_source, reference_source = model_sources(config)
    dtype = compute_dtype(config)
    tokenizer = load_tokenizer(policy_source, config.model.trust_remote_code)
    policy = make_form(config).judged_policy(config, Path(policy_dir), device)
    return Models(
        tokenizer=tokenizer,
        policy=policy,
        reference=load_frozen(config, reference_source, dtype, device),
        reward_fn=load_run_reward(config, tokenizer, device, dtype),
    )
