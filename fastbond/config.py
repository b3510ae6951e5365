"""The typed config tree of `fastbond train`: YAML plus dotted overrides, validated up front.

A run is described by one `TrainConfig`, a tree of dataclasses. It is built
from (lowest to highest precedence) the defaults below, an optional YAML file,
and `key=value` overrides such as `algorithm.beta=0.5 optim.lr=3e-6`. Values of
overrides are parsed as YAML scalars (`true`, `1e-3`, `[1, 2]`, `null`).

Every mistake a user can make here (unknown or mistyped key, wrong type, value
out of range, missing file) raises `FastbondError` with one line naming the
key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastbond.errors import FastbondError

EMBEDDED = "embedded"  # the built-in tiny model / prompts / reward, made locally
ALGORITHMS = ("jbond", "bond", "iterative_bond", "vbon", "bonbon", "rloo")
DTYPES = ("float32", "bfloat16", "float16")
ENGINES = ("auto", "torch", "deepspeed")
SHARDINGS = ("auto", "zero3", "replicated")
GATHERS = ("auto", "full", "per_layer")


@dataclass
class ModelConfig:
    policy: str = EMBEDDED  # a transformers checkpoint directory, or "embedded"
    reference: str | None = None  # π_ref; defaults to the policy's initial weights
    dtype: str = "float32"  # compute dtype of policy, anchor and reference
    trust_remote_code: bool = False  # off unless the user turns it on
    gradient_checkpointing: bool = False
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when installed, else sdpa


@dataclass
class RewardConfig:
    kind: str = "builtin"  # builtin | callable | model
    name: str = "sentiment"  # scorer name | "module:function" | reward-model directory
    batch_size: int = 64


@dataclass
class DataConfig:
    prompts: str = EMBEDDED  # a .jsonl ({"prompt": ...} a line) or .txt (a prompt a line) file
    eval_prompts: str = EMBEDDED
    max_prompt_tokens: int = 64


@dataclass
class AlgorithmConfig:
    name: str = "jbond"
    beta: float = 0.5  # Jeffreys weight: 0 forward KL, 1 backward KL
    gamma: float = 0.0  # extra KL(π ‖ π_anc) weight (J-BOND)
    n: int = 8  # BOND-N's N, iterative BOND's n, BoNBoN's n, vBoN's N
    mc_samples: int = 16  # k reference samples for Monte-Carlo quantiles
    anchor_period: int = 50  # iterative BOND: steps between hard anchor updates
    beta_rl: float = 0.01  # REINFORCE's KL-regularization strength
    bonbon_alpha: float = 0.005  # BoNBoN's SFT weight


@dataclass
class OptimConfig:
    lr: float = 3e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    max_grad_norm: float = 1.0


@dataclass
class RolloutConfig:
    batch_size: int = 128  # prompts per step
    max_new_tokens: int = 64
    temperature: float = 1.0  # training samples are drawn at temperature 1 (SPEC §5)
    sampler: str = "torch"  # torch (generate's sampling) | keyed (Gumbel-max, same draws on any number of ranks)


@dataclass
class AnchorConfig:
    eta: float = 0.02  # EMA rate: θ_anc ← (1−η) θ_anc + η θ


@dataclass
class EngineConfig:
    """How the policy is optimized: one process (torch) or DeepSpeed ZeRO over K ranks."""

    kind: str = "auto"  # auto (deepspeed when started by a distributed launcher) | torch | deepspeed
    zero_stage: int = 0  # 0 data parallel; 1 optimizer states, 2 + gradients, 3 + parameters sharded
    offload_optimizer: bool = False  # fp32 master weights and Adam moments in CPU memory (ZeRO >= 1)
    offload_params: bool = False  # parameter shards in CPU memory (ZeRO-3)
    deepspeed_config: str | None = None  # a DeepSpeed JSON merged over the generated config (it wins)
    reference_sharding: str = "auto"  # reference and reward models: zero3 | replicated; auto: zero3 at ZeRO-3
    generation_gather: str = "auto"  # ZeRO-3 sampling: full (gather once per rollout) | per_layer; auto: full if it fits


@dataclass
class LoggingConfig:
    every: int = 1
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "fastbond"


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end
    keep: int = 2
    resume: bool = False


@dataclass
class EvalConfig:
    at_end: bool = True  # evaluate against Best-of-N of π_ref when training ends
    max_prompts: int = 256  # held-out prompts used
    policy_samples: int = 4  # single samples per prompt, each judged alone
    reference_samples: int = 16  # π_ref samples per prompt for the Best-of-N estimates (≥ 16 for BoN-16)


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    run_dir: str = "runs/fastbond"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cpu_threads: int = 0  # torch threads on CPU; 0 keeps torch's default (tiny models run best on 1)
    on_nonfinite: str = "skip"  # skip the step and count it, or stop the run
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------
# dict → dataclass, with types checked and unknown keys named


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or a FastbondError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except FastbondError as error:
                errors.append(error)
        raise errors[0]
    if origin is tuple:
        item_types = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise FastbondError(f"config key '{key}' must be a list of {len(item_types)} values, got {value!r}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `3e-6` (no dot) as a string; accept what float() reads.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise FastbondError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise FastbondError(f"unknown config key '{key}'{hint}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise FastbondError(f"config key '{key}' must be a section (a mapping), got {value!r}")
            kwargs[name] = _build(tp, value, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FastbondError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["optim.lr=1e-5", "algorithm.name=bond"]` → a nested dict."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise FastbondError(f"override '{item}' must look like key=value (e.g. optim.lr=1e-5)")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FastbondError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FastbondError(f"config file {path} is not valid UTF-8 text") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise FastbondError(f"config file {path}{where} is not valid YAML") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise FastbondError(f"config file {path} must hold a mapping at the top level")
    return loaded


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, check_paths: bool = True
) -> TrainConfig:
    """The validated config of a run: defaults ← YAML file ← dotted overrides.

    `check_paths=False` skips the checks that model and data paths exist, for
    commands that only read the config (`fastbond plan` on another machine).
    """
    tree = read_yaml(path) if path is not None else {}
    tree = _merge(tree, parse_overrides(overrides or []))
    config = _build(TrainConfig, tree)
    validate(config, check_paths=check_paths)
    return config


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) that `load_config` reads back to an equal config."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


# ---------------------------------------------------------------------------
# ranges and cross-field rules


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise FastbondError(message)


def _in_unit_interval(key: str, value: float) -> None:
    _require(0.0 <= value <= 1.0, f"config key '{key}' must lie in [0, 1], got {value}")


def _positive(key: str, value: float) -> None:
    _require(value > 0, f"config key '{key}' must be > 0, got {value}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"config key '{key}' must be one of {', '.join(choices)}; got '{value}'")


def _existing_path(key: str, value: str) -> None:
    if value != EMBEDDED:
        _require(Path(value).exists(), f"config key '{key}': path not found: {value}")


def _model_directory(key: str, value: str) -> None:
    _existing_path(key, value)
    if value != EMBEDDED:
        _require(
            (Path(value) / "config.json").is_file(),
            f"config key '{key}': {value} is not a transformers model directory (no config.json)",
        )


def validate_engine(engine: EngineConfig, check_paths: bool = True) -> None:
    """The engine section alone: stages, offload and the DeepSpeed override file."""
    _one_of("engine.kind", engine.kind, ENGINES)
    _require(engine.zero_stage in (0, 1, 2, 3), f"config key 'engine.zero_stage' must be 0, 1, 2 or 3, got {engine.zero_stage}")
    _require(
        not engine.offload_params or engine.zero_stage == 3,
        f"config key 'engine.offload_params' needs engine.zero_stage=3, got {engine.zero_stage}",
    )
    _require(
        not engine.offload_optimizer or engine.zero_stage >= 1,
        "config key 'engine.offload_optimizer' needs engine.zero_stage >= 1, got 0",
    )
    _one_of("engine.reference_sharding", engine.reference_sharding, SHARDINGS)
    _one_of("engine.generation_gather", engine.generation_gather, GATHERS)
    if engine.kind == "torch":
        # Every one of these only means something to DeepSpeed; silently ignoring them would
        # run a different job from the one asked for.
        for key, value in (
            ("zero_stage", engine.zero_stage), ("offload_optimizer", engine.offload_optimizer),
            ("offload_params", engine.offload_params), ("deepspeed_config", engine.deepspeed_config),
        ):
            _require(not value, f"config key 'engine.{key}' needs engine.kind=deepspeed (or auto under a deepspeed launch)")
    if engine.deepspeed_config is not None:
        _require(engine.deepspeed_config.endswith(".json"),
                 f"config key 'engine.deepspeed_config' must name a .json file, got '{engine.deepspeed_config}'")
        if check_paths:
            _require(Path(engine.deepspeed_config).is_file(),
                     f"config key 'engine.deepspeed_config': file not found: {engine.deepspeed_config}")


def validate(config: TrainConfig, check_paths: bool = True) -> None:
    """Range and consistency checks; raises FastbondError naming the key."""
    algo = config.algorithm
    _one_of("algorithm.name", algo.name, ALGORITHMS)
    _in_unit_interval("algorithm.beta", algo.beta)
    _require(algo.gamma >= 0, f"config key 'algorithm.gamma' must be >= 0, got {algo.gamma}")
    _require(algo.n >= 2, f"config key 'algorithm.n' must be >= 2, got {algo.n}")
    _require(algo.mc_samples >= 1, f"config key 'algorithm.mc_samples' must be >= 1, got {algo.mc_samples}")
    _require(algo.anchor_period >= 1, f"config key 'algorithm.anchor_period' must be >= 1, got {algo.anchor_period}")
    _require(algo.beta_rl >= 0, f"config key 'algorithm.beta_rl' must be >= 0, got {algo.beta_rl}")
    _in_unit_interval("algorithm.bonbon_alpha", algo.bonbon_alpha)
    _in_unit_interval("anchor.eta", config.anchor.eta)

    _positive("optim.lr", config.optim.lr)
    _require(math.isfinite(config.optim.lr), f"config key 'optim.lr' must be finite, got {config.optim.lr}")
    _require(config.optim.weight_decay >= 0, "config key 'optim.weight_decay' must be >= 0")
    for i, b in enumerate(config.optim.betas):
        _require(0.0 <= b < 1.0, f"config key 'optim.betas[{i}]' must lie in [0, 1), got {b}")
    _require(config.optim.warmup_steps >= 0, "config key 'optim.warmup_steps' must be >= 0")
    _positive("optim.max_grad_norm", config.optim.max_grad_norm)

    _positive("rollout.batch_size", config.rollout.batch_size)
    _positive("rollout.max_new_tokens", config.rollout.max_new_tokens)
    _positive("rollout.temperature", config.rollout.temperature)
    _one_of("rollout.sampler", config.rollout.sampler, ("torch", "keyed"))
    _positive("data.max_prompt_tokens", config.data.max_prompt_tokens)
    _positive("reward.batch_size", config.reward.batch_size)
    _positive("steps", config.steps)
    _require(config.cpu_threads >= 0, f"config key 'cpu_threads' must be >= 0, got {config.cpu_threads}")
    _positive("logging.every", config.logging.every)
    _require(config.checkpoint.every >= 0, "config key 'checkpoint.every' must be >= 0")
    _positive("checkpoint.keep", config.checkpoint.keep)

    _positive("evaluation.max_prompts", config.evaluation.max_prompts)
    _positive("evaluation.policy_samples", config.evaluation.policy_samples)
    _positive("evaluation.reference_samples", config.evaluation.reference_samples)
    _one_of("model.dtype", config.model.dtype, DTYPES)
    _one_of("reward.kind", config.reward.kind, ("builtin", "callable", "model"))
    _one_of("on_nonfinite", config.on_nonfinite, ("skip", "stop"))
    _require(
        config.device == "auto" or config.device == "cpu" or config.device.startswith("cuda"),
        f"config key 'device' must be auto, cpu or cuda[:N], got '{config.device}'",
    )
    validate_engine(config.engine, check_paths)
    if check_paths:
        _model_directory("model.policy", config.model.policy)
        if config.model.reference is not None:
            _model_directory("model.reference", config.model.reference)
        _existing_path("data.prompts", config.data.prompts)
        _existing_path("data.eval_prompts", config.data.eval_prompts)
        if config.reward.kind == "model":
            _existing_path("reward.name", config.reward.name)
    if config.reward.kind == "callable":
        _require(":" in config.reward.name, f"config key 'reward.name' must look like module:function, got '{config.reward.name}'")
