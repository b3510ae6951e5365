"""The DeepSpeed config fastbond generates, the user's override file, and the engine keys.

No process group is started here: these run in every CI job; the multi-rank
behaviour is in tests/distributed.
"""

import json
import re

import pytest

from fastbond.config import load_config
from fastbond.engines import resolve_engine_kind
from fastbond.errors import FastbondError

from fastbond.engines.deepspeed import config as deepspeed_config


def config(*overrides):
    return load_config(None, ["engine.kind=deepspeed", "rollout.batch_size=16", *overrides])


def test_zero3_bf16_config_from_fastbond_keys():
    ds = deepspeed_config.build_deepspeed_config(
        config("engine.zero_stage=3", "model.dtype=bfloat16", "optim.lr=3e-6", "optim.max_grad_norm=0.5",
               "optim.betas=[0.8, 0.95]", "optim.weight_decay=0.1"),
        world_size=8,
    )
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 16
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"] == {"type": "AdamW", "params": {
        "lr": 3e-6, "betas": [0.8, 0.95], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True}}
    assert ds["zero_optimization"]["stage"] == 3
    assert "offload_optimizer" not in ds["zero_optimization"] and "offload_param" not in ds["zero_optimization"]
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "scheduler" not in ds  # the warm-up is fastbond's own LambdaLR, as in TorchOptimizer


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_lower_stages_and_precisions(stage):
    ds = deepspeed_config.build_deepspeed_config(config(f"engine.zero_stage={stage}", "model.dtype=float16"), 2)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert ds["train_micro_batch_size_per_gpu"] == 8


def test_offload_switches_to_deepspeeds_cpu_adam():
    ds = deepspeed_config.build_deepspeed_config(
        config("engine.zero_stage=3", "engine.offload_optimizer=true", "engine.offload_params=true"), 4)
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in ds["optimizer"]["params"]  # DeepSpeed requires its CPU Adam with offload


def test_user_json_is_merged_over_the_generated_config_and_wins(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0},
                                "optimizer": {"params": {"eps": 1e-6}}, "steps_per_print": 7}))
    ds = deepspeed_config.build_deepspeed_config(
        config("engine.zero_stage=3", f"engine.deepspeed_config={path}"), 2)
    assert ds["zero_optimization"] == {**ds["zero_optimization"], "stage": 3, "stage3_param_persistence_threshold": 0}
    assert ds["optimizer"]["params"]["eps"] == 1e-6 and ds["optimizer"]["params"]["lr"] == 3e-6
    assert ds["steps_per_print"] == 7


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"train_micro_batch_size_per_gpu": "auto"}', "'train_micro_batch_size_per_gpu' is \"auto\""),
        ('{"gradient_accumulation_steps": 4}', "'gradient_accumulation_steps' must be 1"),
        ('{"scheduler": {"type": "WarmupLR"}}', "'scheduler' is set by fastbond"),
        ('{"zero_optimization": {\n  "stage": 3,,\n}}', "line 2 is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
def test_bad_override_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(FastbondError, match=re.escape(message)) as error:
        deepspeed_config.build_deepspeed_config(config(f"engine.deepspeed_config={path}"), 2)
    assert "\n" not in str(error.value)


def test_batch_must_split_evenly_over_ranks():
    with pytest.raises(FastbondError, match="rollout.batch_size=16 is not divisible by the 3 ranks"):
        deepspeed_config.build_deepspeed_config(config(), 3)


def test_inference_config_partitions_like_the_policy_without_an_optimizer():
    ds = deepspeed_config.build_deepspeed_config(
        config("engine.zero_stage=3", "engine.offload_optimizer=true", "engine.offload_params=true"), 2)
    ds["zero_optimization"]["zero_hpz_partition_size"] = 8
    ds["zero_optimization"]["zero_quantized_nontrainable_weights"] = True
    frozen = deepspeed_config.inference_config(ds)
    assert "optimizer" not in frozen and "offload_optimizer" not in frozen["zero_optimization"]
    assert frozen["zero_optimization"]["offload_param"] == ds["zero_optimization"]["offload_param"]
    assert frozen["zero_optimization"]["stage"] == 3
    # secondary copies DeepSpeed never refreshes for frozen weights: off, or the anchor goes stale
    assert frozen["zero_optimization"]["zero_hpz_partition_size"] == 1
    assert frozen["zero_optimization"]["zero_quantized_nontrainable_weights"] is False
    assert frozen["train_micro_batch_size_per_gpu"] == ds["train_micro_batch_size_per_gpu"]
    assert ds["optimizer"]  # the policy's config is left alone


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["engine.zero_stage=4"], "'engine.zero_stage' must be 0, 1, 2 or 3, got 4"),
        (["engine.kind=megatron"], "'engine.kind' must be one of auto, torch, deepspeed"),
        (["engine.zero_stage=2", "engine.offload_params=true"], "'engine.offload_params' needs engine.zero_stage=3, got 2"),
        (["engine.offload_optimizer=true"], "'engine.offload_optimizer' needs engine.zero_stage >= 1"),
        (["engine.kind=torch", "engine.zero_stage=3"], "'engine.zero_stage' needs engine.kind=deepspeed"),
        (["engine.reference_sharding=fsdp"], "'engine.reference_sharding' must be one of auto, zero3, replicated"),
        (["engine.generation_gather=never"], "'engine.generation_gather' must be one of auto, full, per_layer"),
        (["engine.deepspeed_config=ds.yaml"], "'engine.deepspeed_config' must name a .json file"),
        (["engine.deepspeed_config=/no/such/ds.json"], "'engine.deepspeed_config': file not found: /no/such/ds.json"),
    ],
)
def test_engine_keys_are_validated_with_one_line_errors(overrides, message):
    with pytest.raises(FastbondError, match=re.escape(message)):
        load_config(None, overrides)


def test_engine_kind_auto_follows_the_launcher():
    auto = load_config(None, []).engine
    assert resolve_engine_kind(auto, {}) == "torch"
    assert resolve_engine_kind(auto, {"LOCAL_RANK": "0", "WORLD_SIZE": "2"}) == "deepspeed"
    zero3 = load_config(None, ["engine.zero_stage=3"]).engine
    with pytest.raises(FastbondError, match="engine.zero_stage=3 needs DeepSpeed: launch with `deepspeed --num_gpus K"):
        resolve_engine_kind(zero3, {})
    assert resolve_engine_kind(zero3, {"LOCAL_RANK": "1"}) == "deepspeed"


def test_the_deepspeed_launchers_local_rank_argument_is_dropped():
    from fastbond.cli import strip_launcher_args

    assert strip_launcher_args(["train", "--local_rank=3", "run.yaml", "a=1"]) == ["train", "run.yaml", "a=1"]
    assert strip_launcher_args(["train", "--local_rank", "3", "run.yaml"]) == ["train", "run.yaml"]
