"""The engine seam: where the policy is held, how it is stepped, saved and exported. Nothing here knows BOND.

The training loop (`fastbond.train`) talks to one `Engine` and never asks how
many processes there are: every method below is a no-op or an identity in
one process and a collective under DeepSpeed, so the loop reads the same for
both. Implementations:

    local.py       `LocalEngine`: one process, plain PyTorch (CPU or one GPU)
    deepspeed/     `DeepSpeedEngine`: DeepSpeed ZeRO 0-3 over K ranks (the only importer of deepspeed)

What there is to hold (full weights, or LoRA adapters on a frozen base) is
the run's policy form (`fastbond.models.form.PolicyForm`): an engine places
what the form builds through its `Placer` and writes what the form says.

A checkpoint holds what the engine owns (weights, optimizer, anchor) and two
dicts the loop hands it: `shared`, the same on every rank (data position,
skipped steps), and `own`, each rank's (RNG states, algorithm state).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

from fastbond.failures import Failure
from fastbond.kernels.sequences import BatchSum
from fastbond.metrics_log import to_float
from fastbond.models.form import Models


class Engine(ABC):
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """The rank that logs, draws progress, evaluates and reports."""
        return self.rank == 0

    # ------------------------------------------------------------------ models

    @abstractmethod
    def build(self, config, needs_anchor: bool, checkpoint: Path | None) -> Models:
        """Load the run's models (the policy from `checkpoint` when resuming, if the engine can)."""

    @abstractmethod
    def evaluation_models(self, policy_dir: Path) -> Models | None:
        """One-process models to judge the trained policy with, on the main rank (None elsewhere)."""

    # ------------------------------------------------------------------ a step

    def autocast(self) -> AbstractContextManager:
        """Around the loss: mixed precision where the engine uses autocast."""
        return nullcontext()

    def generation(self, model: nn.Module) -> AbstractContextManager[bool]:
        """Around sampling from `model`; yields whether `generate` needs synced_gpus."""
        return nullcontext(False)

    def gathered(self, params: list) -> AbstractContextManager:
        """Around reading whole `params` (a weight push into the rollout engine): ZeRO-3 gathers them."""
        return nullcontext()

    @property
    def batch_sum(self) -> BatchSum | None:
        """Sums a tensor over the ranks that each hold a share of the batch; None in one process."""
        return None

    @abstractmethod
    def step(self, loss: torch.Tensor) -> tuple[bool, float]:
        """Backward, clip, update. (applied, grad_norm); a non-finite loss or gradient is not applied."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """The learning rate of the next step."""

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (so all ranks skip a step together, or none does)."""
        return flag

    def first_failure(self, failure: Failure | None) -> Failure | None:
        """Whether a step's rollout failed on any rank, as every rank sees it: the failure of the lowest
        rank that failed, or None. A collective (`fastbond.failures`); in one process, `failure`."""
        return failure

    def close(self) -> None:
        """After a run that completed, on every rank: release what the engine holds process-wide."""

    @property
    def saves_alone(self) -> bool:
        """Whether this process can write a checkpoint after a failure of its own: not when
        saving is a collective that other ranks, stopped elsewhere, would never join."""
        return True

    def reduce_metrics(self, metrics: dict) -> dict[str, float]:
        """Every metric as a float, averaged over ranks (each holds an equal share of the batch); a metric
        named `…_max` is the maximum over ranks."""
        return {name: to_float(value) for name, value in metrics.items()}

    # ------------------------------------------------------------------ files

    @abstractmethod
    def save(self, checkpoints_dir: Path, step: int, shared: dict, own: dict, keep: int) -> Path:
        """Write the checkpoint of `step` atomically, prune to `keep`; returns its directory."""

    @abstractmethod
    def restore(self, checkpoint: Path) -> tuple[int, dict, dict]:
        """Load what `save` wrote into the engine; returns (step, shared, own)."""

    @abstractmethod
    def export(self, path: Path) -> None:
        """The trained policy in transformers format (safetensors), written atomically."""
