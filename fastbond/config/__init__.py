"""The typed config tree of `fastbond train`: YAML plus dotted overrides, validated up front.

A run is described by one `TrainConfig`, a tree of dataclasses. It is built
from (lowest to highest precedence) the defaults, an optional YAML file,
and `key=value` overrides such as `algorithm.beta=0.5 optim.lr=3e-6`. Values of
overrides are parsed as YAML scalars (`true`, `1e-3`, `[1, 2]`, `null`).

Every mistake a user can make here (unknown or mistyped key, wrong type, value
out of range, missing file) raises `FastbondError` with one line naming the
key, before any model is loaded.

    schema.py    the sections: keys, defaults, meanings, and each section's checks
    loading.py   YAML, dotted overrides, types, unknown and renamed keys; `load_config`
"""

from __future__ import annotations

import dataclasses

from fastbond.config.loading import (
    MOVED_KEYS,
    RENAMED_KEYS,
    load_config,
    merge_trees,
    parse_overrides,
    read_yaml,
    to_dict,
)
from fastbond.config.schema import (
    ATTENTIONS,
    DTYPE_NAMES,
    ROLLOUT_BACKENDS,
    SEED_LIMIT,
    CheckpointConfig,
    DataConfig,
    EngineConfig,
    EvalConfig,
    FrontierConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    StaticSamplerConfig,
    TrainConfig,
    VLLMConfig,
)

__all__ = [
    "ATTENTIONS", "DTYPE_NAMES", "MOVED_KEYS", "RENAMED_KEYS", "ROLLOUT_BACKENDS", "SEED_LIMIT",
    "CheckpointConfig", "DataConfig", "EngineConfig", "EvalConfig", "FrontierConfig", "LoggingConfig",
    "LoraConfig", "ModelConfig", "OptimConfig", "RewardConfig", "RolloutConfig", "StaticSamplerConfig", "TrainConfig",
    "VLLMConfig",
    "load_config", "merge_trees", "parse_overrides", "read_yaml", "replace_lora", "to_dict",
]


def replace_lora(config: TrainConfig, **changes) -> TrainConfig:
    """`config` with model.lora keys changed (e.g. r=0: the same run without LoRA)."""
    lora = dataclasses.replace(config.model.lora, **changes)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, lora=lora))
