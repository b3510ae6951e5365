"""What every fastbond process does before it loads a model: quiet loaders, CPU threads, seeds."""

from __future__ import annotations

import random

import torch


def quiet_transformers() -> None:
    """No per-load progress bars from transformers; fastbond draws its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def set_cpu_threads(threads: int, device: torch.device) -> None:
    # Tiny models on a few cores lose more to thread hand-offs than they gain.
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_process(config, device: torch.device, seed: int) -> None:
    """Quiet loaders, `cpu_threads`, and the process's random streams seeded with `seed`."""
    quiet_transformers()
    set_cpu_threads(config.cpu_threads, device)
    seed_everything(seed)
