"""Benchmark-wide set-up: where the numbers were measured goes into the JSON.

pytest-benchmark already records the CPU and the commit; a GPU run also needs
the device name, its memory and the torch / triton / CUDA versions, written
once at the top level of `--benchmark-json` under "fastbond_env".
"""

from __future__ import annotations

import os
import subprocess

import torch


def environment() -> dict:
    """Versions and device of this process, JSON-ready."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            device=props.name,
            device_memory_GiB=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        info["device"] = "cpu"
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastbond_env"] = environment()
