"""Regression: every algorithm's logged metrics for 3 CPU steps on the embedded world, pinned.

Any change that alters what an algorithm samples or optimizes moves these numbers;
a change that only reshapes code does not. When a change is meant to move them,
regenerate the file and say why in the commit:

    FASTBOND_REPIN=1 python -m pytest tests/fastbond/algorithms/test_pinned_metrics.py

Timings are not pinned. Tolerance: 1e-4 relative — float32 sums in another order
(another CPU's vector width) stay far inside it; a different sample or term does not.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from fastbond.algorithms import ALGORITHMS
from fastbond.config import load_config
from fastbond.presets import embedded_preset
from fastbond.train import train

PINNED = Path(__file__).with_name("pinned_metrics.json")
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
    expected = json.loads(PINNED.read_text())[name]
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    for got, want in zip(records, expected):
        assert set(got) == set(want), f"step {want['step']}: metrics {sorted(set(got) ^ set(want))} differ"
        for key, value in want.items():
            if value is None or isinstance(value, int) or key == "step":
                assert got[key] == value, f"step {want['step']} {key}: {got[key]} != {value}"
            else:
                assert math.isclose(got[key], value, rel_tol=1e-4, abs_tol=1e-6), (
                    f"step {want['step']} {key}: {got[key]} != pinned {value}")
