"""DeepSpeed ZeRO on 2 CPU ranks over gloo: sharded anchor, fused log-probs, engine, checkpoints.

One launch (`torch.distributed.run --nproc_per_node 2 workers.py`) runs every
scenario of `workers.py` on both ranks; each test below reads what its
scenario wrote. About 30 s on 2 cores once DeepSpeed's CPU communication op
is built; the very first DeepSpeed run on a machine compiles that op
(`deepspeed_shm_comm`, ~2 minutes, cached in ~/.cache/torch_extensions).

Tolerances: the sharded EMA is the same elementwise kernel on the same
numbers, so it must agree bit for bit; gradients and weights after AdamW
steps differ from the one-process run only by the summation order of the
gradient average over ranks (float32: ≤ 1e-5 relative).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

pytestmark = pytest.mark.distributed

WORKERS = Path(__file__).with_name("workers.py")
RANKS = 2
LAUNCH_TIMEOUT_S = 900  # the first run on a machine also compiles DeepSpeed's CPU comm op


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Run every scenario on 2 ranks once; returns (output dir, launcher's log tail)."""
    out = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)  # no Triton kernel runs on CPU ranks
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={RANKS}",
               f"--master_port={_free_port()}", str(WORKERS), str(out)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                              cwd=WORKERS.parents[2])
        log = (done.stdout + done.stderr)[-6000:]
    except subprocess.TimeoutExpired as error:
        log = f"launch timed out after {LAUNCH_TIMEOUT_S} s\n{(error.stderr or b'')[-6000:]!r}"
    return out, log


def results(launch, name: str) -> list[dict]:
    """The scenario's result on every rank; fails with the worker's traceback if it failed."""
    out, log = launch
    found = []
    for rank in range(RANKS):
        path = out / f"{name}.rank{rank}.json"
        if not path.is_file():
            pytest.fail(f"scenario {name} wrote nothing on rank {rank}; launcher log:\n{log}")
        result = json.loads(path.read_text())
        if not result["ok"]:
            pytest.fail(f"scenario {name} failed on rank {rank}:\n{result['error']}")
        found.append(result)
    return found


# --------------------------------------------------------------------------- #
# sharded EMA
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["ema_zero3_fp32", "ema_zero3_bf16_tied", "ema_zero2_fp32"])
def test_sharded_ema_equals_unsharded_ema(launch, name):
    """The fp32 state gathered from the shards equals EMAAnchor's over whole tensors, bit for bit,
    and the anchor's own forward (through ZeRO's hooks) equals the unsharded anchor's."""
    for result in results(launch, name):
        assert result["state_diff"] == 0.0
        assert result["forward_diff"] == 0.0
        assert result["moved"] > 1e-2  # the anchor did move away from π_ref
    local = [r["local_numel"] for r in results(launch, name)]
    full = results(launch, name)[0]["full_numel"]
    if "zero3" in name:
        assert max(local) < full  # each rank holds its shard only
        assert full <= sum(local) <= full + 2 * 21  # padding: at most one element per tensor and rank
    else:
        assert local == [full, full]  # ZeRO-2: weights (and the anchor) replicated


def test_stale_gathered_copies_are_dropped_after_the_ema(launch):
    """Negative control: without the release after the update, ZeRO-3 keeps serving the
    anchor's old gathered weights and its forward drifts from the true anchor."""
    for result in results(launch, "ema_zero3_fp32"):
        assert result["forward_diff_without_release"] > 1e-3


@pytest.mark.parametrize("stage", ["zero3", "zero2"])
def test_no_collective_runs_during_the_ema(launch, stage):
    for result in results(launch, "ema_without_collectives"):
        case = result[stage]
        assert case["calls"] == []
        assert case["tensors_changed"] == case["tensors"]  # the update did happen
        assert case["control_caught"], "the watcher must catch the gather a naive EMA would issue"


# --------------------------------------------------------------------------- #
# fused log-probs under ZeRO-3
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("tying", ["tied", "untied"])
def test_fused_logprob_gradients_under_zero3_match_zero0(launch, tying):
    for result in results(launch, "fused_logprob_grads_zero3"):
        case = result[tying]
        assert case["empty_outside_forward"], "the trap: lm_head.weight is an empty shard outside its forward"
        assert case["loss_diff"] <= 1e-6
        assert case["head_grad_norm"] > 0
        assert case["head_grad_rel_diff"] <= 1e-5
        assert case["grad_rel_diff"] <= 1e-5
        assert case["reference_sharded"] and case["reference_logp_diff"] <= 1e-5


# --------------------------------------------------------------------------- #
# the engine
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", [f"engine_matches_torch_zero{stage}" for stage in (3, 2, 1, 0)])
def test_zero_optimizer_steps_like_torch_optimizer(launch, name):
    """Each rank holds half the batch; the averaged step equals TorchOptimizer on the whole batch,
    a non-finite gradient is skipped by both, and a NaN loss is skipped on every rank."""
    for result in results(launch, name):
        for step in result["steps"]:
            assert step["applied"] == step["ref_applied"]
            assert step["lr"] == pytest.approx(step["ref_lr"], rel=1e-12)
            if step["applied"]:
                assert step["norm"] == pytest.approx(step["ref_norm"], rel=1e-5)
            else:
                assert not math.isfinite(step["norm"]) and not math.isfinite(step["ref_norm"])
            assert step["weight_diff"] <= 1e-5
        assert [s["applied"] for s in result["steps"]] == [True, True, False, True]
        assert result["nan_loss_step"][0] is False
        assert result["weight_diff_after_nan_loss"] <= 1e-5
        assert result["weight_diff_after_next_step"] <= 1e-5


def test_resume_on_two_ranks_continues_identically(launch):
    for result in results(launch, "checkpoint_resume_zero3"):
        assert result["resumed_at"] == 2
        assert result["policy_diff"] == 0.0
        assert result["anchor_diff"] == 0.0
        assert result["lr"][0] == result["lr"][1]
        assert result["steps"] == [4, 4]
        assert result["anchor_files"] == ["anchor-rank00000-of-00002.safetensors",
                                          "anchor-rank00001-of-00002.safetensors"]


def test_export_loads_with_from_pretrained_and_matches_gathered_weights(launch):
    """Loaded here, in a process without DeepSpeed: fp32 master weights exactly, and in bf16
    exactly the weights the ranks computed with; the tied head stays tied."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    results(launch, "export_zero3")
    out, _ = launch
    model = AutoModelForCausalLM.from_pretrained(out / "export-zero3")
    assert next(model.parameters()).dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    weights = {name: p.detach() for name, p in model.named_parameters()}
    master = load_file(str(out / "export-zero3-master.safetensors"))
    gathered = load_file(str(out / "export-zero3-gathered.safetensors"))
    assert weights.keys() == master.keys() == gathered.keys()
    for name, weight in weights.items():
        assert torch.equal(weight, master[name]), name
        assert torch.equal(weight.to(torch.bfloat16).float(), gathered[name]), name


@pytest.mark.parametrize("name", ["lora_zero3", "lora_head_zero3", "lora_zero2", "lora_zero1", "lora_zero0"])
def test_lora_under_zero_matches_one_process(launch, name):
    """LoRA J-BOND's pieces under ZeRO on 2 ranks against one process: the policy adapter steps as
    TorchOptimizer's on the whole batch, the anchor adapter's fp32 state is the EMA of it (shard-local,
    no collective), the anchor's and π_ref's forwards agree, and the base does not move. With the LM head
    adapted (lora_head_zero3), the fused op gets the merged head of gathered base and factors, and its
    gradient reaches the head adapter's shards."""
    for result in results(launch, name):
        assert result["sharded"] is ("zero3" in name)
        assert bool(result["head_tensors"]) is ("head" in name)
        assert result["ema_collectives"] == []
        assert result["trainable_all_policy_adapter"]
        assert result["base_diff"] == 0.0
        assert result["anchor_trails_policy"] > 1e-3  # the anchor is an EMA, not a copy
        for step in result["steps"]:
            assert step["applied"] and step["norm"] > 0
            assert step["policy_adapter_diff"] <= 1e-5
            assert step["anchor_state_diff"] <= 1e-5
            assert step["forward_diff"]["anchor"] <= 1e-5 and step["forward_diff"]["reference"] <= 1e-5


@pytest.mark.parametrize("case", ["zero3_bfloat16", "zero3_float32", "zero2_bfloat16", "zero1_float32",
                                  "lora_zero3_bfloat16", "lora_zero3_float32", "lora_zero2_bfloat16",
                                  "lora_zero0_float32"])
def test_memory_report_agrees_with_the_plan(launch, case):
    """Every row `fastbond plan` predicts (gradients aside: not held between steps) equals the
    bytes the running ranks hold, ZeRO-3 padding included; under LoRA, row by row for the base,
    the two adapters, the policy adapter's master copy and moments, and the anchor's EMA state."""
    for result in results(launch, "memory_matches_plan"):
        planned, measured = result[case]["planned"], result[case]["measured"]
        planned.pop("policy adapter grads" if case.startswith("lora") else "policy grads")
        assert measured == planned
        assert result[case]["report_lines"] >= len(planned) + 2


def test_generation_gathers_once_per_rollout_or_per_layer(launch):
    for result in results(launch, "generation_zero3"):
        assert result["ds_threshold"] == 0  # the user's JSON override reached DeepSpeed
        assert all(result["equal"].values()), result["equal"]  # same tokens as the unsharded model
        full, per_layer, auto = (result["counts"][m] for m in ("full", "per_layer", "auto"))
        assert full["gathered_elements"] == result["model_elements"]  # every weight, once
        assert full["gathers_while_generating"] == 0 and full["synced"] is False
        assert auto == full  # a tiny model fits
        assert per_layer["synced"] is True
        assert per_layer["gathered_elements"] >= (result["new_tokens"] - 1) * result["model_elements"]
        assert result["step_after"] is True


def test_ranks_agree_on_skipping_and_average_metrics(launch):
    for result in results(launch, "ranks_agree"):
        assert result["one_rank_false"] is False and result["all_true"] is True
        # means 2 and 4, averaged; a maximum stays the largest rank's
        assert result["metrics"] == {"loss": 3.0, "lr": 0.5, "rollout/logp_gap_max": 2e-6}
