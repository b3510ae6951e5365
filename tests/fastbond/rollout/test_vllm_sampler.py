"""rollout.backend=vllm against the trainer's own model, with vLLM's CPU build.

These run where vLLM is installed: `.ci/run` builds that environment
(`.ci/vllm_env.sh`) and runs `pytest -m vllm` in it after the main suite.
Elsewhere they skip, saying so; the main suite never needs vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from fastbond.errors import FastbondError

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed here; .ci/run runs these in .ci/vllm_env.sh's environment"),
]

SET_NUM_THREADS = torch.set_num_threads  # before any engine: vLLM replaces it with a no-op
SETTINGS = dict(gpu_memory_utilization=0.3, sleep_mode=False, enforce_eager=True, cpu_kv_cache_gib=1.0,
                max_logp_gap=0.5, check_every=1)


@pytest.fixture(scope="module")
def engine(embedded_reference):
    from fastbond.config import VLLMConfig
    from fastbond.rollout.vllm_sampler import VLLMRunner

    return VLLMRunner(embedded_reference, torch.float32, torch.device("cpu"), seed=0, max_model_len=96,
                       settings=VLLMConfig(**SETTINGS))


def test_building_the_engine_leaves_the_trainers_process_as_it_was(embedded_reference):
    """LLM(seed=…) reseeds torch, random and numpy, and vLLM replaces torch.set_num_threads: all put back.

    First in this file: the engine it builds is gone before the module's `engine` fixture is built (one
    engine's end tears down vLLM's process-wide parallel groups, which a live engine still uses)."""
    import random

    import numpy as np

    from fastbond.config import VLLMConfig
    from fastbond.rollout.vllm_sampler import VLLMRunner

    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    threads = torch.get_num_threads()
    VLLMRunner(embedded_reference, torch.float32, torch.device("cpu"), seed=0, max_model_len=96,
                settings=VLLMConfig(**SETTINGS))
    assert torch.set_num_threads is SET_NUM_THREADS and torch.get_num_threads() == threads
    after = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    assert torch.equal(after[0], torch.rand(3)) and after[1] == random.random() and after[2] == np.random.rand()


@pytest.fixture()
def model(reference):
    """A fresh copy of the embedded π_ref per test: tests move its weights."""
    import copy

    return copy.deepcopy(reference[0]).eval()


def _prompts(tokenizer, texts, repeat=1):
    from fastbond.rollout import Prompts, encode_prompts

    ids, mask = encode_prompts(tokenizer, texts, 64, torch.device("cpu"))
    return Prompts(texts, ids, mask).repeated(repeat)


def _texts(n=4):
    from fastbond.data import resolve_prompts

    return resolve_prompts("embedded", "train")[:n]


def _seeds(prompts, step=1):
    from fastbond.rollout import KeyedNoise

    noise = KeyedNoise(0)
    noise.start_step(step)
    return noise.row_keys(prompts.index, prompts.sample).tolist()


def _draw(engine, model, tokenizer, prompts, seeds=None, temperature=1.0):
    from fastbond.rollout import eos_token_ids

    return engine.draw(model, tokenizer, prompts, 16, temperature, seeds or _seeds(prompts),
                       eos_token_ids(model, tokenizer))


def _trainer_logps(model, samples, temperature=1.0):
    from fastbond.logprobs import response_logprobs

    with torch.no_grad():
        return response_logprobs(model, samples, temperature=temperature, backend="chunked")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_log_probs_match_the_trainer(engine, model, reference, temperature):
    tokenizer = reference[1]
    prompts = _prompts(tokenizer, _texts(), repeat=4)
    samples, engine_logps = _draw(engine, model, tokenizer, prompts, temperature=temperature)
    mask = samples.response_mask
    assert mask.any() and samples.texts[0] is not None
    gap = (engine_logps - _trainer_logps(model, samples, temperature)).abs()[mask]
    assert float(gap.max()) < 1e-4, f"max gap {float(gap.max()):.3g}"
    assert bool((engine_logps[~mask] == 0).all())
    # Layout as generate's: left-padded prompt, response padded after its first EOS.
    assert torch.equal(samples.sequences[:, : samples.prompt_length], prompts.ids)
    assert bool((samples.responses[~mask] == tokenizer.pad_token_id).all())


def test_the_engine_samples_from_the_current_weights(engine, model, reference):
    """A moved model is pushed on the next draw once weights_changed() says so; without it the gap shows."""
    tokenizer = reference[1]
    prompts = _prompts(tokenizer, _texts(), repeat=4)
    _draw(engine, model, tokenizer, prompts)  # the engine now holds `model`
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    stale, stale_logps = _draw(engine, model, tokenizer, prompts)  # not told: still the old weights
    stale_gap = (stale_logps - _trainer_logps(model, stale)).abs()[stale.response_mask]
    assert float(stale_gap.max()) > 1e-2
    engine.weights_changed()
    fresh, fresh_logps = _draw(engine, model, tokenizer, prompts)
    gap = (fresh_logps - _trainer_logps(model, fresh)).abs()[fresh.response_mask]
    assert float(gap.max()) < 1e-4


def test_switching_models_pushes_each_ones_weights(engine, model, reference):
    """Policy, anchor, π_ref: the engine follows whichever model it is handed."""
    import copy

    tokenizer = reference[1]
    other = copy.deepcopy(model)
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(1.3)
    prompts = _prompts(tokenizer, _texts(), repeat=2)
    for m in (model, other, model):
        samples, logps = _draw(engine, m, tokenizer, prompts)
        gap = (logps - _trainer_logps(m, samples)).abs()[samples.response_mask]
        assert float(gap.max()) < 1e-4


def test_a_request_seed_fixes_its_draw_whatever_its_batch(engine, model, reference):
    tokenizer = reference[1]
    prompts = _prompts(tokenizer, _texts(8), repeat=1)
    seeds = _seeds(prompts)
    whole, _ = _draw(engine, model, tokenizer, prompts, seeds)
    again, _ = _draw(engine, model, tokenizer, prompts, seeds)
    assert whole.texts == again.texts
    alone, _ = _draw(engine, model, tokenizer, prompts.rows([5]), seeds[5:6])
    assert alone.texts == whole.texts[5:6]
    other, _ = _draw(engine, model, tokenizer, prompts, [s + 1 for s in seeds])
    assert other.texts != whole.texts


def test_same_distribution_as_generate(engine, model, reference):
    """Two-sample χ² on the first response word of one prompt, 600 draws per engine."""
    from fastbond.rollout import sample

    tokenizer = reference[1]
    prompts = _prompts(tokenizer, _texts(1), repeat=600)
    prompts.sample = list(range(600))  # distinct request seeds
    via_vllm, _ = _draw(engine, model, tokenizer, prompts)
    torch.manual_seed(1)
    via_generate = sample(model, tokenizer, prompts.ids, prompts.mask, 16)
    first_vllm = via_vllm.responses[:, 0].tolist()
    first_generate = via_generate.responses[:, 0].tolist()
    tokens = sorted(set(first_vllm) | set(first_generate))
    counts = torch.tensor([[first_vllm.count(t), first_generate.count(t)] for t in tokens], dtype=torch.float64)
    counts = counts[counts.sum(1) >= 10]  # χ² wants expected counts of 5 or more
    assert counts.shape[0] >= 3, "the first word should vary"
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = counts.shape[0] - 1
    # P(χ²_dof > dof + 5·sqrt(2·dof)) < 1e-3 for these dof: a real difference fails, chance does not
    assert chi2 < dof + 5 * math.sqrt(2 * dof), f"χ² {chi2:.1f} with {dof} degrees of freedom"


def test_the_gap_guard_trips_on_stale_weights(engine, model, reference):
    tokenizer = reference[1]
    prompts = _prompts(tokenizer, _texts(), repeat=2)
    engine.pop_metrics()
    samples, logps = _draw(engine, model, tokenizer, prompts)
    engine.record_gap(logps, _trainer_logps(model, samples), samples.response_mask)
    assert engine.gap_ok()
    engine.record_gap(logps + 0.7 * samples.response_mask, _trainer_logps(model, samples), samples.response_mask)
    assert not engine.gap_ok()
    message = str(engine.gap_error(3))
    assert "\n" not in message and "max_logp_gap" in message and "0.7" in message
    metrics = engine.pop_metrics()
    assert metrics["rollout/logp_gap_max"] == pytest.approx(0.7, abs=1e-4)
    assert engine.gap_ok()  # popped: the next step starts clean


def test_an_unsupported_head_size_is_one_line(tmp_path, reference):
    from transformers import LlamaForCausalLM

    from fastbond.config import VLLMConfig
    from fastbond.rollout.vllm_sampler import VLLMRunner

    config = reference[0].config.to_dict()
    config.update(num_attention_heads=4, num_key_value_heads=4, head_dim=16)  # head size 16
    from transformers import LlamaConfig

    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(tmp_path)
    with pytest.raises(FastbondError) as error:
        VLLMRunner(tmp_path, torch.float32, torch.device("cpu"), seed=0, max_model_len=96,
                    settings=VLLMConfig(**SETTINGS))
    message = str(error.value)
    assert "\n" not in message and "head size 16" in message and "rollout.backend=generate" in message
    assert json.loads((tmp_path / "config.json").read_text())["num_attention_heads"] == 4


def _train(cache, *overrides):
    """`fastbond train` in its own process: vLLM keeps process-wide state (its parallel groups) that a
    second engine's end would tear down under this module's engine."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, FASTBOND_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "fastbond", "train", *TRAIN, *overrides], env=env,
                          capture_output=True, text=True, timeout=600)


TRAIN = ["steps=2", "rollout.batch_size=8", "rollout.max_new_tokens=8", "evaluation.at_end=false",
         "logging.progress=false", "rollout.backend=vllm", "rollout.vllm.cpu_kv_cache_gib=0.25"]


@pytest.mark.parametrize("algorithm, pushes", [("jbond", 2), ("rloo", 1)])
def test_training_with_vllm_rollouts_logs_the_gap_and_the_pushes(tmp_path, fastbond_cache, algorithm, pushes):
    """J-BOND pushes the policy, then the anchor, each step; REINFORCE samples the policy alone, so
    only the step's weight change makes the engine take the moved policy."""
    from fastbond.metrics_log import read_metrics

    run_dir = tmp_path / "run"
    done = _train(fastbond_cache, f"run_dir={run_dir}", f"algorithm.name={algorithm}")
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["rollout/logp_gap_max"] < 1e-4  # fp32 on both sides
        assert record["rollout/weight_pushes"] == pushes
        assert math.isfinite(record["loss"])


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="model.lora needs peft")
def test_lora_roles_are_pushed_with_their_adapter_merged(tmp_path, fastbond_cache):
    """LoRA J-BOND on vLLM: the policy and the anchor are the base with their own adapter merged in.
    After step 1 the two adapters differ, so a wrong merge (or none) shows as a gap at step 2."""
    from fastbond.metrics_log import read_metrics

    run_dir = tmp_path / "run"
    done = _train(fastbond_cache, f"run_dir={run_dir}", "model.lora.r=8", "model.lora.alpha=16", "optim.lr=0.05",
                  "optim.warmup_steps=0")
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["kl_anchor"] != 0.0  # the anchor adapter trails the moved policy adapter
    for record in records:
        assert record["rollout/logp_gap_max"] < 1e-4 and record["rollout/weight_pushes"] == 2


def test_a_gap_over_the_threshold_stops_the_run_with_one_line(tmp_path, fastbond_cache):
    done = _train(fastbond_cache, f"run_dir={tmp_path / 'run'}", "rollout.vllm.max_logp_gap=1e-12")
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "step 1: vLLM's log-probs of its sampled tokens differ from the trainer's" in last
    assert "rollout.vllm.max_logp_gap=1e-12" in last


def test_weights_of_another_shape_are_refused_before_the_push(engine, model, reference):
    """vLLM left with a wrong-shaped push has its weights on the meta device for good: never push one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = reference[1]
    config = LlamaConfig(**{**model.config.to_dict(), "intermediate_size": 96})
    wider = LlamaForCausalLM(config).eval()
    prompts = _prompts(tokenizer, _texts(), repeat=2)
    with pytest.raises(FastbondError) as error:
        _draw(engine, wider, tokenizer, prompts)
    message = str(error.value)
    assert "\n" not in message and "mlp.gate_proj.weight' is [96, 64], the engine's is [128, 64]" in message
    samples, logps = _draw(engine, model, tokenizer, prompts)  # the engine still works
    gap = (logps - _trainer_logps(model, samples)).abs()[samples.response_mask]
    assert float(gap.max()) < 1e-4


def test_a_draw_leaves_the_global_generator_alone(engine, model, reference):
    tokenizer = reference[1]
    prompts = _prompts(tokenizer, _texts(), repeat=2)
    state = torch.get_rng_state()
    _draw(engine, model, tokenizer, prompts)
    assert torch.equal(torch.get_rng_state(), state)
