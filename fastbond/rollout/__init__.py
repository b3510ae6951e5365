"""Rollouts: the prompts of a step, the responses sampled for them, and how they are sampled.

    samples.py       `Prompts` (a step's prompts and their place in the whole batch) and `Samples`
                     (left-padded prompts + right-padded responses, the response mask), packing helpers
    sampler.py       the `Sampler` seam and `GenerateSampler` (`rollout.backend: generate`)
    backends.py      `rollout.backend` → a `Sampler`: `SAMPLERS`, `make_sampler`
    generate.py      `sample`: one response per row with transformers' `generate`, from π itself
                     (top-k and top-p off), and `encode_prompts`
    keyed.py         `rollout.noise: keyed`: Gumbel-max with hashed noise, so a row's draw does not
                     depend on how the batch is split over ranks
    vllm_sampler.py  `rollout.backend: vllm`: a colocated vLLM engine, weights pushed as they change,
                     its log-probs checked against the trainer's
    weights.py       a role's weights as a stream of (name, tensor), gathered group by group under ZeRO-3

`rollout.noise` is generate's noise: `torch` draws with `generate`'s own
multinomial sampling from the global torch generator; `keyed` with
`KeyedNoise` row keys.
"""

from fastbond.rollout.generate import encode_prompts, eos_token_ids, response_mask_from, sample
from fastbond.rollout.keyed import KeyedGumbel, KeyedNoise, combine_keys, hash32, keyed_uniform
from fastbond.rollout.samples import Prompts, Samples, concat_samples

__all__ = [
    "KeyedGumbel",
    "KeyedNoise",
    "Prompts",
    "Samples",
    "combine_keys",
    "concat_samples",
    "encode_prompts",
    "eos_token_ids",
    "hash32",
    "keyed_uniform",
    "response_mask_from",
    "sample",
]
