"""The optimization engine: the seam between the trainer and how weights are updated.

`TorchEngine` is one process, plain PyTorch (CPU or one GPU): AdamW, linear
warm-up, gradient clipping, and a guard that keeps a non-finite loss or
gradient out of the weights. A DeepSpeed engine with the same methods slots in
behind the same seam; nothing here knows about BOND.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from contextlib import nullcontext

import torch
from torch import nn

from fastbond.config import EngineConfig, OptimConfig
from fastbond.errors import FastbondError


def launched_distributed(environ: Mapping[str, str] = os.environ) -> bool:
    """Started by `deepspeed` or `torchrun`: both set LOCAL_RANK for every process they start."""
    return "LOCAL_RANK" in environ


def resolve_engine_kind(engine: EngineConfig, environ: Mapping[str, str] = os.environ) -> str:
    """"torch" or "deepspeed" for engine.kind; auto means deepspeed exactly under a distributed launch."""
    if engine.kind != "auto":
        return engine.kind
    if launched_distributed(environ):
        return "deepspeed"
    if engine.zero_stage or engine.offload_optimizer or engine.offload_params or engine.deepspeed_config:
        raise FastbondError(
            f"engine.zero_stage={engine.zero_stage} needs DeepSpeed: launch with "
            "`deepspeed --num_gpus K --module fastbond train CONFIG`, or set engine.kind=deepspeed"
        )
    return "torch"


def warmup_lambda(warmup_steps: int):
    """Linear warm-up from 1/warmup to 1, then constant (the paper's schedule)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class TorchEngine:
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
