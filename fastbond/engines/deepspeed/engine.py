"""`DeepSpeedEngine`: the engine seam under DeepSpeed ZeRO 0-3, one process per rank.

Models placed for this rank (the policy under a `ZeroOptimizer`, the anchor
partitioned like it, reference and reward sharded or replicated), the step's
collectives (batch-wide sums, agreement on skipped steps, metric means),
sharded checkpoints and the consolidated export.
"""

from __future__ import annotations

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
from fastbond.engines.base import Engine, Models
from fastbond.engines.deepspeed import zero
from fastbond.engines.deepspeed.config import build_deepspeed_config
from fastbond.engines.local import exported_models
from fastbond.errors import FastbondError
from fastbond.metrics_log import to_float
from fastbond.models import (
    compute_dtype,
    load_frozen,
    load_policy,
    load_run_reward,
    load_tokenizer,
    model_sources,
)

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


class DeepSpeedEngine(Engine):
    def __init__(self, config):
        self.config = config
        self.rank, self.world, self.device = zero.init_distributed()
        self.ds_config = build_deepspeed_config(config, self.world)
        self.models: Models | None = None
        self.optimizer: zero.ZeroOptimizer | None = None

    # ------------------------------------------------------------------ models

    def build(self, config, needs_anchor: bool, checkpoint: Path | None) -> Models:
        """Policy under a `ZeroOptimizer`, the anchor partitioned like it, reference and reward
        sharded or replicated (engine.reference_sharding). Under LoRA, one frozen base holds the
        policy and anchor adapters, and π_ref is that base with adapters disabled (`_lora_models`).

        The policy is always loaded from its initial source: on resume the
        DeepSpeed checkpoint overwrites weights, master copy and moments.
        """
        policy_source, _ = model_sources(config)
        dtype = compute_dtype(config)
        tokenizer = load_tokenizer(policy_source, config.model.trust_remote_code)
        if config.model.lora.r > 0:
            policy, reference, anchor, adapters, role_weights = self._lora_models(config, needs_anchor)
        else:
            policy, reference, anchor, adapters, role_weights = *self._full_models(config, needs_anchor), None, None
        reward_fn = load_run_reward(config, tokenizer, CPU, dtype)
        reward_model = _reward_module(reward_fn)
        if reward_model is not None:
            reward_fn.fn.model = zero.frozen_model(reward_model, self.ds_config, config.engine.reference_sharding,
                                                   dtype, self.device)
            reward_fn.fn.device = self.device
        if self.main:
            print(self.optimizer.memory_report(anchor, reference if adapters is None else None, reward_model,
                                               adapters=adapters), flush=True)
        self.models = Models(tokenizer, policy, reference, reward_fn, anchor, adapters, role_weights)
        return self.models

    def _full_models(self, config, needs_anchor: bool):
        """(policy, reference, anchor): three models, the anchor partitioned exactly like the policy."""
        policy_source, reference_source = model_sources(config)
        dtype = compute_dtype(config)
        policy = load_policy(config, policy_source, dtype, CPU)
        anchor_model = copy.deepcopy(policy) if needs_anchor else None  # before the engine partitions the policy
        self.optimizer = zero.ZeroOptimizer(policy, config, self.ds_config, self.device)
        anchor = zero.build_anchor(self.optimizer, anchor_model) if anchor_model is not None else None
        reference = zero.frozen_model(load_frozen(config, reference_source, dtype, CPU), self.ds_config,
                                      config.engine.reference_sharding, dtype, self.device)
        return self.optimizer.model, reference, anchor

    def _lora_models(self, config, needs_anchor: bool):
        """(policy, reference, anchor, adapters, role weights) of LoRA (`fastbond.lora`): the base with both adapters under
        one `ZeroOptimizer` that trains the policy adapter alone. The base and the anchor adapter are frozen
        and, under ZeRO-3, partitioned like everything else; the anchor adapter's EMA runs on local shards."""
        from fastbond import lora

        dtype = compute_dtype(config)
        wrapped = lora.attach_adapters(load_policy(config, lora.base_source(config), dtype, CPU), config.model.lora)
        self.optimizer = zero.ZeroOptimizer(wrapped.get_base_model(), config, self.ds_config, self.device)
        anchor = None
        if needs_anchor:
            release = partial(zero.release_gathered, self.optimizer.model) if self.optimizer.zero_stage == 3 else None
            anchor = lora.AdapterAnchor(wrapped, dtype, release=release)
        return (self.optimizer.model, lora.AdapterRole(wrapped, None), anchor, wrapped,
                lora.AdapterWeights(wrapped, self.gathered))

    def evaluation_models(self, policy_dir: Path) -> Models | None:
        """Plain one-process models loaded from the exported policy, on rank 0 alone."""
        return exported_models(self.config, policy_dir, self.device) if self.main else None

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
        self._save_policy(tmp / "policy")  # collective; ends with a barrier
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

    def _save_policy(self, path: Path) -> None:
        """A checkpoint's policy/: the consolidated policy, or under LoRA the policy adapter alone (PEFT
        format, fp32 master tensors; the base is not saved). Collective; rank 0 writes."""
        if self.models.adapters is None:
            self.optimizer.export_pretrained(path, self.models.tokenizer)
            return
        from fastbond import lora

        state = self.optimizer.consolidated_state_dict(select=lora.is_policy_adapter)
        if self.main:
            lora.save_policy_adapter(self.models.adapters, path, self.models.tokenizer, state=state)
        dist.barrier()

    def export(self, path: Path) -> None:
        """The trained policy, consolidated, in transformers format (rank 0 writes; collective).
        Under LoRA: the base with the policy adapter merged in, in the compute dtype."""
        if self.models.adapters is None:
            self.optimizer.export_pretrained(path, self.models.tokenizer)
            return
        from fastbond import lora

        merged = lora.merged_state_dict(self.models.adapters, self.gathered, keep=self.main)
        zero.write_pretrained(self.optimizer.model, merged, path, self.models.tokenizer)
