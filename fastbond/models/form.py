"""How the policy is held (`PolicyForm`), where an engine puts what a form builds (`Placer`), and what a
run ends up with (`Models`).

A form knows what there is to hold: full weights (`fastbond.models.full.FullForm`), or LoRA adapters
on one frozen base (`fastbond.lora.LoraForm`). It builds the three roles — the policy, the anchor,
π_ref — says which tensors the optimizer and the EMA own, what a checkpoint's `policy/` holds, how
the trained policy is exported, how each role's weights are pushed to a sampler that holds its own
copy, and how an exported policy is judged. An engine knows where things go: one device, or
DeepSpeed ZeRO over K ranks; it hands the form a `Placer` and never asks which form it is.

Adding a form (QLoRA, FSDP's own flat parameters, …) is one module with a `PolicyForm` and a line in
`fastbond.models.registry.FORMS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Models:
    """The models of a run, placed (and under DeepSpeed partitioned) by the engine that built them.

    `policy` is the module the optimizer trains and the fused log-prob path runs; `reference` and
    `anchor.model` are roles (`fastbond.roles`: a module, or a view of a shared one).
    """

    tokenizer: Any
    policy: nn.Module
    reference: Any
    reward_fn: Any  # fastbond.rewards.RewardFunction, or a fastbond.judges.PairwiseJudge (reward.kind=pairwise)
    anchor: Any = None  # fastbond.anchor.EMAAnchor / ShardedEMAAnchor, when the algorithm has one
    # each role's weights for a sampler that holds its own copy (vLLM); None: the role modules' own parameters
    role_weights: Any = None


class Placer(ABC):
    """Where an engine holds the models a form builds: one device, or DeepSpeed ZeRO over K ranks."""

    main: bool = True  # the rank that writes files
    load_device: torch.device  # where models are loaded before they are placed
    compute_dtype: torch.dtype  # model.dtype: frozen weights, and every weight under DeepSpeed
    trained_dtype: torch.dtype  # a wholly trained model's weights: fp32 masters in one process, else compute
    # after an EMA update under ZeRO-3: drops the gathered copies of a shared module (None elsewhere)
    release_gathered: Callable[[], None] | None = None

    @abstractmethod
    def train(self, module: nn.Module, anchor: bool = False) -> tuple[nn.Module, Any]:
        """Place `module`, whose parameters with requires_grad the optimizer then trains; returns the
        module to run and, with `anchor`, an EMA anchor of the whole module placed exactly like it."""

    @abstractmethod
    def frozen(self, module: nn.Module) -> nn.Module:
        """Place a model that is only evaluated (π_ref)."""

    def reward(self, reward_fn):
        """Place the reward model inside `reward_fn`, if it has one; returns the reward function."""
        return reward_fn

    @abstractmethod
    def gathered(self, params: list) -> AbstractContextManager:
        """Around reading whole `params` (ZeRO-3 gathers them; elsewhere they already are)."""

    @abstractmethod
    def trained_state(self, select: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor] | None:
        """Whole tensors of the trained module (those whose names `select` accepts) on the main rank;
        None where the live tensors are already whole (one process) or on the other ranks."""

    @abstractmethod
    def write_pretrained(self, module: nn.Module, path: Path, tokenizer, state: dict | None = None) -> None:
        """`module` in transformers format, written atomically by the main rank (collective): `state`
        instead of its own tensors where given."""

    def barrier(self) -> None:
        """Every rank waits here (one process: nothing to wait for)."""


class PolicyForm(ABC):
    """How the policy is held. A form object lives for one run and keeps what it built."""

    name: str

    @abstractmethod
    def build(self, config, placer: Placer, needs_anchor: bool, resume: Path | None) -> Models:
        """The run's policy, π_ref and anchor, placed by `placer` (tokenizer and reward are set by the
        caller). `resume`: a checkpoint's `policy/` to start the trained tensors from."""

    @abstractmethod
    def save_policy(self, models: Models, placer: Placer, path: Path) -> None:
        """A checkpoint's `policy/` (collective: every rank calls it)."""

    @abstractmethod
    def export(self, models: Models, placer: Placer, path: Path) -> None:
        """The trained policy as a plain transformers model (collective)."""

    @abstractmethod
    def judged_policy(self, config, policy_dir: Path, device: torch.device) -> nn.Module:
        """A plain one-process policy to judge, from an export (or a checkpoint's `policy/`)."""

    def merge(self, config, policy_dir: Path, out: Path, run_dir: Path) -> Path:
        """`fastbond merge`: a checkpoint's `policy/` written to `out` as a plain model (compute dtype)."""
        from fastbond.errors import FastbondError

        raise FastbondError(f"{run_dir} trains the {self.name} policy (model.lora.r=0): its policy/ is already a "
                            "whole model, nothing to merge")

    @property
    def judges_live_policy(self) -> bool:
        """Whether the run's live policy is its export weight for weight, so that the run's own models
        can judge it at the end instead of loading the export again."""
        return False

    @abstractmethod
    def held_tensors(self, models: Models) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        """Memory-report rows of what the form holds, row name → this rank's tensors: the policy's rows,
        then the anchor's (`fastbond.memory.measured_rows`)."""

    @property
    def reference_is_a_model(self) -> bool:
        """Whether π_ref is a model of its own (not a view of the policy's base) in the memory report."""
        return True
