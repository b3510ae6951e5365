"""`DeepSpeedEngine`: the engine seam under DeepSpeed ZeRO 0-3, one process per rank.

`ZeroPlacer` holds what the run's policy form builds on this rank (the
trained module under a `ZeroOptimizer`, a whole anchor partitioned like it,
reference and reward sharded or replicated). The engine adds the step's
collectives (batch-wide sums, agreement on skipped steps and on failed
rollouts, metric means),
sharded checkpoints and the consolidated export, written as the form says.
"""

from __future__ import annotations

import atexit
import copy
import json
import shutil
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fastbond.checkpoint import checkpoint_name, join_tensors, publish, split_tensors
from fastbond.engines.base import Engine
from fastbond.engines.deepspeed import zero
from fastbond.engines.deepspeed.config import build_deepspeed_config
from fastbond.errors import FastbondError
from fastbond.failures import Failure
from fastbond.metrics_log import to_float
from fastbond.models import Models, Placer, build_models, compute_dtype, judged_models, make_form

CPU = torch.device("cpu")
MAX_SUFFIX = "_max"  # metrics reduced over ranks by their maximum, not their mean


def _reward_module(reward_fn):
    """The reward model inside a RewardFunction of kind "model" (`_ModelScorer.model`), or None."""
    return getattr(getattr(reward_fn, "fn", None), "model", None)


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def _rank_file(directory: Path, rank: int, world: int) -> Path:
    return directory / f"rank{rank:05d}-of-{world:05d}.safetensors"


class ZeroPlacer(Placer):
    """This rank's share: the trained module under a `ZeroOptimizer`, frozen models sharded or replicated
    (engine.reference_sharding). Models load on the CPU; DeepSpeed moves (and partitions) them."""

    def __init__(self, config, ds_config: dict, device: torch.device, main: bool):
        self.config = config
        self.ds_config = ds_config
        self.device = device
        self.main = main
        self.load_device = CPU
        self.compute_dtype = compute_dtype(config)
        self.trained_dtype = self.compute_dtype  # DeepSpeed keeps the fp32 master copy itself
        self.optimizer: zero.ZeroOptimizer | None = None

    def train(self, module: nn.Module, anchor: bool = False):
        anchor_model = copy.deepcopy(module) if anchor else None  # before the engine partitions the module
        self.optimizer = zero.ZeroOptimizer(module, self.config, self.ds_config, self.device)
        built = zero.build_anchor(self.optimizer, anchor_model) if anchor_model is not None else None
        return self.optimizer.model, built

    @property
    def release_gathered(self):
        if self.optimizer is None or self.optimizer.zero_stage != 3:
            return None
        return partial(zero.release_gathered, self.optimizer.model)

    def frozen(self, module: nn.Module) -> nn.Module:
        return zero.frozen_model(module, self.ds_config, self.config.engine.reference_sharding, self.compute_dtype,
                                 self.device)

    def reward(self, reward_fn):
        model = _reward_module(reward_fn)
        if model is not None:
            reward_fn.fn.model = self.frozen(model)
            reward_fn.fn.device = self.device
        return reward_fn

    def gathered(self, params: list) -> AbstractContextManager:
        return zero.gathered_parameters(params)

    def trained_state(self, select=None):
        return self.optimizer.consolidated_state_dict(select=select)

    def write_pretrained(self, module: nn.Module, path: Path, tokenizer, state: dict | None = None) -> None:
        zero.write_pretrained(module, state if self.main else None, path, tokenizer)

    def barrier(self) -> None:
        dist.barrier()


class DeepSpeedEngine(Engine):
    def __init__(self, config):
        self.config = config
        self.rank, self.world, self.device = zero.init_distributed()
        self.ds_config = build_deepspeed_config(config, self.world)
        self.form = make_form(config)
        self.placer = ZeroPlacer(config, self.ds_config, self.device, self.main)
        self.models: Models | None = None
        self.optimizer: zero.ZeroOptimizer | None = None

    # ------------------------------------------------------------------ models

    def build(self, config, needs_anchor: bool, checkpoint: Path | None) -> Models:
        """The run's models on this rank, through the form and `ZeroPlacer`.

        The trained tensors always start from the initial source: on resume the
        DeepSpeed checkpoint overwrites weights, master copy and moments (`restore`).
        """
        self.models = build_models(config, self.form, self.placer, needs_anchor)
        self.optimizer = self.placer.optimizer
        if self.main:
            held = self.form.held_tensors(self.models)
            reference = self.models.reference if self.form.reference_is_a_model else None
            print(self.optimizer.memory_report(held, self.models.anchor, reference,
                                               _reward_module(self.models.reward_fn)), flush=True)
        return self.models

    def evaluation_models(self, policy_dir: Path) -> Models | None:
        """Plain one-process models loaded from the exported policy, on rank 0 alone."""
        return judged_models(self.config, policy_dir, self.device) if self.main else None

    # ------------------------------------------------------------------ a step

    def autocast(self):
        return self.optimizer.autocast()

    def generation(self, model: nn.Module) -> AbstractContextManager[bool]:
        return zero.gathered_for_generation(model, self.config.engine.generation_gather)

    def gathered(self, params: list) -> AbstractContextManager:
        return zero.gathered_parameters(params)

    @property
    def batch_sum(self):
        return _sum_over_ranks

    def step(self, loss: torch.Tensor) -> tuple[bool, float]:
        return self.optimizer.step(loss)

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    def all_true(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item() > 0)

    def close(self) -> None:
        zero.leave_process_group()

    def first_failure(self, failure: Failure | None) -> Failure | None:
        """One all-reduce of a flag; only when some rank failed, every rank's failure text is gathered."""
        if self.all_true(failure is None):
            return None
        failures: list[Failure | None] = [None] * self.world
        dist.all_gather_object(failures, failure)
        # The launcher stops every rank as soon as one exits non-zero: each waits at exit for the others,
        # so that none is stopped before the main rank has shown the failure.
        atexit.register(zero.leave_together)
        return next(f for f in failures if f is not None)

    @property
    def saves_alone(self) -> bool:
        return self.world == 1

    def reduce_metrics(self, metrics: dict) -> dict[str, float]:
        """Means over ranks; a maximum (a name ending in `_max`, e.g. rollout/logp_gap_max) stays a maximum."""
        reduced = {}
        for names, op in (([n for n in sorted(metrics) if not n.endswith(MAX_SUFFIX)], dist.ReduceOp.SUM),
                          ([n for n in sorted(metrics) if n.endswith(MAX_SUFFIX)], dist.ReduceOp.MAX)):
            if not names:
                continue
            stacked = torch.tensor([to_float(metrics[n]) for n in names], dtype=torch.float64, device=self.device)
            dist.all_reduce(stacked, op=op)
            if op == dist.ReduceOp.SUM:
                stacked /= self.world
            reduced.update(zip(names, stacked.tolist()))
        return reduced

    # ------------------------------------------------------------------ checkpoints
    #
    #   checkpoints/step-000123/
    #     zero/                       DeepSpeed's sharded checkpoint (weights, fp32 master, Adam, schedule)
    #     anchor/                     the anchor's fp32 EMA state, one safetensors file per rank (ZeRO-3)
    #     rank00000-of-00002.safetensors   a rank's own state (RNG, algorithm): tensors + JSON metadata
    #     policy/                     the consolidated policy, transformers format
    #     state.json                  step, the shared state (data position, skipped steps), engine counters,
    #                                 world size
    #
    # All ranks write into one temporary sibling; rank 0 renames it into place
    # and then moves `latest`, as in the one-process `fastbond.checkpoint`.

    def save(self, checkpoints_dir: Path, step: int, shared: dict, own: dict, keep: int) -> Path:
        """Collective: every rank writes its part; returns the checkpoint directory."""
        final = checkpoints_dir / checkpoint_name(step)
        tmp = checkpoints_dir / f".tmp-{final.name}"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        self.optimizer.save_checkpoint(tmp)
        if self.models.anchor is not None:
            self.models.anchor.save(tmp / "anchor")
        tensors: dict[str, torch.Tensor] = {}
        skeleton = split_tensors(own, tensors)
        save_file(tensors, str(_rank_file(tmp, self.rank, self.world)), metadata={"state": json.dumps(skeleton)})
        self.form.save_policy(self.models, self.placer, tmp / "policy")  # collective; ends with a barrier
        if self.main:
            state = {"shared": shared, "engine": self.optimizer.state_dict(), "world_size": self.world}
            (tmp / "state.json").write_text(json.dumps({"step": step, "state": state}))
        dist.barrier()  # every rank's files are in place
        if self.main:
            publish(tmp, final, keep)
        dist.barrier()
        return final

    def restore(self, checkpoint: Path) -> tuple[int, dict, dict]:
        """Continue from `save`'s checkpoint, on the same number of ranks (collective)."""
        try:
            meta = json.loads((checkpoint / "state.json").read_text())
        except (OSError, ValueError) as error:
            raise FastbondError(f"cannot read checkpoint {checkpoint}: {error}") from None
        state = meta["state"]
        saved_world = state.get("world_size")
        if saved_world is None:
            raise FastbondError(f"checkpoint {checkpoint} was written by a one-process run; resume it without DeepSpeed")
        if int(saved_world) != self.world:
            raise FastbondError(f"checkpoint {checkpoint} was saved on {saved_world} ranks, this run has {self.world}")
        rank_file = _rank_file(checkpoint, self.rank, self.world)
        if not rank_file.is_file():
            raise FastbondError(f"checkpoint {checkpoint} lacks {rank_file.name}")
        self.optimizer.load_checkpoint(checkpoint)
        self.optimizer.load_state_dict(state["engine"])
        if self.models.anchor is not None:
            self.models.anchor.load(checkpoint / "anchor")
        with safe_open(str(rank_file), framework="pt") as handle:
            skeleton = json.loads(handle.metadata()["state"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return int(meta["step"]), state["shared"], join_tensors(skeleton, tensors)

    def export(self, path: Path) -> None:
        """The trained policy, consolidated, in transformers format, as the form writes it (rank 0 writes;
        collective)."""
        self.form.export(self.models, self.placer, path)
