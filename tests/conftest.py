"""Test-wide set-up.

Without a GPU, Triton kernels run through Triton's interpreter: the variable
must be set before triton is first imported, hence here, at collection start.

The embedded π_ref of every test is built from weights kept in the repository
(`reference_weights`), not pretrained on the machine at hand: pretraining sums
floats in the CPU's own order, and numbers pinned on one CPU would not hold on
another (tools/test_reference.py writes the file).
"""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def reference_weights() -> Path:
    """model.safetensors of the tests' embedded π_ref (seed 0), for `build_embedded_reference(weights=…)`."""
    from fastbond.embedded import VERSION

    path = Path(__file__).parent / "fastbond" / "data" / f"embedded-{VERSION}-seed0.safetensors"
    if not path.is_file():
        pytest.fail(f"{path} is missing (the embedded π_ref is {VERSION}): run python tools/test_reference.py")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: longer than a few seconds on 2 CPU cores")
    config.addinivalue_line("markers", "distributed: launches 2 CPU ranks (DeepSpeed over gloo); runs by default")
    config.addinivalue_line("markers", "smoke: the newest-release check CI runs on `install.sh --latest` (`-m smoke`)")
    config.addinivalue_line("markers", "vllm: needs vLLM (its CPU build in CI: .ci/vllm_env.sh); skipped without it")
