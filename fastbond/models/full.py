"""The full form: every weight of the policy is trained; the anchor is a whole second copy, π_ref a third."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastbond.anchor import local_tensor
from fastbond.errors import FastbondError
from fastbond.models.form import Models, Placer, PolicyForm
from fastbond.models.loading import is_adapter_dir, load_frozen, load_policy, model_sources


class FullForm(PolicyForm):
    name = "full"

    def build(self, config, placer: Placer, needs_anchor: bool, resume: Path | None) -> Models:
        policy_source, reference_source = model_sources(config)
        # one process: fp32 master weights, low precision through autocast; ZeRO: the compute dtype
        policy = load_policy(config, resume or policy_source, placer.trained_dtype, placer.load_device)
        policy, anchor = placer.train(policy, anchor=needs_anchor)
        reference = placer.frozen(load_frozen(config, reference_source, placer.compute_dtype, placer.load_device))
        return Models(tokenizer=None, policy=policy, reference=reference, reward_fn=None, anchor=anchor)

    def save_policy(self, models: Models, placer: Placer, path: Path) -> None:
        placer.write_pretrained(models.policy, path, models.tokenizer, placer.trained_state())

    def export(self, models: Models, placer: Placer, path: Path) -> None:
        self.save_policy(models, placer, path)  # a checkpoint's policy/ is already the plain model

    @property
    def judges_live_policy(self) -> bool:
        """The live policy is the export, weight for weight: the run's own models judge it."""
        return True

    def judged_policy(self, config, policy_dir: Path, device: torch.device) -> nn.Module:
        if is_adapter_dir(policy_dir):
            raise FastbondError(f"{policy_dir} holds a LoRA adapter, but the run's config has model.lora.r=0; "
                                "pass the run's model.lora keys as overrides")
        return load_policy(config, policy_dir, torch.float32, device).eval()

    def held_tensors(self, models: Models) -> tuple[dict[str, list], dict[str, list]]:
        policy = {"policy params": [local_tensor(p) for p in models.policy.parameters()]}
        anchor = {} if models.anchor is None else {
            "anchor params": [local_tensor(p) for p in models.anchor.model.parameters()]}
        return policy, anchor
