"""`from fastbond.kernels import …` is the kernels' public API; README and docs name what it holds."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import fastbond.kernels as kernels

pytestmark = pytest.mark.smoke
ROOT = Path(__file__).resolve().parents[2]
OPS = ["linear_logprobs", "jbond_loss", "jbond_linear_loss", "ema_"]
REFERENCES = ["linear_logprobs_ref", "jbond_loss_ref", "jbond_linear_loss_ref", "ema_reference"]


def test_the_ops_and_their_references_import_from_the_package():
    namespace: dict = {}
    exec("from fastbond.kernels import *", namespace)  # noqa: S102 - what a user types
    for name in OPS + REFERENCES:
        assert callable(namespace[name]), name
    assert sorted(kernels.__all__) == sorted(OPS + REFERENCES + ["BatchSum"])


def test_package_names_are_the_functions_not_the_modules_of_the_same_name():
    for name in ("linear_logprobs", "jbond_loss"):
        assert inspect.isfunction(getattr(kernels, name)), name
        module = importlib.import_module(f"fastbond.kernels.{name}")
        assert getattr(module, name) is getattr(kernels, name)


def test_every_public_op_takes_a_backend():
    for name in OPS:
        assert "backend" in inspect.signature(getattr(kernels, name)).parameters, name


def test_readme_and_kernel_docs_name_the_public_api():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    docs = (ROOT / "docs" / "kernels.md").read_text(encoding="utf-8")
    for name in OPS + REFERENCES:
        assert name in readme, f"README.md does not name {name}"
        assert name in docs, f"docs/kernels.md does not name {name}"
    assert "from fastbond.kernels import" in readme
