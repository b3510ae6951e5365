"""Test-wide set-up.

Without a GPU, Triton kernels run through Triton's interpreter: the variable
must be set before triton is first imported, hence here, at collection start.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: longer than a few seconds on 2 CPU cores")
    config.addinivalue_line("markers", "distributed: launches 2 CPU ranks (DeepSpeed over gloo); runs by default")
    config.addinivalue_line("markers", "vllm: needs vLLM (its CPU build in CI: .ci/vllm_env.sh); skipped without it")
