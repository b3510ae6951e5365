"""One process, plain PyTorch (CPU or one GPU): the engine of `engine.kind: torch`.

`TorchOptimizer` is the update itself — AdamW, linear warm-up, gradient
clipping, and a guard that keeps a non-finite loss or gradient out of the
weights. `LocalPlacer` holds what the run's policy form builds on one device
(a wholly trained policy in fp32, low precision through autocast; an anchor
whose EMA state is fp32). `LocalEngine` adds atomic checkpoints
(`fastbond.checkpoint`) and the export, both written as the form says.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

from fastbond import atomic
from fastbond.anchor import EMAAnchor
from fastbond.checkpoint import load_checkpoint, save_checkpoint
from fastbond.config import OptimConfig
from fastbond.engines.base import Engine
from fastbond.errors import FastbondError
from fastbond.models import Models, Placer, build_models, compute_dtype, judged_models, make_form, resolve_device


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


class LocalPlacer(Placer):
    """Everything on one device; the optimizer is a `TorchOptimizer` over the trained module."""

    def __init__(self, config, device: torch.device):
        self.config = config
        self.load_device = device
        self.compute_dtype = compute_dtype(config)
        self.trained_dtype = torch.float32  # master weights; low precision through autocast
        self.optimizer: TorchOptimizer | None = None

    def train(self, module: nn.Module, anchor: bool = False):
        self.optimizer = TorchOptimizer(module, self.config.optim, self.compute_dtype, self.load_device)
        return module, (EMAAnchor(module, self.compute_dtype) if anchor else None)

    def frozen(self, module: nn.Module) -> nn.Module:
        return module  # loaded on the device already

    def gathered(self, params: list) -> AbstractContextManager:
        return nullcontext()

    def trained_state(self, select=None) -> None:
        return None  # the live tensors are whole

    def write_pretrained(self, module: nn.Module, path: Path, tokenizer, state: dict | None = None) -> None:
        atomic.save_pretrained(module, tokenizer, path, state_dict=state)


class _PolicyWriter:
    """What `save_checkpoint` calls `save_pretrained` on: the form's `policy/`."""

    def __init__(self, engine: "LocalEngine"):
        self.engine = engine

    def save_pretrained(self, path, safe_serialization: bool = True) -> None:
        engine = self.engine
        engine.form.save_policy(engine.models, engine.placer, Path(path))


class LocalEngine(Engine):
    def __init__(self, config):
        self.config = config
        self.device = resolve_device(config.device)
        self.form = make_form(config)
        self.placer = LocalPlacer(config, self.device)
        self.models: Models | None = None
        self.optimizer: TorchOptimizer | None = None

    def build(self, config, needs_anchor: bool, checkpoint: Path | None) -> Models:
        """The policy's trained tensors come from `checkpoint` when resuming (its `policy/`)."""
        self.models = build_models(config, self.form, self.placer, needs_anchor,
                                   checkpoint / "policy" if checkpoint else None)
        self.optimizer = self.placer.optimizer
        return self.models

    def evaluation_models(self, policy_dir: Path) -> Models:
        if self.form.judges_live_policy:
            return self.models  # the run's own models: nothing to load again
        return judged_models(self.config, policy_dir, self.device)

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
        return save_checkpoint(checkpoints_dir, step, _PolicyWriter(self), None, state, keep=keep)

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
        self.form.export(self.models, self.placer, path)
