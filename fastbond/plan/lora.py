"""The plan of LoRA J-BOND (`fastbond.lora.LoraForm`): a frozen base, two adapters, no reference model."""

from __future__ import annotations

from fastbond.config import TrainConfig, replace_lora
from fastbond.lora import DEFAULT_TARGETS
from fastbond.memory import Plan
from fastbond.plan.common import (
    DTYPE_BYTES,
    HEAD_NAME,
    ModelShape,
    fit_line,
    sampler_rows,
    sharding,
    zero_trained_rows,
)


def lora_targets(shape: ModelShape, lora) -> list[str]:
    return list(lora.target_modules or [t for t in DEFAULT_TARGETS if t in shape.linears])


def lora_shape(shape: ModelShape, lora) -> ModelShape:
    """The tensors of one LoRA adapter on `shape`: A [r, in] and B [out, r] per adapted linear layer."""
    targets = lora_targets(shape, lora)
    numels = [n for t in targets for d_in, d_out in shape.linears.get(t, []) for n in (lora.r * d_in, d_out * lora.r)]
    return ModelShape(f"LoRA r={lora.r} on {', '.join(targets)}", numels, (0, 0))


def lora_numel(shape: ModelShape, lora) -> int:
    """Parameters of one LoRA adapter on `shape`: r·(in + out) per adapted linear layer."""
    return lora_shape(shape, lora).total


def plan_lora(config: TrainConfig, ranks: int, stage: int | None, policy: ModelShape,
              reference: ModelShape | None, reward: ModelShape | None, needs_anchor: bool) -> Plan:
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
        local = zero_trained_rows(plan, adapter, ranks, stage, config, "policy adapter", "policy adapter grads")
        if needs_anchor:
            plan.add(f"anchor adapter ({dtype})", c * local, on_host=offload_par)
            plan.add("anchor EMA state (fp32)", 4 * local if c != 4 else 0, on_host=offload_par)
        if stage == 3:
            plan.add("generation: whole policy gathered once", c * (policy.total + 2 * a), transient=True)
            vocab, hidden = policy.head
            plan.add("fused LM head: gathered weight", c * vocab * hidden, transient=True)
    if reward is not None:
        sharded = stage is not None and sharding(config) == "zero3"
        count = reward.zero3_shard(ranks) if sharded else reward.total
        plan.add(f"reward ({dtype}, {'ZeRO-3 shard' if sharded else 'replicated'})", c * count,
                 on_host=sharded and config.engine.offload_params)
    if HEAD_NAME in lora_targets(policy, config.model.lora):  # the fused ops read W + ΔW, and give it a gradient
        vocab, hidden = policy.head
        plan.add("adapted LM head: merged weight", c * vocab * hidden, transient=True)
        plan.add("adapted LM head: fp32 weight gradient", 4 * vocab * hidden, transient=True)
    # otherwise the head is frozen: the fused op computes no weight gradient, so no transient head buffer
    sampler_rows(plan, config, policy, master_wider=False)  # the base is held in the compute dtype
    plan.notes.append(f"policy: {policy.total:,} parameters ({policy.source}); one adapter {a:,}")
    plan.notes.append("not counted: activations, KV cache, communication buckets, CUDA context")
    return plan


def without_lora(config: TrainConfig) -> TrainConfig:
    """The same run with every weight trained: what LoRA is compared against."""
    return replace_lora(config, r=0)


def against_full(lora_plan: Plan, full_plan: Plan, gpu_gib: float) -> str:
    """One line: LoRA's counted bytes per rank against full J-BOND's on the same GPUs (model.lora.r=0)."""
    lora_bytes, full_bytes = lora_plan.totals()[0], full_plan.totals()[0]
    return (f"against full J-BOND (model.lora.r=0) on the same GPUs: {lora_bytes / 2**30:.1f} GiB per rank "
            f"against {full_bytes / 2**30:.1f} GiB ({lora_bytes / full_bytes:.2f}×); full J-BOND "
            f"{fit_line(full_plan, gpu_gib)}")
