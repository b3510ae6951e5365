"""Backend choice shared by every fused op.

`reference` is the naive oracle, `chunked` plain PyTorch with bounded memory
(any device), `triton` the GPU kernel (also runs on CPU tensors under
TRITON_INTERPRET=1, which is how CI tests it). `auto` takes triton on CUDA and
chunked elsewhere.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("reference", "chunked", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """The concrete backend for `backend` given where `tensor` lives."""
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "chunked"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {('auto',) + BACKENDS}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package")
        if not tensor.is_cuda and not triton_interpreted():
            raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return backend
