"""`fastbond train` over K ranks with DeepSpeed: models, the step's collectives, checkpoints.

The trainer's loop is the same on every rank; this module supplies what
differs from one process:

  build_models()     policy under a `DeepSpeedEngine` (ZeRO 0-3), the anchor partitioned like it,
                     reference and reward model sharded or replicated (engine.reference_sharding)
  attach()           the Context hooks: gathering for generation, the batch-wide baseline's sum
  all_true(), mean_metrics()   agreement on skipped steps, metrics averaged over ranks
  save() / restore() checkpoints: DeepSpeed's sharded one, one anchor file and one RNG file per rank
  export()           the consolidated fp32 policy in transformers format (rank 0 writes)

Every rank holds `rollout.batch_size / K` prompts of each step (the trainer
splits the batch); gradients are averaged over ranks, so a step is the
one-process step on the whole batch.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from fastbond import deepspeed_engine as dse
from fastbond.checkpoint import join_tensors, publish, rng_state, set_rng_state, split_tensors
from fastbond.config import TrainConfig
from fastbond.errors import FastbondError
from fastbond.models import (
    DTYPES,
    attention_implementation,
    enable_activation_checkpointing,
    load_causal_lm,
    load_tokenizer,
)

CPU = torch.device("cpu")


def init(config: TrainConfig) -> tuple[int, int, torch.device, dict]:
    """(rank, world size, device, DeepSpeed config) after joining the process group."""
    rank, world, device = dse.init_distributed()
    return rank, world, device, dse.build_deepspeed_config(config, world)


def _reward_module(reward_fn):
    """The reward model inside a RewardFunction of kind "model" (`_ModelScorer.model`), or None."""
    return getattr(getattr(reward_fn, "fn", None), "model", None)


def build_models(config: TrainConfig, ds_config: dict, device: torch.device, needs_anchor: bool, resolve_model_path):
    """(tokenizer, engine, anchor or None, reference, reward_fn), every model placed for its rank.

    The policy is always loaded from its initial source: on resume the
    DeepSpeed checkpoint overwrites weights, master copy and moments.
    """
    from fastbond.rewards import load_reward

    policy_source = resolve_model_path(config.model.policy)
    reference_source = resolve_model_path(config.model.reference) if config.model.reference else policy_source
    dtype = DTYPES[config.model.dtype]
    attn = attention_implementation(config.model.attn_implementation, device)
    remote = config.model.trust_remote_code
    tokenizer = load_tokenizer(policy_source, remote)
    policy = load_causal_lm(policy_source, dtype, CPU, attn, remote)
    if config.model.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    policy.train()
    anchor_model = copy.deepcopy(policy) if needs_anchor else None  # before the engine partitions the policy
    engine = dse.DeepSpeedEngine(policy, config, ds_config, device)
    anchor = dse.build_anchor(engine, anchor_model) if anchor_model is not None else None
    sharding = config.engine.reference_sharding
    reference = load_causal_lm(reference_source, dtype, CPU, attn, remote)
    reference = dse.frozen_model(reference, ds_config, sharding, dtype, device)
    reward_fn = load_reward(config.reward.kind, config.reward.name, device=CPU, dtype=dtype,
                            batch_size=config.reward.batch_size, trust_remote_code=remote, policy_tokenizer=tokenizer)
    reward_model = _reward_module(reward_fn)
    if reward_model is not None:
        reward_fn.fn.model = dse.frozen_model(reward_model, ds_config, sharding, dtype, device)
        reward_fn.fn.device = device
    if dist.get_rank() == 0:
        print(engine.memory_report(anchor, reference, reward_model), flush=True)
    return tokenizer, engine, anchor, reference, reward_fn


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def attach(ctx, config: TrainConfig) -> None:
    """The Context's DeepSpeed hooks: ZeRO-3 gathering around sampling, sums over ranks."""
    mode = config.engine.generation_gather
    ctx.generation = lambda model: dse.gathered_for_generation(model, mode)
    ctx.all_reduce_sum = _sum_over_ranks


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (so all ranks skip a step together, or none does)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def mean_metrics(metrics: dict, device: torch.device) -> dict:
    """Every metric averaged over ranks (each holds an equal share of the batch); same keys everywhere."""
    from fastbond.metrics_log import to_float

    names = sorted(metrics)
    stacked = torch.tensor([to_float(metrics[name]) for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return {name: float(value) for name, value in zip(names, stacked.tolist())}


# --------------------------------------------------------------------------- #
# checkpoints
# --------------------------------------------------------------------------- #
#
#   checkpoints/step-000123/
#     zero/                       DeepSpeed's sharded checkpoint (weights, fp32 master, Adam, schedule)
#     anchor/                     the anchor's fp32 EMA state, one safetensors file per rank (ZeRO-3)
#     rank00000-of-00002.safetensors   a rank's RNG states and algorithm state (tensors + JSON metadata)
#     policy/                     the consolidated policy, transformers format
#     state.json                  step, data position, skipped steps, world size
#
# All ranks write into one temporary sibling; rank 0 renames it into place
# and then moves `latest`, as in the one-process `fastbond.checkpoint`.


def _rank_file(directory: Path, rank: int, world: int) -> Path:
    return directory / f"rank{rank:05d}-of-{world:05d}.safetensors"


def _barrier() -> None:
    dist.barrier()


def save(run, keep: int) -> Path:
    """Write the checkpoint of `run.step` on every rank (collective); returns its directory."""
    rank, world = run.rank, run.world
    checkpoints_dir = run.run_dir / "checkpoints"
    final = checkpoints_dir / f"step-{run.step:06d}"
    tmp = checkpoints_dir / f".tmp-step-{run.step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    run.engine.save_checkpoint(tmp)
    if run.ctx.anchor is not None:
        run.ctx.anchor.save(tmp / "anchor")
    tensors: dict[str, torch.Tensor] = {}
    skeleton = split_tensors({"rng": rng_state(), "algorithm": run.algorithm.state_dict()}, tensors)
    save_file(tensors, str(_rank_file(tmp, rank, world)), metadata={"state": json.dumps(skeleton)})
    run.engine.export_pretrained(tmp / "policy", run.ctx.tokenizer)  # collective; ends with a barrier
    if rank == 0:
        state = {"data": run.stream.state_dict(), "skipped": run.skipped, "engine": run.engine.state_dict(),
                 "world_size": world}
        (tmp / "state.json").write_text(json.dumps({"step": run.step, "state": state}))
    _barrier()  # every rank's files are in place
    if rank == 0:
        publish(tmp, final, keep)
    _barrier()
    return final


def restore(run, checkpoint: Path) -> None:
    """Continue from `save`'s checkpoint, on the same number of ranks (collective)."""
    try:
        meta = json.loads((checkpoint / "state.json").read_text())
    except (OSError, ValueError) as error:
        raise FastbondError(f"cannot read checkpoint {checkpoint}: {error}") from None
    state = meta["state"]
    saved_world = state.get("world_size")
    if saved_world is None:
        raise FastbondError(f"checkpoint {checkpoint} was written by a one-process run; resume it without DeepSpeed")
    if int(saved_world) != run.world:
        raise FastbondError(f"checkpoint {checkpoint} was saved on {saved_world} ranks, this run has {run.world}")
    rank_file = _rank_file(checkpoint, run.rank, run.world)
    if not rank_file.is_file():
        raise FastbondError(f"checkpoint {checkpoint} lacks {rank_file.name}")
    run.engine.load_checkpoint(checkpoint)
    run.engine.load_state_dict(state["engine"])
    if run.ctx.anchor is not None:
        run.ctx.anchor.load(checkpoint / "anchor")
    run.step = int(meta["step"])
    run.stream.load_state_dict(state["data"])
    run.skipped = int(state["skipped"])
    with safe_open(str(rank_file), framework="pt") as handle:
        skeleton = json.loads(handle.metadata()["state"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    own = join_tensors(skeleton, tensors)
    run.algorithm.load_state_dict(own["algorithm"])
    set_rng_state(own["rng"])


def export(run, path: Path) -> Path:
    """The trained policy, consolidated, in transformers format (rank 0 writes; collective)."""
    run.engine.export_pretrained(path, run.ctx.tokenizer)
    return path
