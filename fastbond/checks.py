"""One-line checks of config values: each raises `FastbondError` naming the key."""

from __future__ import annotations

import math
from collections.abc import Iterable

from fastbond.errors import FastbondError


def require(condition: bool, message: str) -> None:
    if not condition:
        raise FastbondError(message)


def in_unit_interval(key: str, value: float) -> None:
    require(0.0 <= value <= 1.0, f"config key '{key}' must lie in [0, 1], got {value}")


def positive(key: str, value: float) -> None:
    require(value > 0, f"config key '{key}' must be > 0, got {value}")


def at_least(key: str, value: float, minimum: float) -> None:
    require(value >= minimum, f"config key '{key}' must be >= {minimum}, got {value}")


def finite(key: str, value: float) -> None:
    require(math.isfinite(value), f"config key '{key}' must be finite, got {value}")


def one_of(key: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    require(value in choices, f"config key '{key}' must be one of {', '.join(choices)}; got '{value}'")
