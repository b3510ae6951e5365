"""What every plan is made of: model shapes (exact parameter tensors, from a config on the meta device)
and the rows of the trained tensors under ZeRO."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastbond.config import TrainConfig
from fastbond.embedded import EMBEDDED
from fastbond.errors import FastbondError
from fastbond.memory import Plan

# Numbers from the models' published config.json files.
PRESETS: dict[str, dict] = {
    "gemma-2b": dict(model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                     num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256),
    "gemma-7b": dict(model_type="gemma", vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                     num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, head_dim=256),
    "gemma-2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                       num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256),
    "gemma-2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                       num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       tie_word_embeddings=False),
}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEAD_NAME = "lm_head"  # the LM head's module name in the architectures planned here


@dataclass
class ModelShape:
    """The parameter tensors of one model: what every byte count below is made of."""

    source: str  # where the config came from, said in the report
    numels: list[int]  # one entry per distinct parameter tensor (tied tensors once)
    head: tuple[int, int]  # the LM head's [V, H] (the fused path's transient buffers)
    # (in, out) of every nn.Linear, by the last component of its module name: LoRA's adapter sizes
    linears: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.numels)

    def zero3_shard(self, ranks: int) -> int:
        """Elements of one rank's ZeRO-3 shards: every tensor padded to a multiple of K."""
        return sum(math.ceil(n / ranks) for n in self.numels)

    def flat_partition(self, ranks: int) -> int:
        """Elements of one rank's ZeRO-1/2 partition of the flat parameter buffer."""
        return math.ceil(self.total / ranks)


def shape_of(model: nn.Module, source: str) -> ModelShape:
    numels = [p.numel() for p in model.parameters()]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    linears: dict[str, list[tuple[int, int]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linears.setdefault(name.rsplit(".", 1)[-1], []).append((module.in_features, module.out_features))
    return ModelShape(source, numels, tuple(weight.shape) if weight is not None else (0, 0), linears)


def _meta_model(config, classifier: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if classifier:
            config.num_labels = 1
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(config)


def _preset_for(spec: str) -> str | None:
    """The preset named by `spec`, or matched by the start of its last path component."""
    name = Path(spec).name.lower()
    matches = [preset for preset in PRESETS if name == preset or name.startswith(preset + "-")]
    return max(matches, key=len) if matches else None


def resolve_shape(spec: str, classifier: bool = False) -> ModelShape:
    """Sizes of a model: a local transformers directory, a preset name, or "embedded"."""
    from transformers import AutoConfig

    if spec == EMBEDDED:
        from fastbond.embedded import build_embedded_reference

        spec = str(build_embedded_reference())
    if Path(spec, "config.json").is_file():
        config = AutoConfig.from_pretrained(spec)
        return shape_of(_meta_model(config, classifier), f"config of {spec}")
    preset = _preset_for(spec)
    if preset is None:
        raise FastbondError(
            f"cannot size '{spec}': not a local transformers directory and no preset matches "
            f"(presets: {', '.join(PRESETS)}); pass --model PRESET or a directory holding config.json"
        )
    numbers = dict(PRESETS[preset])
    config = AutoConfig.for_model(numbers.pop("model_type"), **numbers)
    how = "preset" if Path(spec).name.lower() == preset else f"preset {preset}, matched from '{spec}'"
    return shape_of(_meta_model(config, classifier), how if how != "preset" else f"preset {preset}")


def sharding(config: TrainConfig) -> str:
    sharding = config.engine.reference_sharding
    if sharding == "auto":
        return "zero3" if config.engine.zero_stage == 3 else "replicated"
    return sharding


def zero_trained_rows(plan: Plan, trained: ModelShape, ranks: int, stage: int, config: TrainConfig,
                       params_row: str, grads_row: str) -> int:
    """The rows of the trained tensors under ZeRO-`stage` (the module docstring's table): their compute-dtype
    copy and gradients, the fp32 master copy and Adam moments. Returns the elements of them a rank holds,
    which an anchor partitioned alike holds too."""
    c, dtype, engine = DTYPE_BYTES[config.model.dtype], config.model.dtype, config.engine
    psi, shard, flat = trained.total, trained.zero3_shard(ranks), trained.flat_partition(ranks)
    local = shard if stage == 3 else psi
    plan.add(f"{params_row} ({dtype})", c * local, on_host=engine.offload_params)
    plan.add(f"{grads_row} ({dtype})", c * {0: psi, 1: psi, 2: flat, 3: shard}[stage])
    opt_part = psi if stage == 0 else (shard if stage == 3 else flat)
    if engine.offload_optimizer:
        plan.add("fp32 gradient partition (offload)", 4 * opt_part, on_host=True)
    # fp32 weights are their own master copy only at ZeRO-0; ZeRO-1/2/3 keep a clone of the partition.
    master = 0 if (c == 4 and stage == 0) else 4 * opt_part
    plan.add("fp32 master weights", master, on_host=engine.offload_optimizer)
    plan.add("Adam moments (fp32 m, v)", 8 * opt_part, on_host=engine.offload_optimizer)
    return local


def sampler_rows(plan: Plan, config: TrainConfig, policy: ModelShape, master_wider: bool) -> None:
    """The static sampler's copy of the weights it decodes with (`fastbond.rollout.static_sampler.SamplingCopy`):
    held when its step is captured (`rollout.static.capture` auto or true: a plan is for GPUs) or when the
    policy's own weights are wider than the compute dtype (`master_wider`: one process's fp32 master).
    rollout.backend=auto counts it too: a plan is for GPUs, where auto is the static sampler."""
    rollout = config.rollout
    if rollout.backend not in ("static", "auto"):
        return
    c, dtype = DTYPE_BYTES[config.model.dtype], config.model.dtype
    if rollout.static.capture is not False or (master_wider and c != 4):
        plan.add(f"static sampler copy ({dtype}, each role loaded in turn)", c * policy.total)


def fit_line(plan: Plan, gpu_gib: float) -> str:
    """Whether the counted device bytes, with the largest transient buffer, fit one GPU of `gpu_gib` GiB."""
    device, _ = plan.totals()
    transient = max((r.device for r in plan.rows if r.transient), default=0)
    left = gpu_gib * 2**30 - device - transient
    if left < 0:
        return (f"does not fit a {gpu_gib:g} GiB GPU: {(device + transient) / 2**30:.1f} GiB counted "
                "before activations and generation")
    return (f"fits a {gpu_gib:g} GiB GPU: {(device + transient) / 2**30:.1f} GiB counted (largest transient "
            f"included), {left / 2**30:.1f} GiB left for activations and the KV cache of generation")
