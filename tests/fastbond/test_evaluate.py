"""The Best-of-N estimator used by `fastbond eval`."""

import itertools
import math

import torch

from fastbond.evaluate import expected_max_of_n


def test_expected_max_matches_all_subsets():
    rewards = torch.tensor([[0.3, -1.0, 2.0, 0.5, 0.5, 1.5]], dtype=torch.float64)
    for n in range(1, 7):
        subsets = list(itertools.combinations(rewards[0].tolist(), n))
        exact = sum(max(s) for s in subsets) / len(subsets)
        assert math.isclose(float(expected_max_of_n(rewards, n)), exact, rel_tol=1e-12)


def test_expected_max_is_unbiased_for_best_of_n():
    # Rewards uniform on {0..9}: E[max of 4] = Σ_k P(max ≥ k) = Σ_{k=1..9} 1 − (k/10)^4.
    torch.manual_seed(0)
    draws = torch.randint(0, 10, (20000, 16)).double()
    estimate = expected_max_of_n(draws, 4).mean()
    exact = sum(1 - (k / 10) ** 4 for k in range(1, 10))
    assert abs(float(estimate) - exact) < 0.02
