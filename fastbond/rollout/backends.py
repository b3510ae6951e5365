"""`rollout.backend` → the run's sampler: one line per backend in `SAMPLERS`, and `make_sampler`.

Adding a sampler is a module with a `Sampler` subclass (`fastbond.rollout.sampler`) and a line here;
a backend's module is imported only when a run asks for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastbond.errors import FastbondError
from fastbond.rollout.keyed import KeyedNoise
from fastbond.rollout.sampler import GenerateSampler, Sampler


def _vllm_sampler(*, config, noise, **kwargs) -> Sampler:
    from fastbond.rollout.vllm_sampler import VLLMSampler

    # vLLM seeds every request with its row key, whatever rollout.noise says
    return VLLMSampler.for_run(config=config, noise=noise or KeyedNoise(config.seed), **kwargs)


def _static_sampler(**kwargs) -> Sampler:
    from fastbond.rollout.static_sampler import StaticSampler

    return StaticSampler.for_run(**kwargs)


def _generate_sampler(*, tokenizer, max_new_tokens, temperature, noise, generation, **_) -> Sampler:
    return GenerateSampler(tokenizer, max_new_tokens, temperature, noise, generation)


# rollout.backend → how a run's sampler is built (keyword arguments: see `make_sampler`)
SAMPLERS: dict[str, Callable[..., Sampler]] = {"generate": _generate_sampler, "vllm": _vllm_sampler,
                                               "static": _static_sampler}


def resolved_backend(rollout, device) -> str:
    """`rollout.backend` with auto decided: the static sampler on CUDA (where it captures its decode step:
    4.6× generate's per step on an H200, docs/rollouts.md) when transformers has its cache, else generate."""
    if rollout.backend != "auto":
        return rollout.backend
    from fastbond.config.schema import STATIC_MIN_TRANSFORMERS, _transformers_version

    cuda = torch.device(device).type == "cuda"
    return "static" if cuda and _transformers_version() >= STATIC_MIN_TRANSFORMERS else "generate"


def make_sampler(config, *, tokenizer, policy, generation, gathered, device, weights=None) -> Sampler:
    """The sampler of a run (`rollout.backend`), built once the engine has placed the models (and, under
    DeepSpeed, the process group exists: a colocated vLLM engine joins this rank's).

    `generation` and `gathered` are the engine's contexts around a draw and around reading whole ZeRO-3
    parameters; `weights`, each role's weights for a sampler that holds its own copy (`stream(role)`,
    `shapes(role)`; None: the role modules' own parameters, `fastbond.rollout.weights.ModuleWeights`).
    """
    rollout = config.rollout
    backend = resolved_backend(rollout, device)
    if backend not in SAMPLERS:
        raise FastbondError(f"config key 'rollout.backend': unknown backend {rollout.backend!r} "
                            f"(one of auto, {', '.join(SAMPLERS)})")
    return SAMPLERS[backend](config=config, tokenizer=tokenizer, policy=policy, generation=generation,
                                     gathered=gathered, device=device, weights=weights,
                                     max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                     noise=KeyedNoise(config.seed) if rollout.noise == "keyed" else None)
