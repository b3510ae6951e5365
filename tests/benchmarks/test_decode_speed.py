"""benchmarks/decode_speed.py: a decode step's time from two timed draws."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import decode_speed  # noqa: E402


def _fake_timings(monkeypatch, seconds_by_call):
    """`_timed` answers from `seconds_by_call` in order and records the repeats it was asked for."""
    asked = []

    def timed(fn, device, repeats):
        asked.append(repeats)
        return seconds_by_call[len(asked) - 1]

    monkeypatch.setattr(decode_speed, "_timed", timed)
    return asked


def test_a_step_time_is_the_difference_of_the_long_and_short_draws_per_step(monkeypatch):
    asked = _fake_timings(monkeypatch, [0.010, 0.002])
    assert decode_speed.per_step_ms(None, torch.device("cpu"), short=2, long=6, repeats=3) == \
        (0.010 - 0.002) / 4 * 1e3
    assert asked == [3, 3]


def test_noise_that_makes_the_difference_non_positive_is_measured_again_with_more_repeats(monkeypatch):
    # A busy machine made the long draw look no slower than the short one; the second try is clean.
    asked = _fake_timings(monkeypatch, [0.002, 0.003, 0.010, 0.002])
    ms = decode_speed.per_step_ms(None, torch.device("cpu"), short=2, long=6, repeats=3)
    assert ms == (0.010 - 0.002) / 4 * 1e3
    assert asked == [3, 3, 6, 6]


def test_noise_that_never_clears_is_reported_as_measured_after_the_last_try(monkeypatch):
    asked = _fake_timings(monkeypatch, [0.002, 0.003] * 4)
    ms = decode_speed.per_step_ms(None, torch.device("cpu"), short=2, long=6, repeats=1, tries=4)
    assert ms < 0 and asked == [1, 1, 2, 2, 4, 4, 8, 8]
