"""The DeepSpeed JSON of a fastbond config: generated from fastbond's keys, a user file merged over it.

No deepspeed import here: the config is built and checked before the
process group exists, and tests read it on machines without DeepSpeed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from fastbond.config import TrainConfig, merge_trees
from fastbond.errors import FastbondError

# fastbond steps the optimizer once per rollout batch; these settings would change that meaning.
_FORBIDDEN_OVERRIDES = {"gradient_accumulation_steps": 1}


def _find_auto(tree, path: str = "") -> str | None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            found = _find_auto(value, f"{path}.{key}" if path else key)
            if found:
                return found
    return path if tree == "auto" else None


def read_deepspeed_json(path: str) -> dict:
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError:
        raise FastbondError(f"engine.deepspeed_config: cannot read {path}") from None
    except json.JSONDecodeError as error:
        raise FastbondError(f"engine.deepspeed_config: {path} line {error.lineno} is not valid JSON") from None
    if not isinstance(loaded, dict):
        raise FastbondError(f"engine.deepspeed_config: {path} must hold a JSON object")
    return loaded


def build_deepspeed_config(config: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config of a fastbond run on `world_size` ranks.

    One optimizer step per rollout batch: each rank takes batch_size / K
    prompts, gradients are averaged over ranks (so the step equals the
    one-process step on the whole batch), AdamW and the linear warm-up match
    `TorchOptimizer`. Low precision is DeepSpeed's own (bf16/fp16 weights, fp32
    master copy in the optimizer), not autocast.
    """
    engine = config.engine
    batch = config.rollout.batch_size
    if world_size < 1 or batch % world_size:
        raise FastbondError(f"rollout.batch_size={batch} is not divisible by the {world_size} ranks")
    dtype = config.model.dtype
    zero: dict = {"stage": engine.zero_stage}
    pin = torch.cuda.is_available()  # pinned host memory needs a GPU driver
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if engine.zero_stage >= 2:
        zero.update({"overlap_comm": True, "contiguous_gradients": True})
    if engine.zero_stage == 3:
        # fastbond exports the fp32 master weights itself (consolidated_state_dict).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    optimizer_params = {
        "lr": config.optim.lr,
        "betas": list(config.optim.betas),
        "eps": 1e-8,  # torch.optim.AdamW's default, as in TorchOptimizer
        "weight_decay": config.optim.weight_decay,
    }
    if not engine.offload_optimizer:
        # torch.optim.AdamW: the same update as TorchOptimizer and no CUDA op to compile;
        # with offload DeepSpeed requires its CPU Adam.
        optimizer_params["torch_adam"] = True
    ds = {
        "train_micro_batch_size_per_gpu": batch // world_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch,
        "gradient_clipping": config.optim.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bfloat16", "check_grad_overflow": True},
        "fp16": {"enabled": dtype == "float16", "loss_scale": 0, "initial_scale_power": 16},
        "wall_clock_breakdown": False,
    }
    if engine.deepspeed_config:
        ds = merge_trees(ds, read_deepspeed_json(engine.deepspeed_config))
        auto = _find_auto(ds)
        if auto:
            raise FastbondError(f"engine.deepspeed_config: '{auto}' is \"auto\"; fastbond needs a value (or leave it out)")
        for key, required in _FORBIDDEN_OVERRIDES.items():
            if ds.get(key, required) != required:
                raise FastbondError(f"engine.deepspeed_config: '{key}' must be {required} (one optimizer step per rollout batch)")
        if "scheduler" in ds:
            raise FastbondError("engine.deepspeed_config: 'scheduler' is set by fastbond (optim.warmup_steps); remove it")
    return ds


def zero_stage_of(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def inference_config(ds_config: dict) -> dict:
    """The ZeRO-3 config of a frozen model partitioned like the policy (same ranks, same shards).

    No optimizer; no quantized or hpZ secondary copies (DeepSpeed never
    refreshes those for frozen weights, so an anchor's would go stale after
    its first EMA).
    """
    ds = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)
    zero["zero_hpz_partition_size"] = 1
    zero["zero_quantized_weights"] = False
    zero["zero_quantized_nontrainable_weights"] = False
    return ds
