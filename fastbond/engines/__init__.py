"""Engines: how the policy is held and updated (`engine.kind`), behind one seam (`base.Engine`).

    base.py        the `Engine` interface and the `Models` a run holds
    local.py       one process, plain PyTorch: `LocalEngine` (engine.kind torch)
    deepspeed/     DeepSpeed ZeRO 0-3 over K ranks: `DeepSpeedEngine` (engine.kind deepspeed);
                   the only part of fastbond that imports deepspeed

`make_engine(config)` picks one; `engine.kind: auto` means DeepSpeed exactly
when started by a distributed launcher (`deepspeed` or `torchrun`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

from fastbond.config import EngineConfig, TrainConfig
from fastbond.engines.base import Engine
from fastbond.models.form import Models
from fastbond.errors import FastbondError

__all__ = ["Engine", "Models", "launched_distributed", "make_engine", "resolve_engine_kind"]


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


def make_engine(config: TrainConfig) -> Engine:
    """The engine of `config` (under DeepSpeed: joins the process group)."""
    if resolve_engine_kind(config.engine) == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise FastbondError("engine.kind=deepspeed needs the deepspeed package: pip install 'fastbond[deepspeed]'")
        from fastbond.engines.deepspeed.engine import DeepSpeedEngine

        return DeepSpeedEngine(config)
    from fastbond.engines.local import LocalEngine

    return LocalEngine(config)
