"""One process, plain PyTorch (CPU or one GPU): the engine of `engine.kind: torch`.

`TorchOptimizer` is the update itself — AdamW, linear warm-up, gradient
clipping, and a guard that keeps a non-finite loss or gradient out of the
weights. `LocalEngine` adds what a run needs around it: the models on one
device (an fp32 policy, low precision through autocast; an anchor whose EMA
state is fp32), atomic checkpoints (`fastbond.checkpoint`) and the export.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from fastbond import atomic
from fastbond.anchor import EMAAnchor
from fastbond.checkpoint import load_checkpoint, save_checkpoint
from fastbond.config import OptimConfig, replace_lora
from fastbond.engines.base import Engine, Models
from fastbond.errors import FastbondError
from fastbond.models import (
    compute_dtype,
    load_frozen,
    load_policy,
    load_run_reward,
    load_tokenizer,
    model_sources,
    resolve_device,
)


def warmup_lambda(warmup_steps: int):
    """Linear warm-up from 1/warmup to 1, then constant (the paper's schedule)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class TorchOptimizer:
    """AdamW with warm-up and clipping on one process's model; non-finite steps are not applied."""

    def __init__(self, model: nn.Module, optim: OptimConfig, compute_dtype: torch.dtype, device: torch.device):
        self.model = model
        self.device = device
        self.compute_dtype = compute_dtype
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(optim.warmup_steps))
        self.max_grad_norm = optim.max_grad_norm

    def autocast(self):
        """Mixed precision on CUDA when a low-precision dtype is asked for; master weights stay fp32."""
        if self.device.type == "cuda" and self.compute_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return nullcontext()

    def step(self, loss: torch.Tensor) -> tuple[bool, float]:
        """Backward, clip, update. Returns (applied, grad_norm).

        A non-finite loss is never back-propagated, and a non-finite gradient
        norm discards the gradients: in both cases the weights, the optimizer
        moments and the schedule are left as they were.
        """
        if not torch.isfinite(loss.detach()).item():
            self.optimizer.zero_grad(set_to_none=True)
            return False, math.nan
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        if not torch.isfinite(grad_norm).item():
            self.optimizer.zero_grad(set_to_none=True)
            return False, float(grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True, float(grad_norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def load_models(config, policy_path: str | Path | None, device: torch.device, needs_anchor: bool = False) -> Models:
    """A run's models in one process on `device`: the policy from `policy_path` (default: its
    initial source) with fp32 weights, π_ref and a reward model in the compute dtype, and an
    anchor (fp32 EMA state) when asked. The tokenizer is always the initial policy's."""
    policy_source, reference_source = model_sources(config)
    dtype = compute_dtype(config)
    tokenizer = load_tokenizer(policy_source, config.model.trust_remote_code)
    if config.model.lora.r > 0:
        return _lora_models(config, policy_path, device, needs_anchor, tokenizer)
    # The policy keeps fp32 master weights; low precision is used through autocast.
    policy = load_policy(config, policy_path or policy_source, torch.float32, device)
    return Models(
        tokenizer=tokenizer,
        policy=policy,
        reference=load_frozen(config, reference_source, dtype, device),
        reward_fn=load_run_reward(config, tokenizer, device, dtype),
        anchor=EMAAnchor(policy, dtype) if needs_anchor else None,
    )


def exported_models(config, policy_dir: Path, device: torch.device) -> Models:
    """One-process models that judge a trained policy against π_ref: `policy_dir` is an exported model, or
    a LoRA checkpoint's policy adapter. A LoRA run is judged as a plain one: its export is the merged model,
    an adapter is merged into the base here, and π_ref is the base (the run's initial policy)."""
    from fastbond import lora

    if not lora.is_adapter_dir(policy_dir):
        models = load_models(replace_lora(config, r=0), policy_dir, device)
    else:
        if config.model.lora.r == 0:
            raise FastbondError(f"{policy_dir} holds a LoRA adapter, but the run's config has model.lora.r=0; "
                                "pass the run's model.lora keys as overrides")
        models = load_models(replace_lora(config, r=0), None, device)  # the policy starts as the base
        models.policy = lora.merged_adapter(models.policy, config.model.lora, policy_dir)
    models.policy.eval()
    return models


def _lora_models(config, adapter_path, device: torch.device, needs_anchor: bool, tokenizer) -> Models:
    """LoRA: one base (compute dtype) from the run's initial policy; the policy adapter (from `adapter_path` when
    resuming), the anchor adapter, and π_ref as the base with adapters disabled (`fastbond.lora`)."""
    from fastbond import lora

    # The base is frozen: it needs no fp32 master copy, so it is held in the compute dtype; PEFT keeps the
    # adapters (the only trained tensors) in fp32.
    wrapped = lora.attach_adapters(load_policy(config, lora.base_source(config), compute_dtype(config), device),
                                   config.model.lora)
    if adapter_path is not None:  # resuming; the anchor adapter comes back with the checkpoint's state
        lora.load_policy_adapter(wrapped, adapter_path)
    return Models(
        tokenizer=tokenizer,
        policy=wrapped.get_base_model(),
        reference=lora.AdapterRole(wrapped, None),
        reward_fn=load_run_reward(config, tokenizer, device, compute_dtype(config)),
        anchor=lora.AdapterAnchor(wrapped) if needs_anchor else None,
        adapters=wrapped,
        role_weights=lora.AdapterWeights(wrapped),
    )


class LocalEngine(Engine):
    def __init__(self, config):
        self.config = config
        self.device = resolve_device(config.device)
        self.models: Models | None = None
        self.optimizer: TorchOptimizer | None = None

    def build(self, config, needs_anchor: bool, checkpoint: Path | None) -> Models:
        self.models = load_models(config, checkpoint / "policy" if checkpoint else None, self.device, needs_anchor)
        self.optimizer = TorchOptimizer(self.models.policy, config.optim, compute_dtype(config), self.device)
        return self.models

    def evaluation_models(self, policy_dir: Path) -> Models:
        if self.models.adapters is not None:  # LoRA: the exported (merged) policy against a plain π_ref
            return exported_models(self.config, policy_dir, self.device)
        return self.models  # the run's own models: nothing to load again

    def autocast(self):
        return self.optimizer.autocast()

    def step(self, loss: torch.Tensor) -> tuple[bool, float]:
        return self.optimizer.step(loss)

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    def save(self, checkpoints_dir: Path, step: int, shared: dict, own: dict, keep: int) -> Path:
        state = {"shared": shared, "own": own, "engine": self.optimizer.state_dict()}
        if self.models.anchor is not None:
            state["anchor"] = self.models.anchor.state_dict()
        return save_checkpoint(checkpoints_dir, step, self._saved_policy(), self.models.tokenizer, state, keep=keep)

    def _saved_policy(self):
        """What a checkpoint's policy/ holds: the model, or under LoRA the policy adapter alone."""
        if self.models.adapters is None:
            return self.models.policy
        from fastbond import lora

        return lora.AdapterSaver(self.models.adapters)

    def restore(self, checkpoint: Path) -> tuple[int, dict, dict]:
        """The policy's weights came with `build`; optimizer, schedule and anchor come back here."""
        if (checkpoint / "zero").is_dir():
            raise FastbondError(f"checkpoint {checkpoint} was written by a DeepSpeed run; resume it under DeepSpeed")
        step, state = load_checkpoint(checkpoint)
        self.optimizer.load_state_dict(state["engine"])
        if self.models.anchor is not None:
            self.models.anchor.load_state_dict(state["anchor"])
        return step, state["shared"], state["own"]

    def export(self, path: Path) -> None:
        if self.models.adapters is not None:  # LoRA: a plain from_pretrained model, the adapter merged in
            from fastbond import lora

            merged = lora.merged_state_dict(self.models.adapters)
            atomic.save_pretrained(self.models.policy, self.models.tokenizer, path, state_dict=merged)
            return
        atomic.save_pretrained(self.models.policy, self.models.tokenizer, path)
