"""The keyed sampler (`rollout.noise: keyed`): draws that do not depend on how a batch is split.

Gumbel-max with noise from a counter-based hash of (seed, step, draw, prompt
index in the batch, sample index, position, token): the same distribution as
`generate`'s multinomial sampling, but a row's tokens no longer depend on
which other rows share its batch or rank, so a run split over K ranks
samples exactly what one process samples.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x · constant) mod 2³² on int64 tensors holding uint32 values.

    The int64 product may overflow: it wraps modulo 2⁶⁴ (two's complement, on CPU and CUDA alike), and
    its low 32 bits are then still those of the exact product (tests/fastbond/rollout/test_keyed_sampler.py
    checks this against Python's integers). Two tensor ops a multiply, where splitting x in 16-bit halves
    to stay below 2⁶³ took six: the keyed noise hashes every token of every row at every step.
    """
    return (x * constant) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) of int64 tensors holding uint32 values."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def combine_keys(*parts: int) -> int:
    """One uint32 key of several non-negative integers, hashed in order."""
    key = torch.tensor(0x9E3779B9, dtype=torch.int64)
    for part in parts:
        key = hash32(key ^ (int(part) & _MASK32))
    return int(key)


_TOKEN_HASHES: dict[tuple[int, str], torch.Tensor] = {}


def _token_hashes(vocab: int, device: torch.device) -> torch.Tensor:
    """hash32 of each token id: the same every position, so computed once per vocabulary and device."""
    key = (vocab, str(device))
    if key not in _TOKEN_HASHES:
        _TOKEN_HASHES[key] = hash32(torch.arange(vocab, device=device, dtype=torch.int64) * 0x2545 + 0x1B873593)
    return _TOKEN_HASHES[key]


def keyed_uniform(row_keys: torch.Tensor, position: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, V] uniforms in (0, 1), a pure function of (row key, position, token id).

    `position` may be a 0-d int64 tensor, so that a captured decode step reads it from device memory.
    """
    device = row_keys.device
    position = torch.as_tensor(position, dtype=torch.int64, device=device)
    at = hash32(row_keys.to(torch.int64) ^ hash32(position + 0x632BE5AB))
    bits = hash32(at[:, None] ^ _token_hashes(vocab, device)[None, :]) >> 8  # 24 bits: exact in float32
    return (bits.to(torch.float32) + 0.5) / float(1 << 24)


def keyed_gumbel_scores(logits: torch.Tensor, row_keys: torch.Tensor, position: int | torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """logits / T + Gumbel noise keyed per row: their argmax is a draw from softmax(logits / T)."""
    uniform = keyed_uniform(row_keys.to(logits.device), position, logits.shape[-1])
    return logits.float() / temperature - torch.log(-torch.log(uniform))


class KeyedGumbel:
    """A logits processor for greedy `generate`: logits / T plus Gumbel noise keyed per row.

    argmax(logits/T + G) with G = −log(−log U), U uniform, is a draw from
    softmax(logits/T) (the Gumbel-max trick); U comes from `keyed_uniform`.
    """

    def __init__(self, row_keys: torch.Tensor, prompt_length: int, temperature: float):
        self.row_keys = row_keys
        self.prompt_length = prompt_length
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return keyed_gumbel_scores(scores, self.row_keys, input_ids.shape[1] - self.prompt_length, self.temperature)


class KeyedNoise:
    """Row keys of the keyed sampler: (seed, step, draw within the step, prompt, sample).

    `start_step(step)` at the start of each step; each `row_keys` call is the
    next draw of that step. Every rank makes the same draws in the same order,
    so a draw number names the same rollout phase everywhere.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.step = 0
        self.draw = 0

    def start_step(self, step: int) -> None:
        self.step, self.draw = step, 0

    def row_keys(self, prompt_index: list[int], sample_index: list[int]) -> torch.Tensor:
        self.draw += 1
        base = combine_keys(self.seed, self.step, self.draw)
        # combine_keys(base, p, s) for every row at once: the same integer ops on a vector
        key = torch.tensor(combine_keys(base), dtype=torch.int64)
        for part in (prompt_index, sample_index):
            key = hash32(key ^ (torch.tensor(part, dtype=torch.int64) & _MASK32))
        return key
