"""Regression: every algorithm's logged metrics for 3 CPU steps on the embedded world, pinned.

Any change that alters what an algorithm samples or optimizes moves these numbers;
a change that only reshapes code does not. When a change is meant to move them,
regenerate the file and say why in the commit:

    FASTBOND_REPIN=1 python -m pytest tests/fastbond/algorithms/test_pinned_metrics.py

Timings are not pinned. The inputs do not depend on the machine: π_ref is built
from weights kept in the repository (tests/conftest.py), and the sampler's noise is
seeded. What still differs between CPUs is the order of float32 sums. Measured by
`python tools/pinned_spread.py` over five float paths of one CPU (ATen's AVX-512,
AVX2 and scalar kernels, MKL's and oneDNN's AVX2 and compatible code paths;
2026-12-03, torch 2.13.0): at most 2.7e-5 relative on values of magnitude ≥ 1e-3,
at most 1.5e-6 absolute on values near zero (a KL between equal models), and no
integer or sampled token differing. The tolerances, 2e-4 relative and 1e-5
absolute, are about seven times those; a one-token change of a sample moves the
metrics far beyond them (test_a_one_token_change_of_a_sample_is_caught).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import fastbond.algorithms.base as algorithms_base
import fastbond.rollout.sampler as rollout_sampler
from fastbond.algorithms import ALGORITHMS
from fastbond.config import load_config
from fastbond.presets import embedded_preset
from fastbond.train import train

PINNED = Path(__file__).with_name("pinned_metrics.json")
REL_TOL, ABS_TOL = 2e-4, 1e-5
SETTINGS = ["steps=3", "seed=0", "rollout.batch_size=6", "rollout.max_new_tokens=10", "evaluation.at_end=false",
            "logging.progress=false", "cpu_threads=1", "optim.warmup_steps=0"]
SECTIONS = {
    "jbond": ["algorithm.eta=0.3", "algorithm.gamma=0.5"],
    "bond": ["algorithm.n=4", "algorithm.mc_samples=6"],
    "iterative_bond": ["algorithm.n=2", "algorithm.mc_samples=4", "algorithm.anchor_period=2"],
    "vbon": ["algorithm.n=4", "algorithm.mc_samples=6"],
    "bonbon": ["algorithm.n=4", "algorithm.alpha=0.1"],
    "rloo": ["algorithm.beta_rl=0.05"],
}


def pinned_keys(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("time/") and k != "samples_per_s"}


def run_metrics(tmp_path, name: str) -> list[dict]:
    config = load_config(embedded_preset(), SETTINGS + [f"algorithm.name={name}"] + SECTIONS[name]
                         + [f"run_dir={tmp_path / name}"])
    run_dir = train(config)
    return [pinned_keys(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def mismatches(records: list[dict], expected: list[dict]) -> list[str]:
    """One line per metric of `records` that is not the pinned value (integers exactly, floats within tolerance)."""
    if [r["step"] for r in records] != [r["step"] for r in expected]:
        return [f"steps {[r['step'] for r in records]} != pinned {[r['step'] for r in expected]}"]
    lines = []
    for got, want in zip(records, expected):
        if set(got) != set(want):
            lines.append(f"step {want['step']}: metrics {sorted(set(got) ^ set(want))} differ")
            continue
        for key, value in want.items():
            if value is None or isinstance(value, int) or key == "step":
                close = got[key] == value
            else:
                close = math.isclose(got[key], value, rel_tol=REL_TOL, abs_tol=ABS_TOL)
            if not close:
                lines.append(f"step {want['step']} {key}: {got[key]} != pinned {value}")
    return lines


def test_every_algorithm_is_pinned():
    assert set(SECTIONS) == set(ALGORITHMS)


@pytest.mark.parametrize("name", list(SECTIONS))
def test_three_steps_reproduce_the_pinned_metrics(tmp_path, embedded_reference, name):
    records = run_metrics(tmp_path, name)
    if os.environ.get("FASTBOND_REPIN") == "1":
        pinned = json.loads(PINNED.read_text()) if PINNED.exists() else {}
        pinned[name] = records
        PINNED.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
        pytest.skip("re-pinned")
    assert mismatches(records, json.loads(PINNED.read_text())[name]) == []


def test_a_one_token_change_of_a_sample_is_caught(tmp_path, embedded_reference, monkeypatch):
    """The tolerances leave room for float order only: one token of one sample of the first
    draw replaced by another word (its text re-decoded, so the reward sees it too) fails the pin."""
    real_sample = rollout_sampler.sample
    calls = []

    def sample_one_token_off(model, tokenizer, *args, **kwargs):
        drawn = real_sample(model, tokenizer, *args, **kwargs)
        if not calls:
            first = drawn.prompt_length
            word = tokenizer.convert_tokens_to_ids("good")
            if int(drawn.sequences[0, first]) == word:
                word = tokenizer.convert_tokens_to_ids("bad")
            drawn.sequences[0, first] = word
            drawn.texts[0] = tokenizer.decode(drawn.response_ids(0), skip_special_tokens=True)
        calls.append(1)
        return drawn

    monkeypatch.setattr(rollout_sampler, "sample", sample_one_token_off)
    lines = mismatches(run_metrics(tmp_path, "jbond"), json.loads(PINNED.read_text())["jbond"])
    assert calls and any(line.startswith("step 1 ") for line in lines), lines


def test_one_token_left_out_of_the_objective_is_caught(tmp_path, embedded_reference, monkeypatch):
    """The same for what is optimized: REINFORCE's objective without the trained policy's log-prob
    of one response token (sampling untouched) trains other weights, which show from step 2 on."""
    real_logprobs = algorithms_base.response_logprobs

    def logprobs_one_token_short(model, samples, *args, **kwargs):
        result = real_logprobs(model, samples, *args, **kwargs)
        if not torch.is_grad_enabled():  # frozen roles and metrics: untouched
            return result
        logps = result[0] if isinstance(result, tuple) else result
        keep = torch.ones_like(logps)
        keep[0, 0] = 0.0
        return (logps * keep, *result[1:]) if isinstance(result, tuple) else logps * keep

    monkeypatch.setattr(algorithms_base, "response_logprobs", logprobs_one_token_short)
    lines = mismatches(run_metrics(tmp_path, "rloo"), json.loads(PINNED.read_text())["rloo"])
    assert any(line.startswith("step 2 ") for line in lines), lines
