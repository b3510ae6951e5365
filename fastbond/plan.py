"""`fastbond plan CONFIG --gpus K`: the bytes each rank will hold, before anything is launched.

For each model of a run (policy, anchor, reference, reward) the parameter
tensors are counted exactly — the architecture is instantiated on PyTorch's
meta device from its transformers config, so tied embeddings count once and
nothing is allocated or downloaded. The config comes from a local checkpoint
directory, or from a preset whose numbers are those of the published
configs (Gemma-2B/7B, Gemma-2-2B/9B, Llama-3-8B).

Per rank, with Ψ the parameter count, K the ranks, c the bytes of the compute
dtype, S = Σ ⌈numel / K⌉ over tensors (a ZeRO-3 shard, padding included) and
F = ⌈Ψ / K⌉ (a ZeRO-1/2 flat partition):

    row                     ZeRO-0   ZeRO-1   ZeRO-2   ZeRO-3
    policy params (c)       cΨ       cΨ       cΨ       cS
    policy grads (c)        cΨ       cΨ       cF       cS
    fp32 master weights     4Ψ*      4F       4F       4S      (* none when c = 4)
    Adam moments (m, v)     8Ψ       8F       8F       8S
    anchor params (c)       cΨ       cΨ       cΨ       cS
    anchor EMA state (fp32) 4Ψ*      4Ψ*      4Ψ*      4S*     (* none when c = 4)
    reference / reward      cΨ', or cS' when sharded as ZeRO-3 inference engines

Optimizer offload moves the master weights and moments (and an fp32 copy of
the gradient partition) to host memory; parameter offload moves the
parameter shards, and the anchor's EMA state with them. One process without
DeepSpeed (engine.kind=torch) holds an fp32 policy, fp32 gradients and
moments and no separate master. Activations, the KV cache of generation,
communication buckets and the CUDA context are not counted; the transient
rows show the largest temporary copies fastbond itself makes.

LoRA (`model.lora.r > 0`) plans the frozen base (cΨ, or cS at ZeRO-3; it is
π_ref too, so no reference row) and the two adapters: the table above with
Ψ the adapter's size for the policy adapter, its gradients, master copy and
moments, and for the anchor adapter and its EMA state. In one process the
adapters are fp32 and the anchor adapter is its own EMA state.

`fastbond.memory.measured_rows` reads the same rows off a running job (the memory report at
start), so the plan and the run can be compared line by line.
"""

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


# --------------------------------------------------------------------------- #
# model shapes
# --------------------------------------------------------------------------- #


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


def lora_targets(shape: ModelShape, lora) -> list[str]:
    from fastbond.lora import DEFAULT_TARGETS

    return list(lora.target_modules or [t for t in DEFAULT_TARGETS if t in shape.linears])


def lora_shape(shape: ModelShape, lora) -> ModelShape:
    """The tensors of one LoRA adapter on `shape`: A [r, in] and B [out, r] per adapted linear layer."""
    targets = lora_targets(shape, lora)
    numels = [n for t in targets for d_in, d_out in shape.linears.get(t, []) for n in (lora.r * d_in, d_out * lora.r)]
    return ModelShape(f"LoRA r={lora.r} on {', '.join(targets)}", numels, (0, 0))


def lora_numel(shape: ModelShape, lora) -> int:
    """Parameters of one LoRA adapter on `shape`: r·(in + out) per adapted linear layer."""
    return lora_shape(shape, lora).total


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


# --------------------------------------------------------------------------- #
# the plan
# --------------------------------------------------------------------------- #


def _sharding(config: TrainConfig) -> str:
    sharding = config.engine.reference_sharding
    if sharding == "auto":
        return "zero3" if config.engine.zero_stage == 3 else "replicated"
    return sharding


def plan_memory(config: TrainConfig, ranks: int, policy: ModelShape, reference: ModelShape | None,
                reward: ModelShape | None, needs_anchor: bool = True) -> Plan:
    """Per-rank bytes of a run of `config` on `ranks` ranks (see the module docstring)."""
    if ranks < 1:
        raise FastbondError(f"--gpus must be >= 1, got {ranks}")
    engine = config.engine
    deepspeed = engine.kind == "deepspeed" or (engine.kind == "auto" and (ranks > 1 or engine.zero_stage > 0))
    if not deepspeed and ranks > 1:
        raise FastbondError("engine.kind=torch runs one process; plan it with --gpus 1")
    c = DTYPE_BYTES[config.model.dtype]
    stage = engine.zero_stage if deepspeed else 0
    dtype = config.model.dtype
    psi = policy.total
    offload_opt, offload_par = engine.offload_optimizer, engine.offload_params

    if config.model.lora.r > 0:
        return _plan_lora(config, ranks, stage if deepspeed else None, policy, reward, needs_anchor)
    if deepspeed:
        title = (f"ZeRO-{stage} on {ranks} rank(s), {dtype}, optimizer offload "
                 f"{'on' if offload_opt else 'off'}, parameter offload {'on' if offload_par else 'off'}")
    else:
        title = f"one process (engine.kind=torch), fp32 master weights, {dtype} anchor and reference"
    plan = Plan(title)

    if not deepspeed:
        plan.add("policy params (fp32)", 4 * psi)
        plan.add("policy grads (fp32)", 4 * psi)
        plan.add("Adam moments (fp32 m, v)", 8 * psi)
        anchor_params, anchor_state = c * psi, (4 * psi if c != 4 else 0)
        anchor_on_host = False
    else:
        local = _zero_trained_rows(plan, policy, ranks, stage, config, "policy params", "policy grads")
        anchor_params, anchor_state = c * local, (4 * local if c != 4 else 0)
        anchor_on_host = offload_par
    if needs_anchor:
        plan.add(f"anchor params ({dtype})", anchor_params, on_host=anchor_on_host)
        plan.add("anchor EMA state (fp32)", anchor_state, on_host=anchor_on_host)

    sharded = deepspeed and _sharding(config) == "zero3"
    for name, shape in (("reference", reference), ("reward", reward)):
        if shape is None:
            continue
        count = shape.zero3_shard(ranks) if sharded else shape.total
        how = "ZeRO-3 shard" if sharded else "replicated"
        plan.add(f"{name} ({dtype}, {how})", c * count, on_host=sharded and offload_par)

    vocab, hidden = policy.head
    if deepspeed and stage == 3:
        if engine.generation_gather == "per_layer":
            plan.add("generation: largest tensor gathered (per layer)", c * max(policy.numels), transient=True)
        else:
            plan.add("generation: whole policy gathered once", c * psi, transient=True)
        plan.add("fused LM head: gathered weight", c * vocab * hidden, transient=True)
    plan.add("fused LM head: fp32 weight gradient", 4 * vocab * hidden, transient=True)

    plan.notes.append(f"policy: {psi:,} parameters ({policy.source})")
    if reference is not None:
        plan.notes.append(f"reference: {reference.total:,} parameters ({reference.source})")
    if reward is not None:
        plan.notes.append(f"reward: {reward.total:,} parameters ({reward.source})")
    plan.notes.append("not counted: activations, KV cache, communication buckets, CUDA context")
    return plan


def _zero_trained_rows(plan: Plan, trained: ModelShape, ranks: int, stage: int, config: TrainConfig,
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


def _plan_lora(config: TrainConfig, ranks: int, stage: int | None, policy: ModelShape, reward: ModelShape | None,
               needs_anchor: bool) -> Plan:
    """LoRA J-BOND: the frozen base in the compute dtype and two adapters; no reference model (π_ref is the
    base). One process (`stage` None): fp32 adapters, the anchor's its own EMA state. DeepSpeed: the table of
    the module docstring with Ψ the adapter's size, plus the base (sharded at ZeRO-3, like the rest)."""
    c, dtype = DTYPE_BYTES[config.model.dtype], config.model.dtype
    adapter = lora_shape(policy, config.model.lora)
    a = adapter.total
    base_row = f"base params ({dtype}, frozen; π_ref with adapters off)"
    if stage is None:
        plan = Plan(f"one process, LoRA r={config.model.lora.r}: {dtype} frozen base, fp32 adapters")
        plan.add(base_row, c * policy.total)
        plan.add("policy adapter (fp32)", 4 * a)
        plan.add("policy adapter grads (fp32)", 4 * a)
        plan.add("Adam moments (fp32 m, v)", 8 * a)
        if needs_anchor:
            plan.add("anchor adapter (fp32, its own EMA state)", 4 * a)
    else:
        offload_opt, offload_par = config.engine.offload_optimizer, config.engine.offload_params
        plan = Plan(f"ZeRO-{stage} on {ranks} rank(s), LoRA r={config.model.lora.r}: {dtype} frozen base and "
                    f"adapters, optimizer offload {'on' if offload_opt else 'off'}, parameter offload "
                    f"{'on' if offload_par else 'off'}")
        plan.add(base_row, c * (policy.zero3_shard(ranks) if stage == 3 else policy.total), on_host=offload_par)
        local = _zero_trained_rows(plan, adapter, ranks, stage, config, "policy adapter", "policy adapter grads")
        if needs_anchor:
            plan.add(f"anchor adapter ({dtype})", c * local, on_host=offload_par)
            plan.add("anchor EMA state (fp32)", 4 * local if c != 4 else 0, on_host=offload_par)
        if stage == 3:
            plan.add("generation: whole policy gathered once", c * (policy.total + 2 * a), transient=True)
            vocab, hidden = policy.head
            plan.add("fused LM head: gathered weight", c * vocab * hidden, transient=True)
    if reward is not None:
        sharded = stage is not None and _sharding(config) == "zero3"
        count = reward.zero3_shard(ranks) if sharded else reward.total
        plan.add(f"reward ({dtype}, {'ZeRO-3 shard' if sharded else 'replicated'})", c * count,
                 on_host=sharded and config.engine.offload_params)
    if HEAD_NAME in lora_targets(policy, config.model.lora):  # the fused ops read W + ΔW, and give it a gradient
        vocab, hidden = policy.head
        plan.add("adapted LM head: merged weight", c * vocab * hidden, transient=True)
        plan.add("adapted LM head: fp32 weight gradient", 4 * vocab * hidden, transient=True)
    # otherwise the head is frozen: the fused op computes no weight gradient, so no transient head buffer
    plan.notes.append(f"policy: {policy.total:,} parameters ({policy.source}); one adapter {a:,}")
    plan.notes.append("not counted: activations, KV cache, communication buckets, CUDA context")
    return plan


def plan_for_config(config: TrainConfig, ranks: int, model: str | None = None, reference: str | None = None,
                    reward: str | None = None) -> Plan:
    """The plan of a config, sizing each model from the config's paths unless a spec is given."""
    policy_shape = resolve_shape(model or config.model.policy)
    reference_spec = reference or config.model.reference
    reference_shape = resolve_shape(reference_spec) if reference_spec else policy_shape
    reward_shape = None
    if config.reward.kind == "model" or reward:
        reward_shape = resolve_shape(reward or config.reward.name, classifier=True)
    return plan_memory(config, ranks, policy_shape, reference_shape, reward_shape, config.algorithm.needs_anchor)


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


def lora_against_full(lora_plan: Plan, full_plan: Plan, gpu_gib: float) -> str:
    """One line: LoRA's counted bytes per rank against full J-BOND's on the same GPUs (model.lora.r=0)."""
    lora_bytes, full_bytes = lora_plan.totals()[0], full_plan.totals()[0]
    return (f"against full J-BOND (model.lora.r=0) on the same GPUs: {lora_bytes / 2**30:.1f} GiB per rank "
            f"against {full_bytes / 2**30:.1f} GiB ({lora_bytes / full_bytes:.2f}×); full J-BOND "
            f"{fit_line(full_plan, gpu_gib)}")
