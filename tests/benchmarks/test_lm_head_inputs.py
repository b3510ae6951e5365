"""benchmarks/lm_head_inputs.py: inputs with a trained LM's logit statistics, and the statistics measured on them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import lm_head_inputs as inputs  # noqa: E402

N, H, V = 1024, 64, 8192


@pytest.fixture(scope="module")
def trained():
    x = inputs.honest_inputs(N, H, V, torch.float32, "cpu")
    return x, inputs.measure(x["hidden"], x["weight"], x["targets"], 2.0**-12)


@pytest.fixture(scope="module")
def random():
    x = inputs.random_inputs(N, H, V, torch.float32, "cpu")
    return x, inputs.measure(x["hidden"], x["weight"], x["targets"], 2.0**-12)


def test_entropies_spread_over_the_trained_range(trained, random):
    entropy = trained[1]["entropy_nats"]
    assert 1.0 <= entropy["mean"] <= 3.0 and entropy["p10"] < 1.5 and entropy["p90"] > 2.5
    assert random[1]["entropy_nats"]["p10"] > 8.0  # near log V = 9.01: every probability ≈ 1/V


def test_the_vocabulary_marginal_is_heavy_tailed(trained, random):
    assert trained[1]["top1pct_vocab_mass"] > 0.2 > 0.05 > random[1]["top1pct_vocab_mass"]


def test_targets_are_sampled_from_each_rows_softmax(trained):
    x, stats = trained
    kept = x["targets"] != inputs.IGNORE
    assert 0.05 < 1 - kept.float().mean().item() < 0.15  # IGNORE_FRACTION ignored
    logp = torch.log_softmax(x["hidden"][kept] @ x["weight"].T, -1)
    target_logp = logp.gather(1, x["targets"][kept][:, None]).squeeze(1)
    # E[−log p(target)] over samples from the softmax is the entropy; uniform targets would sit near log V
    assert abs(-target_logp.mean().item() - stats["entropy_nats"]["mean"]) < 0.15


def test_surviving_tiles_are_counted_per_block():
    grad = torch.zeros(300, 260)  # 3 × 3 tiles of 128, the last row and column partial
    grad[5, 5] = 1e-3  # tile (0, 0) above the threshold
    grad[200, 259] = 1e-3  # tile (1, 2), partial
    grad[299, 130] = 1e-6  # below: filtered
    assert inputs._surviving_tiles(grad, 2.0**-12) == (2, 9)


def test_a_target_column_always_survives():
    # Flat softmax below ε everywhere but the targets: exactly the tiles that hold a target survive.
    hidden = torch.zeros(256, 8)
    weight = torch.zeros(1024, 8)
    targets = torch.full((256,), inputs.IGNORE)
    targets[0], targets[200] = 3, 900
    stats = inputs.measure(hidden, weight, targets, 2.0**-8)
    assert stats["tiles_surviving"]["vocabulary order"] == pytest.approx(2 / 16)
