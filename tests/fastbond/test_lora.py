"""LoRA J-BOND (model.lora.r > 0) on the embedded tiny LM: π_ref is the base with adapters off, the anchor
adapter is the exact EMA of the policy adapter, checkpoints hold adapters and resume bit for bit, the
export is a plain merged model, every algorithm runs, and bad keys are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastbond.config import load_config
from fastbond.errors import FastbondError
from fastbond.presets import embedded_preset
from fastbond.train import setup_run, train, train_step

pytest.importorskip("peft")

LORA = ["model.lora.r=4", "model.lora.alpha=8"]
TINY = ["steps=2", "rollout.batch_size=4", "rollout.max_new_tokens=8", "evaluation.at_end=false",
        "logging.progress=false", "cpu_threads=1", *LORA]
SECTIONS = {
    "jbond": [],
    "iterative_bond": ["algorithm.n=4", "algorithm.mc_samples=4", "algorithm.anchor_period=1"],
    "bond": ["algorithm.n=4", "algorithm.mc_samples=4"],
    "vbon": ["algorithm.n=4", "algorithm.mc_samples=4"],
    "bonbon": ["algorithm.n=4"],
    "rloo": [],
}


def config(tmp_path, *overrides, algorithm="jbond"):
    return load_config(embedded_preset(), TINY + [f"run_dir={tmp_path / 'run'}", f"algorithm.name={algorithm}",
                                                  *SECTIONS[algorithm], *overrides])


class _Timer:
    def __call__(self, phase):
        from contextlib import nullcontext

        return nullcontext()


def _adapter(run, name):
    from fastbond.lora import adapter_parameters

    return {n: p.detach().clone() for n, p in adapter_parameters(run.engine.form.wrapped, name)}


def test_reference_is_the_base_and_the_anchor_the_exact_ema_of_the_policy(tmp_path, embedded_reference, reference):
    """Three steps by hand: π_ref's log-probs are the untouched base model's; the anchor adapter is
    θ_anc ← θ_anc + η(θ − θ_anc) of the policy adapter after each step, in fp64 to 1e-6."""
    from fastbond.logprobs import response_logprobs
    from fastbond.rollout import encode_prompts, sample

    run = setup_run(config(tmp_path, "algorithm.eta=0.3", "optim.lr=0.05", "optim.warmup_steps=0"))
    try:
        eta = run.config.algorithm.eta
        expected = {n: t.double() for n, t in _adapter(run, "anchor").items()}
        initial = _adapter(run, "policy")
        assert expected.keys() == initial.keys() and len(expected) > 0
        assert all(torch.equal(expected[n].float(), initial[n]) for n in initial)  # the anchor starts at the policy
        for _ in range(3):
            train_step(run, _Timer())
            run.step += 1
            policy = _adapter(run, "policy")
            expected = {n: e + eta * (policy[n].double() - e) for n, e in expected.items()}
        anchor = _adapter(run, "anchor")
        moved = max(float((policy[n] - anchor[n]).abs().max()) for n in anchor)
        assert moved > 1e-4  # the anchor trails the policy: not a copy
        for name, tensor in anchor.items():
            torch.testing.assert_close(tensor.double(), expected[name], atol=1e-6, rtol=0)

        # π_ref through the run's models equals the base loaded on its own; the policy differs from it.
        base, tokenizer = reference
        ids, mask = encode_prompts(tokenizer, ["the movie was"] * 4, 64, torch.device("cpu"))
        torch.manual_seed(0)
        samples = sample(base, tokenizer, ids, mask, 8)
        with torch.no_grad():
            want = response_logprobs(base, samples, backend="chunked")
            got = run.ctx.frozen_logps(run.models.reference, samples)
            policy_logps = run.ctx.frozen_logps(run.models.policy, samples)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert float((policy_logps - want).abs().max()) > 1e-3
        # the roles switch back: the policy adapter is active and the only trainable tensors
        trainable = {n for n, p in run.models.policy.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n and ".policy." in n for n in trainable)
    finally:
        if run.lock is not None:
            run.lock.release()


def test_checkpoints_hold_adapters_and_resume_exactly(tmp_path, embedded_reference):
    steps = ["checkpoint.every=2", "algorithm.eta=0.3"]
    straight = train(config(tmp_path / "a", "steps=4", *steps))
    train(config(tmp_path / "b", "steps=2", *steps))
    resumed = train(config(tmp_path / "b", "steps=4", "checkpoint.resume=true", *steps))
    for run_dir in (straight, resumed):
        policy = run_dir / "checkpoints" / "step-000004" / "policy"
        assert (policy / "adapter_config.json").is_file() and not (policy / "model.safetensors").exists()
    a = load_file(str(straight / "checkpoints" / "step-000004" / "policy" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-000004" / "policy" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    state_a = load_file(str(straight / "checkpoints" / "step-000004" / "tensors.safetensors"))
    state_b = load_file(str(resumed / "checkpoints" / "step-000004" / "tensors.safetensors"))
    anchors = [k for k in state_a if k.startswith("anchor.")]
    assert anchors and all(torch.equal(state_a[k], state_b[k]) for k in anchors)
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (straight, resumed)]
    assert losses[0] == losses[1]


def test_export_is_a_merged_from_pretrained_model(tmp_path, embedded_reference):
    from fastbond.logprobs import response_logprobs
    from fastbond.rollout import encode_prompts, sample

    run = setup_run(config(tmp_path, "optim.lr=0.05", "optim.warmup_steps=0"))
    try:
        for _ in range(2):
            train_step(run, _Timer())
            run.step += 1
        out = tmp_path / "exported"
        run.engine.export(out)
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        assert not any("lora" in name for name, _ in merged.named_parameters())
        tokenizer = run.models.tokenizer
        ids, mask = encode_prompts(tokenizer, ["the movie was"] * 4, 64, torch.device("cpu"))
        samples = sample(merged, tokenizer, ids, mask, 8)
        with torch.no_grad():
            want = run.ctx.frozen_logps(run.models.policy, samples)
            got = response_logprobs(merged, samples, backend="chunked")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # the run goes on with its adapters: exporting merged a copy
        assert any(".policy." in n for n, _ in run.models.policy.named_parameters())
    finally:
        if run.lock is not None:
            run.lock.release()


def test_fastbond_eval_judges_the_export_or_a_checkpoint_adapter_alike(tmp_path, embedded_reference, capsys):
    """`fastbond eval RUN_DIR` judges the merged export; `--policy …/checkpoints/step-2/policy` merges that
    adapter into the base first. The step-2 checkpoint is the final policy: the same judgement, and
    `fastbond merge` of it writes the export's tensors."""
    from fastbond.cli import main

    run_dir = train(config(tmp_path, "optim.lr=0.05", "checkpoint.every=2"))
    assert (run_dir / "checkpoints" / "step-000002" / "policy" / "adapter_model.safetensors").is_file()
    judged = {}
    for name, extra in (("export", []), ("adapter", ["--policy", str(run_dir / "checkpoints" / "step-000002" /
                                                                     "policy")])):
        assert main(["eval", str(run_dir), "evaluation.max_prompts=8", "evaluation.reference_samples=4", *extra]) == 0
        judged[name] = json.loads((run_dir / "eval.json").read_text())
    assert judged["adapter"]["policy_reward"] == judged["export"]["policy_reward"]
    assert judged["adapter"]["kl_policy_ref"] == pytest.approx(judged["export"]["kl_policy_ref"], abs=1e-5)
    assert judged["export"]["kl_policy_ref"] > 1e-3  # a trained policy, not the base

    # `fastbond merge RUN_DIR OUT`: the latest checkpoint's adapter merged, a plain model equal to the export
    assert main(["merge", str(run_dir), str(tmp_path / "merged")]) == 0
    merged, exported = (load_file(str(path / "model.safetensors"))
                        for path in (tmp_path / "merged", run_dir / "policy"))
    assert merged.keys() == exported.keys() and all(torch.equal(merged[k], exported[k]) for k in merged)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None
    capsys.readouterr()
    assert main(["merge", str(run_dir), str(tmp_path / "again"), "--policy", str(run_dir / "policy")]) != 0
    error = capsys.readouterr().err.strip()
    assert "holds no policy adapter (adapter_model.safetensors)" in error and "\n" not in error


@pytest.mark.parametrize("algorithm", list(SECTIONS))
def test_every_algorithm_trains_with_lora(tmp_path, embedded_reference, algorithm):
    run_dir = train(config(tmp_path, algorithm=algorithm))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert (run_dir / "policy" / "model.safetensors").is_file()  # the merged export


SHORT_RUN = ["steps=40", "evaluation.max_prompts=100", "evaluation.reference_samples=4", "logging.progress=false"]
WITH_HEAD = ["model.lora.r=64", "model.lora.alpha=64",
             "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"]


def test_lora_with_the_head_reaches_the_reward_of_full_jbond(tmp_path, embedded_reference):
    """40 steps of the embedded default (lr 2e-3, batch 64), judged on 100 held-out prompts × 4 samples: full
    J-BOND and LoRA J-BOND at r 64 with the LM head adapted reach comparable reward (measured: 0.83 ± 0.04
    and 0.97 ± 0.04; π_ref's −0.05). The sentiment reward is carried by which words the head favours:
    LoRA on the projections alone reaches 0.19, as does full J-BOND with the head and embeddings frozen."""
    rewards = {}
    for name, overrides in (("full", []), ("lora", WITH_HEAD)):
        run_dir = train(load_config(embedded_preset(), SHORT_RUN + [f"run_dir={tmp_path / name}", *overrides]))
        result = json.loads((run_dir / "eval.json").read_text())
        rewards[name] = (result["policy_reward"], result["policy_reward_stderr"], result["bon"]["1"]["reward"])
    (full, full_err, base), (lora, lora_err, _) = rewards["full"], rewards["lora"]
    assert full - base > 0.5  # J-BOND did learn in 40 steps
    assert lora >= full - 2 * (full_err + lora_err), rewards  # comparable: within two standard errors, or above


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.target_modules=[nope]"], "config key 'model.lora.target_modules': the model has no module "
                                           "named 'nope'"),
    (["model.lora.target_modules=[embed_tokens]"], "config key 'model.lora.target_modules': 'embed_tokens' (the "
                                                   "input embeddings) cannot be adapted"),
])
def test_bad_target_modules_are_one_line(tmp_path, embedded_reference, overrides, message):
    with pytest.raises(FastbondError) as error:
        train(config(tmp_path, *overrides))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_head_tied_to_the_embeddings_cannot_be_adapted():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastbond.config import LoraConfig
    from fastbond.lora import target_modules

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=True))
    with pytest.raises(FastbondError) as error:
        target_modules(LoraConfig(r=4, target_modules=["q_proj", "lm_head"]), tied)
    assert str(error.value).startswith("config key 'model.lora.target_modules': 'lm_head' is tied to the input "
                                       "embeddings") and "\n" not in str(error.value)


def _unfused_logps(module, samples):
    """[B, T] response log-probs from the model's own forward: full logits, the head's forward (and its adapter)."""
    position_ids = (samples.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = module(input_ids=samples.sequences, attention_mask=samples.attention_mask,
                    position_ids=position_ids).logits.float()
    start = samples.prompt_length
    logps = torch.log_softmax(logits[:, start - 1:-1], -1).gather(-1, samples.responses[..., None])[..., 0]
    return logps * samples.response_mask


def test_an_adapted_head_gives_the_fused_ops_its_merged_weight(tmp_path, embedded_reference):
    """lm_head in target_modules: the fused log-probs of every role (policy, anchor, π_ref) equal the model's own
    forward through the adapted head, and the head adapter's gradients through the fused op equal the forward's."""
    from fastbond.roles import as_module
    from fastbond.logprobs import response_logprobs
    from fastbond.lora import adapter_parameters
    from fastbond.rollout import encode_prompts, sample

    run = setup_run(config(tmp_path, "model.lora.target_modules=[q_proj,v_proj,lm_head]", "optim.lr=0.05",
                           "optim.warmup_steps=0", "algorithm.eta=0.5"))
    try:
        for _ in range(2):  # LoRA's B starts at zero: two steps make both adapters differ from the base and apart
            train_step(run, _Timer())
            run.step += 1
        ctx, models = run.ctx, run.models
        ids, mask = encode_prompts(models.tokenizer, ["the movie was", "a film", "i", "this one is"], 64,
                                   torch.device("cpu"))
        torch.manual_seed(0)
        samples = sample(models.policy, models.tokenizer, ids, mask, 8)
        head = {n: p for n, p in adapter_parameters(run.engine.form.wrapped, "policy") if "lm_head" in n}
        assert head and all(float(p.detach().abs().max()) > 0 for p in head.values())
        for role in (models.policy, models.anchor.model, models.reference):
            with torch.no_grad():
                fused = ctx.frozen_logps(role, samples)
                with as_module(role) as module:
                    unfused = _unfused_logps(module, samples)
            torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=0)
        with torch.no_grad():
            anchor_logps = ctx.frozen_logps(models.anchor.model, samples)
            base_logps = ctx.frozen_logps(models.reference, samples)
        assert float((anchor_logps - base_logps).abs().max()) > 1e-4  # the roles do differ

        weights = torch.linspace(-1.0, 2.0, samples.response_mask.numel()).view_as(samples.response_mask.float())
        grads = []
        for logps_of in (lambda: response_logprobs(models.policy, samples, backend="chunked"),
                         lambda: _unfused_logps(models.policy, samples)):
            for p in head.values():
                p.grad = None
            (weights * logps_of()).sum().backward()
            grads.append({n: p.grad.clone() for n, p in head.items()})
        for name in head:
            assert float(grads[1][name].abs().max()) > 0
            torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)
    finally:
        if run.lock is not None:
            run.lock.release()


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.r=-1"], "config key 'model.lora.r' must be >= 0, got -1"),
    (["model.lora.alpha=0"], "config key 'model.lora.alpha' must be"),
    (["model.lora.dropout=1"], "config key 'model.lora.dropout' must lie in [0, 1), got 1.0"),
    (["model.lora.target_modules=q_proj"], "config key 'model.lora.target_modules' must be a list"),
    (["model.lora.rank=4"], "unknown config key 'model.lora.rank'"),
])
def test_bad_lora_keys_are_one_line(overrides, message):
    with pytest.raises(FastbondError) as error:
        load_config(None, LORA + overrides, check_paths=False)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_bf16_base_keeps_fp32_adapters(tmp_path, embedded_reference):
    """The frozen base in the compute dtype (no fp32 master copy), the trained adapters in fp32."""
    run = setup_run(config(tmp_path, "model.dtype=bfloat16"))
    try:
        dtypes = {("lora_" in n): p.dtype for n, p in run.models.policy.named_parameters()}
        assert dtypes == {False: torch.bfloat16, True: torch.float32}
        metrics = train_step(run, _Timer())
        assert torch.isfinite(torch.as_tensor(metrics["loss"]))
    finally:
        if run.lock is not None:
            run.lock.release()


def test_plan_fits_gemma_7b_lora_on_one_80gb_gpu():
    """`fastbond plan examples/gemma-7b-lora.yaml --gpus 1`: the bf16 base (π_ref too), fp32 adapters and
    their optimizer state, the reward model; under half of full one-process J-BOND's bytes and room left."""
    from pathlib import Path

    from fastbond.plan import fit_line, plan_for_config

    example = Path(__file__).parents[2] / "examples" / "gemma-7b-lora.yaml"
    lora_plan = plan_for_config(load_config(str(example), check_paths=False), 1)
    full_plan = plan_for_config(load_config(str(example), ["model.lora.r=0"], check_paths=False), 1)
    lora_bytes, full_bytes = lora_plan.totals()[0], full_plan.totals()[0]
    assert lora_bytes < 0.5 * full_bytes
    assert lora_plan.row("base params").device == 2 * 8_537_680_896  # Gemma-7B in bf16, counted once
    # r = 16 on q, k, v, o (3072 → 4096 → 3072, 16 heads of 256) and gate, up, down (3072 ↔ 24576), 28 layers
    per_layer = 16 * ((3072 + 4096) * 3 + (4096 + 3072) + (3072 + 24576) * 2 + (24576 + 3072))
    assert lora_plan.row("policy adapter (fp32)").device == 4 * 28 * per_layer
    line = fit_line(lora_plan, 80)
    assert line.startswith("fits a 80 GiB GPU") and float(line.split(", ")[1].split(" GiB")[0]) > 40
    assert fit_line(full_plan, 80).startswith("does not fit")



def test_plan_shards_lora_under_zero3():
    """`fastbond plan examples/gemma-7b-lora.yaml engine.kind=deepspeed engine.zero_stage=3 --gpus 8`: the base
    and both adapters sharded over 8 ranks (padding per tensor), the anchor's fp32 state beside its bf16 adapter;
    a fifth of what full J-BOND holds per rank on the same 8 GPUs. (Row by row against a running job:
    tests/distributed, memory_matches_plan.) An adapted head adds its merged weight and gradient, transiently."""
    import math
    from pathlib import Path

    from fastbond.plan import plan_for_config

    example = str(Path(__file__).parents[2] / "examples" / "gemma-7b-lora.yaml")
    zero3 = ["engine.kind=deepspeed", "engine.zero_stage=3"]
    lora_plan = plan_for_config(load_config(example, zero3, check_paths=False), 8)
    full_plan = plan_for_config(load_config(example, zero3 + ["model.lora.r=0"], check_paths=False), 8)
    assert lora_plan.totals()[0] < 0.2 * full_plan.totals()[0]
    assert lora_plan.row("base params").device == 2 * full_plan.row("policy params").device / 2  # the same shard
    adapter = lora_plan.row("policy adapter (bfloat16)").device
    assert adapter == lora_plan.row("anchor adapter").device and lora_plan.row("anchor EMA state").device == 2 * adapter
    per_layer = [16 * n for n in (3072, 4096, 3072, 4096, 3072, 4096, 4096, 3072, 3072, 24576, 3072, 24576,
                                  24576, 3072)]  # A then B of q, k, v, o, gate, up, down
    assert adapter == 2 * 28 * sum(math.ceil(n / 8) for n in per_layer)
    head = plan_for_config(load_config(example, zero3[:1] + ["engine.zero_stage=2",
                                                             "model.lora.target_modules=[q_proj,lm_head]"],
                                       check_paths=False), 8, model="llama-3-8b")  # Gemma's head is tied
    assert head.row("adapted LM head: merged weight").device == 2 * 128256 * 4096
    assert head.row("adapted LM head: merged weight").transient


def test_plan_prints_lora_against_full_jbond(capsys):
    """`fastbond plan` of a LoRA config ends with the same run without LoRA, on the same GPUs."""
    from pathlib import Path

    from fastbond.cli import main

    example = str(Path(__file__).parents[2] / "examples" / "gemma-7b-lora.yaml")
    assert main(["plan", example, "--gpus", "1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("against full J-BOND (model.lora.r=0) on the same GPUs: 32.7 GiB per rank against "
                           "206.7 GiB (0.16×); full J-BOND does not fit a 80 GiB GPU")
    assert main(["plan", str(Path(example).with_name("gemma-7b-zero3.yaml")), "--gpus", "8"]) == 0
    assert "against full J-BOND" not in capsys.readouterr().out  # not a LoRA config: nothing to compare
