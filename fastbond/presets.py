"""Configs shipped inside the package (`fastbond/configs/*.yaml`)."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def embedded_preset() -> Path:
    """The config `fastbond train` runs with no file: the embedded tiny-LM default,
    sized to finish in a few minutes on 2 CPU cores."""
    return CONFIG_DIR / "embedded.yaml"
