"""`fastbond train` end to end on the embedded tiny LM: every algorithm, the
fused log-prob path against the model's own logits, the fp32 anchor, and
resume equality (also after a save killed midway)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastbond.algorithms import ALGORITHMS
from fastbond.anchor import EMAAnchor
from fastbond.config import load_config
from fastbond.logprobs import response_logprobs
from fastbond.presets import embedded_preset
from fastbond.rollout import encode_prompts, sample
from fastbond.train import train

TINY = [
    "steps=2",
    "rollout.batch_size=4",
    "rollout.max_new_tokens=8",
    "evaluation.at_end=false",
    "logging.progress=false",
    "cpu_threads=1",
]
# Each algorithm's section at a tiny size (keys of other algorithms are errors).
TINY_SECTIONS = {
    "jbond": [],
    "bond": ["algorithm.n=4", "algorithm.mc_samples=4"],
    "iterative_bond": ["algorithm.n=4", "algorithm.mc_samples=4", "algorithm.anchor_period=1"],
    "vbon": ["algorithm.n=4", "algorithm.mc_samples=4"],
    "bonbon": ["algorithm.n=4"],
    "rloo": [],
}


def tiny_config(tmp_path, *overrides, algorithm: str = "jbond"):
    section = [f"algorithm.name={algorithm}"] + TINY_SECTIONS[algorithm]
    return load_config(embedded_preset(), TINY + section + [f"run_dir={tmp_path / 'run'}"] + list(overrides))


def policy_weights(run_dir):
    return load_file(str(run_dir / "policy" / "model.safetensors"))


def test_fused_logprobs_match_the_models_own_logits(reference):
    model, tokenizer = reference
    prompts = ["review of the dark river :", "i thought the lost machine was", "the cast was"]
    ids, mask = encode_prompts(tokenizer, prompts, 32, torch.device("cpu"))
    assert (mask == 0).any(), "prompts of different lengths must exercise left padding"
    drawn = sample(model, tokenizer, ids, mask, max_new_tokens=8)
    fused = response_logprobs(model, drawn, backend="chunked")

    positions = (drawn.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(drawn.sequences, attention_mask=drawn.attention_mask, position_ids=positions).logits
    start = drawn.prompt_length
    expected = torch.log_softmax(logits[:, start - 1 : -1].double(), -1).gather(-1, drawn.responses.unsqueeze(-1))
    expected = expected.squeeze(-1) * drawn.response_mask
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-5)
    assert (fused[drawn.response_mask] < 0).all()


@pytest.mark.smoke
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_trains_a_few_steps(tmp_path, embedded_reference, algorithm):
    config = tiny_config(tmp_path, algorithm=algorithm)
    run_dir = train(config)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["loss"] is not None and record["kl_ref"] is not None
        assert record.get("skipped_step") is None
        assert all(record[f"time/{phase}"] >= 0 for phase in ("generate", "logprobs", "backward", "ema"))
    # the policy is saved in transformers format, loads, and moved away from π_ref
    AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    initial = load_file(str(embedded_reference / "model.safetensors"))
    trained = policy_weights(run_dir)
    assert any(not torch.equal(initial[name], trained[name]) for name in initial)
    assert (run_dir / "report.png").stat().st_size > 0
    assert (run_dir / "config.yaml").is_file()


def test_anchor_keeps_fp32_state_under_a_bf16_model(reference):
    model, _ = reference
    anchor = EMAAnchor(model, torch.bfloat16)
    assert all(state.dtype == torch.float32 for state in anchor.state)
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(1e-3)
    for _ in range(10):
        anchor.update(policy, 0.01)
    first_state, first_policy = anchor.state[0], next(policy.parameters()).detach()
    first_initial = next(model.parameters()).detach()
    # fp32 EMA after 10 steps: θ0 + (1 − 0.99^10)·1e-3, far below a bf16 ulp of most weights
    expected = first_initial + (1 - 0.99**10) * (first_policy - first_initial)
    torch.testing.assert_close(first_state, expected, atol=1e-7, rtol=0)
    for state, shadow in zip(anchor.state, anchor.shadow):
        assert shadow.dtype == torch.bfloat16 and torch.equal(shadow, state.to(torch.bfloat16))


def _resume_overrides(steps):
    return [f"steps={steps}", "checkpoint.every=2", "algorithm.eta=0.3"]


def test_resume_continues_exactly(tmp_path, embedded_reference):
    straight = train(tiny_config(tmp_path / "a", *_resume_overrides(4)))
    train(tiny_config(tmp_path / "b", *_resume_overrides(2)))
    resumed = train(tiny_config(tmp_path / "b", *_resume_overrides(4), "checkpoint.resume=true"))
    expected, got = policy_weights(straight), policy_weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    # the anchor's EMA state continued too
    anchor_a = load_file(str(straight / "checkpoints" / "step-000004" / "tensors.safetensors"))
    anchor_b = load_file(str(resumed / "checkpoints" / "step-000004" / "tensors.safetensors"))
    for name in anchor_a:
        if name.startswith("anchor."):
            assert torch.equal(anchor_a[name], anchor_b[name]), name
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_after_a_save_killed_midway(tmp_path, embedded_reference, monkeypatch):
    from fastbond import checkpoint

    straight = train(tiny_config(tmp_path / "a", *_resume_overrides(4)))
    train(tiny_config(tmp_path / "b", *_resume_overrides(2)))

    real_save_file = checkpoint.save_file

    def killed_at_step_4(tensors, path, *args, **kwargs):
        if "step-000004" in str(path):
            raise KeyboardInterrupt("killed while saving")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "b", *_resume_overrides(4), "checkpoint.resume=true"))
    monkeypatch.undo()
    run_b = tmp_path / "b" / "run"
    assert (run_b / "checkpoints" / "latest").read_text().strip() == "step-000002"

    resumed = train(tiny_config(tmp_path / "b", *_resume_overrides(4), "checkpoint.resume=true"))
    expected, got = policy_weights(straight), policy_weights(resumed)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_eval_command_judges_a_trained_run(tmp_path, embedded_reference):
    from fastbond.cli import main

    run_dir = train(tiny_config(tmp_path))
    code = main(["eval", str(run_dir), "evaluation.max_prompts=4", "evaluation.reference_samples=16",
                 "evaluation.policy_samples=2"])
    assert code == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["prompts"] == 4
    assert list(result["bon"]) == ["1", "2", "4", "8", "16"]
    rewards = [result["bon"][n]["reward"] for n in result["bon"]]
    assert rewards == sorted(rewards), "E[max of N] cannot decrease with N"
    assert result["bon"]["4"]["kl_bound"] == pytest.approx(0.6362943611198906)
    assert 0.0 <= result["win_rate_vs_ref"] <= 1.0


def test_example_gemma_config_is_valid(tmp_path):
    from pathlib import Path

    example = Path(__file__).parents[2] / "examples" / "gemma-2b-jbond.yaml"
    for name in ("sft", "rm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    config = load_config(example, [f"model.policy={tmp_path / 'sft'}", f"reward.name={tmp_path / 'rm'}",
                                   f"data.prompts={prompts}", f"data.eval_prompts={prompts}"])
    assert config.algorithm.name == "jbond" and config.optim.lr == 3e-6 and config.algorithm.eta == 0.02
    assert config.model.dtype == "bfloat16" and config.rollout.batch_size == 128


def test_bonbon_resume_reuses_its_offline_pairs(tmp_path, embedded_reference):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cast was\nreview of the dark river :\n")
    overrides = ["checkpoint.every=2", f"data.prompts={prompts}"]
    straight = train(tiny_config(tmp_path / "a", "steps=4", *overrides, algorithm="bonbon"))
    train(tiny_config(tmp_path / "b", "steps=2", *overrides, algorithm="bonbon"))
    resumed = train(tiny_config(tmp_path / "b", "steps=4", "checkpoint.resume=true", *overrides, algorithm="bonbon"))
    expected, got = policy_weights(straight), policy_weights(resumed)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_gradient_checkpointing_gives_the_same_step(tmp_path, embedded_reference):
    plain = train(tiny_config(tmp_path / "plain", "steps=1"))
    checkpointed = train(tiny_config(tmp_path / "ckpt", "steps=1", "model.gradient_checkpointing=true"))
    expected, got = policy_weights(plain), policy_weights(checkpointed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(expected[n], load_file(str(embedded_reference / "model.safetensors"))[n])
               for n in expected)
