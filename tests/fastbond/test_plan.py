"""`fastbond plan`: per-rank bytes, checked by hand on a model small enough to count on paper."""

import re
from pathlib import Path

import pytest
from transformers import LlamaConfig

from fastbond.cli import main
from fastbond.config import load_config
from fastbond.errors import FastbondError
from fastbond.memory import measured_rows
from fastbond.plan import plan_memory, resolve_shape

# the rows without the static sampler's copy (rollout.backend=auto counts it: a plan is for GPUs)
GENERATE = "rollout.backend=generate"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """vocab 10, hidden 4, 1 layer, 2 heads of 2, 1 KV head, MLP 6, untied head. Tensors:
    embed 40, q 16, k 8, v 8, o 16, gate/up/down 24 each, 2 layer norms 4, final norm 4, head 40
    → Ψ = 212. On 3 ranks a ZeRO-3 shard holds Σ⌈n/3⌉ = 14+6+3+3+6+8+8+8+2+2+2+14 = 76
    elements, a ZeRO-1/2 partition ⌈212/3⌉ = 71."""
    directory = tmp_path_factory.mktemp("small")
    LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=2, tie_word_embeddings=False).save_pretrained(directory)
    return resolve_shape(str(directory))


def rows(plan):
    return {row.what.split(" (")[0]: (row.device, row.host) for row in plan.rows if not row.transient}


def test_shape_counts(small):
    assert small.total == 212
    assert small.zero3_shard(3) == 76
    assert small.flat_partition(3) == 71
    assert small.head == (10, 4)


def test_zero3_bf16_on_3_ranks(small):
    config = load_config(None, ["engine.kind=deepspeed", "engine.zero_stage=3", "model.dtype=bfloat16", GENERATE])
    plan = plan_memory(config, 3, small, small, None)
    assert rows(plan) == {
        "policy params": (2 * 76, 0), "policy grads": (2 * 76, 0), "fp32 master weights": (4 * 76, 0),
        "Adam moments": (8 * 76, 0), "anchor params": (2 * 76, 0), "anchor EMA state": (4 * 76, 0),
        "reference": (2 * 76, 0),
    }
    assert plan.totals() == (1824, 0)
    assert plan.row("generation: whole policy").device == 2 * 212
    assert plan.row("fused LM head: gathered weight").device == 2 * 40


def test_zero2_replicates_weights_and_shards_the_rest(small):
    config = load_config(None, ["engine.kind=deepspeed", "engine.zero_stage=2", "model.dtype=bfloat16", GENERATE])
    assert rows(plan_memory(config, 3, small, small, small)) == {
        "policy params": (424, 0), "policy grads": (2 * 71, 0), "fp32 master weights": (4 * 71, 0),
        "Adam moments": (8 * 71, 0), "anchor params": (424, 0), "anchor EMA state": (848, 0),
        "reference": (424, 0), "reward": (424, 0),  # reference_sharding=auto: replicated below ZeRO-3
    }


def test_offload_moves_optimizer_and_parameters_to_host(small):
    config = load_config(None, ["engine.kind=deepspeed", "engine.zero_stage=3", "model.dtype=bfloat16", GENERATE,
                                "engine.offload_optimizer=true", "engine.offload_params=true"])
    assert rows(plan_memory(config, 3, small, small, None)) == {
        "policy params": (0, 152), "policy grads": (152, 0), "fp32 gradient partition": (0, 304),
        "fp32 master weights": (0, 304), "Adam moments": (0, 608), "anchor params": (0, 152),
        "anchor EMA state": (0, 304), "reference": (0, 152),
    }


def test_one_process_fp32_has_no_separate_master_or_anchor_state(small):
    config = load_config(None, ["engine.kind=torch", GENERATE])
    assert rows(plan_memory(config, 1, small, small, None)) == {
        "policy params": (848, 0), "policy grads": (848, 0), "Adam moments": (1696, 0),
        "anchor params": (848, 0), "anchor EMA state": (0, 0), "reference": (848, 0),
    }
    with pytest.raises(FastbondError, match="engine.kind=torch runs one process"):
        plan_memory(config, 2, small, small, None)


@pytest.mark.parametrize("overrides, copy_bytes", [
    (["engine.kind=torch", "model.dtype=bfloat16", GENERATE], None),  # the roles' own weights
    (["engine.kind=torch", "model.dtype=bfloat16"], 2 * 212),  # auto: the static sampler on the GPUs a plan is for
    (["engine.kind=torch", "model.dtype=bfloat16", "rollout.backend=static"], 2 * 212),  # captured (a plan is for GPUs)
    # not captured: a copy only where the policy's weights are wider than bf16 (one process's fp32 master)
    (["engine.kind=torch", "model.dtype=bfloat16", "rollout.backend=static", "rollout.static.capture=false"], 2 * 212),
    (["engine.kind=torch", "rollout.backend=static", "rollout.static.capture=false"], None),
    (["engine.kind=deepspeed", "engine.zero_stage=3", "model.dtype=bfloat16", "rollout.backend=static",
      "rollout.static.capture=false"], None),
    (["engine.kind=deepspeed", "engine.zero_stage=3", "model.dtype=bfloat16", "rollout.backend=static"], 2 * 212),
    (["model.lora.r=2", "model.dtype=bfloat16", "rollout.backend=static"], 2 * 212),
    (["model.lora.r=2", "model.dtype=bfloat16", "rollout.backend=static", "rollout.static.capture=false"], None),
])
def test_the_static_sampler_copy_is_planned_where_it_is_held(small, overrides, copy_bytes):
    config = load_config(None, overrides)
    ranks = 3 if "engine.zero_stage=3" in overrides else 1
    held = rows(plan_memory(config, ranks, small, small, None)).get("static sampler copy")
    assert held == (None if copy_bytes is None else (copy_bytes, 0))


def test_presets_match_the_published_parameter_counts():
    assert resolve_shape("gemma-7b").total == 8_537_680_896
    assert resolve_shape("/models/llama-3-8b-instruct").total == 8_030_261_248
    assert "matched from '/models/gemma-2b-sft'" in resolve_shape("/models/gemma-2b-sft").source
    with pytest.raises(FastbondError, match="cannot size '/models/mystery': not a local transformers directory"):
        resolve_shape("/models/mystery")


def test_plan_command_on_the_gemma_7b_example(capsys):
    example = Path(__file__).parents[2] / "examples" / "gemma-7b-zero3.yaml"
    assert main(["plan", str(example), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    # Every Gemma-7B tensor splits evenly over 8 ranks: a bf16 shard is 2·Ψ/8 bytes.
    params = 2 * 8_537_680_896 // 8
    assert re.search(rf"policy params \(bfloat16\)\s+{params:,}", out)
    assert re.search(rf"Adam moments \(fp32 m, v\)\s+{4 * params:,}", out)
    assert re.search(rf"anchor EMA state \(fp32\)\s+{2 * params:,}", out)
    assert "ZeRO-3 on 8 rank(s), bfloat16" in out


def test_measured_rows_read_live_tensors():
    import torch

    from fastbond.anchor import ShardedEMAAnchor

    policy = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(policy.parameters())
    policy(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    anchor = ShardedEMAAnchor(policy, torch.nn.Linear(3, 2).to(torch.bfloat16), torch.bfloat16)
    measured = rows(measured_rows(policy, optimizer, anchor, on_accelerator=False))
    assert measured == {"policy params": (32, 0), "fp32 master weights": (0, 0), "Adam moments": (64, 0),
                        "anchor params": (16, 0), "anchor EMA state": (32, 0)}
