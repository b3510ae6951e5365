"""The plan of a full policy: every weight trained, a whole anchor, π_ref a model of its own."""

from __future__ import annotations

from fastbond.config import TrainConfig
from fastbond.memory import Plan
from fastbond.plan.common import DTYPE_BYTES, ModelShape, sampler_rows, sharding, zero_trained_rows


def plan_full(config: TrainConfig, ranks: int, stage: int | None, policy: ModelShape,
              reference: ModelShape | None, reward: ModelShape | None, needs_anchor: bool) -> Plan:
    """A full policy (the module docstring's table); `stage` None: one process without DeepSpeed."""
    engine = config.engine
    deepspeed = stage is not None
    c = DTYPE_BYTES[config.model.dtype]
    dtype = config.model.dtype
    psi = policy.total
    offload_opt, offload_par = engine.offload_optimizer, engine.offload_params

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
        local = zero_trained_rows(plan, policy, ranks, stage, config, "policy params", "policy grads")
        anchor_params, anchor_state = c * local, (4 * local if c != 4 else 0)
        anchor_on_host = offload_par
    if needs_anchor:
        plan.add(f"anchor params ({dtype})", anchor_params, on_host=anchor_on_host)
        plan.add("anchor EMA state (fp32)", anchor_state, on_host=anchor_on_host)

    sharded = deepspeed and sharding(config) == "zero3"
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
    sampler_rows(plan, config, policy, master_wider=not deepspeed)

    plan.notes.append(f"policy: {psi:,} parameters ({policy.source})")
    if reference is not None:
        plan.notes.append(f"reference: {reference.total:,} parameters ({reference.source})")
    if reward is not None:
        plan.notes.append(f"reward: {reward.total:,} parameters ({reward.source})")
    plan.notes.append("not counted: activations, KV cache, communication buckets, CUDA context")
    return plan
