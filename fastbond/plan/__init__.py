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

from fastbond.config import TrainConfig
from fastbond.errors import FastbondError
from fastbond.memory import Plan
from fastbond.models.registry import form_name
from fastbond.plan.common import DTYPE_BYTES, HEAD_NAME, PRESETS, ModelShape, fit_line, resolve_shape, shape_of
from fastbond.plan.full import plan_full
from fastbond.plan.lora import against_full, lora_numel, lora_shape, lora_targets, plan_lora, without_lora

__all__ = ["DTYPE_BYTES", "HEAD_NAME", "PRESETS", "ModelShape", "Plan", "comparisons", "fit_line", "lora_numel",
           "lora_shape", "lora_targets", "plan_for_config", "plan_memory", "resolve_shape", "shape_of"]

# policy form (`fastbond.models.registry`) → its rows
PLANNERS = {"full": plan_full, "lora": plan_lora}
# policy form → (the config it is worth comparing with, the line that compares the two plans)
COMPARISONS = {"lora": (without_lora, against_full)}


def plan_memory(config: TrainConfig, ranks: int, policy: ModelShape, reference: ModelShape | None,
                reward: ModelShape | None, needs_anchor: bool = True) -> Plan:
    """Per-rank bytes of a run of `config` on `ranks` ranks (see the module docstring)."""
    if ranks < 1:
        raise FastbondError(f"--gpus must be >= 1, got {ranks}")
    engine = config.engine
    deepspeed = engine.kind == "deepspeed" or (engine.kind == "auto" and (ranks > 1 or engine.zero_stage > 0))
    if not deepspeed and ranks > 1:
        raise FastbondError("engine.kind=torch runs one process; plan it with --gpus 1")
    stage = engine.zero_stage if deepspeed else None
    return PLANNERS[form_name(config)](config, ranks, stage, policy, reference, reward, needs_anchor)


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


def comparisons(config: TrainConfig, plan: Plan, ranks: int, gpu_gib: float, **specs) -> list[str]:
    """Lines that set `plan` beside the run its form is worth comparing with (LoRA: the same run with
    every weight trained); `specs`: plan_for_config's model, reference and reward."""
    if form_name(config) not in COMPARISONS:
        return []
    other_config, describe = COMPARISONS[form_name(config)]
    return [describe(plan, plan_for_config(other_config(config), ranks, **specs), gpu_gib)]
