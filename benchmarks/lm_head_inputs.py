"""LM-head inputs whose logits look like a trained model's, beside plain random ones.

On random weights every probability of a 256k vocabulary is ≈ 1/V: a backward
that skips tiles whose |softmax − onehot| is below ε skips nearly all of them,
and looks faster than it would be on a trained model. These inputs give the
logits a trained LM's statistics instead:

* a heavy-tailed vocabulary marginal: each token v carries a unigram log-prior
  log p(v) of a Zipf law (p ∝ rank^−ZIPF over a random order of the
  vocabulary), written into the weights along one direction e of the hidden
  space that every hidden state shares;
* per-token context: a Gaussian part from the rest of the hidden space;
* per-token entropy between ENTROPY_NATS: each hidden row is scaled by its own
  inverse temperature, calibrated on a sample of rows so that the entropies
  spread over that range;
* targets sampled from each row's softmax (as a policy's own samples are in RL),
  with IGNORE_FRACTION of them ignored.

`honest_inputs` returns the tensors with `measure`'s statistics: the measured
entropy (mean, 10th and 90th percentiles), the share of probability mass in
the most frequent 1% of the vocabulary, and the fraction of (BLOCK × BLOCK)
tiles of |softmax − onehot| that a filtering backward with threshold ε must
still compute, in the vocabulary's own order and sorted by mean logit.
"""

from __future__ import annotations

import math

import torch

ZIPF = 1.1
ENTROPY_NATS = (1.0, 3.0)
IGNORE = -100
IGNORE_FRACTION = 0.1
BLOCK = 128
CHUNK_ELEMENTS = 1 << 27  # logits materialized at a time while measuring (fp32: 512 MiB)


def eps(dtype: torch.dtype) -> float:
    """The filter threshold of a backward in `dtype`: 2⁻¹² for bf16 (Cut Cross-Entropy's), 2⁻¹⁶ for fp16, 0 else."""
    return {torch.bfloat16: 2.0**-12, torch.float16: 2.0**-16}.get(dtype, 0.0)


def random_inputs(n: int, h: int, v: int, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """The suites' original inputs: N(0, 1) hidden states, N(0, 1/H) weights, uniform targets."""
    gen = torch.Generator(device=device).manual_seed(seed)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    targets[torch.rand(n, generator=gen, device=device) < IGNORE_FRACTION] = IGNORE
    return dict(hidden=torch.randn(n, h, generator=gen, device=device).to(dtype),
                weight=(torch.randn(v, h, generator=gen, device=device) * h**-0.5).to(dtype),
                targets=targets)


def honest_inputs(n: int, h: int, v: int, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """Hidden states, head weights and sampled targets with a trained LM's logit statistics (module docstring)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    direction = torch.randn(h, generator=gen, device=device)
    direction /= direction.norm()
    rank = torch.randperm(v, generator=gen, device=device).float() + 1
    log_prior = -ZIPF * rank.log()
    log_prior -= torch.logsumexp(log_prior, 0)
    # weights: N(0, 1/H) context part orthogonal to e, plus the prior along e (centred: a constant shift is free)
    weight = torch.randn(v, h, generator=gen, device=device) * h**-0.5
    weight -= (weight @ direction)[:, None] * direction[None, :]
    weight += (log_prior - log_prior.mean())[:, None] * direction[None, :]
    # hidden: context orthogonal to e, one unit along e; logits = β·(σ·g + prior) per row
    context = torch.randn(n, h, generator=gen, device=device)
    context -= (context @ direction)[:, None] * direction[None, :]
    sigma = _calibrated_sigma(context, weight, direction, gen)
    hidden = sigma * context + direction[None, :]
    beta = _row_scales(hidden, weight, n, gen)
    hidden = (hidden * beta[:, None]).to(dtype)
    weight = weight.to(dtype)
    targets = sample_targets(hidden, weight, gen)
    targets[torch.rand(n, generator=gen, device=device) < IGNORE_FRACTION] = IGNORE
    return dict(hidden=hidden, weight=weight, targets=targets)


def _entropies(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = hidden.float() @ weight.float().T
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def _calibrated_sigma(context, weight, direction, gen) -> float:
    """The context part's scale: at unit inverse temperature, rows sit mid-range (2 nats) on average."""
    sample = context[: min(256, context.shape[0])]
    lo, hi = 0.05, 20.0
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        if _entropies(mid * sample + direction, weight).mean() > sum(ENTROPY_NATS) / 2:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _row_scales(hidden, weight, n, gen) -> torch.Tensor:
    """Per-row inverse temperatures β whose entropies spread over ENTROPY_NATS.

    Entropy falls monotonically in β; the β giving each end of the range is
    found on a sample of rows, and each row draws log β uniformly between them.
    """
    sample = hidden[: min(256, n)]

    def beta_for(nats: float) -> float:
        lo, hi = 0.05, 20.0
        for _ in range(30):
            mid = math.sqrt(lo * hi)
            if _entropies(mid * sample, weight).median() > nats:
                lo = mid
            else:
                hi = mid
        return math.sqrt(lo * hi)

    low, high = math.log(beta_for(ENTROPY_NATS[1])), math.log(beta_for(ENTROPY_NATS[0]))
    u = torch.rand(n, generator=gen, device=hidden.device)
    return (low + (high - low) * u).exp()


def _row_chunks(n: int, v: int):
    rows = max(1, CHUNK_ELEMENTS // v)
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


@torch.no_grad()
def sample_targets(hidden, weight, gen) -> torch.Tensor:
    """One draw per row from softmax(h·Wᵀ) (the Gumbel-max trick), a chunk of rows at a time."""
    out = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for a, b in _row_chunks(hidden.shape[0], weight.shape[0]):
        logits = hidden[a:b].float() @ weight.float().T
        noise = torch.rand(logits.shape, generator=gen, device=logits.device).clamp_(min=1e-20)
        out[a:b] = (logits - (-noise.log()).log()).argmax(-1)
    return out


@torch.no_grad()
def measure(hidden, weight, targets, threshold: float) -> dict:
    """Entropy percentiles, the top-1% vocabulary's mass, and the tiles a filter with `threshold` keeps."""
    n, v = hidden.shape[0], weight.shape[0]
    w32 = weight.float()
    mean_logit = torch.zeros(v, dtype=torch.float64, device=hidden.device)
    for a, b in _row_chunks(n, v):
        mean_logit += (hidden[a:b].float() @ w32.T).sum(0, dtype=torch.float64)
    order = mean_logit.argsort(descending=True)
    entropies, mass = [], torch.zeros(v, dtype=torch.float64, device=hidden.device)
    tiles = {"vocabulary order": [0, 0], "sorted by mean logit": [0, 0]}
    block_rows = max(BLOCK, (CHUNK_ELEMENTS // v) // BLOCK * BLOCK)
    for a in range(0, n, block_rows):
        b = min(n, a + block_rows)
        logp = torch.log_softmax(hidden[a:b].float() @ w32.T, -1)
        p = logp.exp()
        entropies.append(-(p * logp).sum(-1))
        mass += p.sum(0, dtype=torch.float64)
        rows = torch.arange(a, b, device=p.device)
        kept = targets[a:b] != IGNORE
        grad = p.clone()
        grad[rows[kept] - a, targets[a:b][kept]] -= 1.0
        grad[~kept] = 0.0  # an ignored token has no gradient
        for name, columns in (("vocabulary order", None), ("sorted by mean logit", order)):
            g = grad if columns is None else grad[:, columns]
            survive, total = _surviving_tiles(g.abs(), threshold)
            tiles[name][0] += survive
            tiles[name][1] += total
    entropy = torch.cat(entropies)
    top = mass.sort(descending=True).values[: max(1, v // 100)].sum() / mass.sum()
    return {"entropy_nats": {"mean": round(entropy.mean().item(), 3),
                             "p10": round(entropy.quantile(0.1).item(), 3),
                             "p90": round(entropy.quantile(0.9).item(), 3)},
            "top1pct_vocab_mass": round(top.item(), 3),
            "filter_eps": threshold,
            "tiles_surviving": {name: round(s / t, 4) for name, (s, t) in tiles.items()}}


def _surviving_tiles(grad_abs: torch.Tensor, threshold: float) -> tuple[int, int]:
    """Tiles of BLOCK×BLOCK (the last ones partial) holding any |∂ℓ/∂z| at or above `threshold`."""
    rows, cols = grad_abs.shape
    padded = torch.nn.functional.pad(grad_abs, (0, -cols % BLOCK, 0, -rows % BLOCK))
    tile_max = padded.view(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // BLOCK, BLOCK).amax((1, 3))
    return int((tile_max >= threshold).sum()), tile_max.numel()
