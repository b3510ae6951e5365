"""Fused-linear J-BOND loss (hidden states + LM head → loss, grads): time and peak memory.

    python -m pytest benchmarks/test_bench_jbond_linear.py --benchmark-enable \
        --benchmark-json=benchmarks/results/X.json
    python benchmarks/test_bench_jbond_linear.py benchmarks/results/X.json   # ratio table

One J-BOND batch: B prompts, each with a policy sample and a better-anchor
sample of T response tokens (packed: N = 2·B·T tokens), the LM head, the
anchor's token log-probs and the rewards. Implementations:

* `reference`       — backend="reference": fp32 [N, V] logits per set, log_softmax,
  gather, padded rows, `jbond_loss_ref` under autograd (skipped where
  it runs out of memory — at Gemma-2B's vocabulary that is the point);
* `chunked`         — backend="chunked": plain PyTorch over vocabulary chunks;
* `triton`          — backend="triton" (CUDA only here; tests run it interpreted);
* `linear_logprobs` — linear_logprobs alone on the same N tokens (triton on CUDA,
  chunked on CPU) with a per-token upstream gradient: the floor. The fused
  op's ratio to it is the price of the J-BOND head, the packing and the
  concatenation; ≈ 1 says no GEMM pass was added (SPEC §5; the module
  docstring of fastbond/kernels/jbond_linear.py).

Modes: `fwdbwd` (a training step: loss, metrics, grads of hidden states and
head) and `fwd` (no grad: evaluation; one GEMM). extra_info: `flops` (8·N·H·V
for fwdbwd with linear_logprobs' recompute, 2·N·H·V for fwd), `TFLOP/s`,
`tokens/s`, `peak_extra_MiB` (torch.cuda.max_memory_allocated above what was
allocated before the call; None on CPU).

Shapes: on CUDA Gemma-2B's head (H 2048, V 256000) in bf16 with B ∈ {16, 64}
prompts × T = 256 tokens × 2 sets; on CPU a tiny fp32 head, so the harness is
exercised by `pytest --benchmark-disable` in seconds.
"""

from __future__ import annotations

import gc
import json
import sys

import pytest
import torch

from fastbond.kernels._backend import triton_available
from fastbond.kernels.jbond_linear import jbond_linear_loss
from fastbond.kernels.linear_logprobs import linear_logprobs

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
HEADS = [("gemma-2b", 2048, 256000)] if CUDA else [("tiny", 64, 2048)]
BATCHES = [(16, 256), (64, 256)] if CUDA else [(4, 16)]
IMPLS = ["reference", "chunked", "triton", "linear_logprobs"]
MODES = ["fwd", "fwdbwd"]
ROUNDS, WARMUP = (5, 1) if CUDA else (2, 1)
FLOPS = {"fwd": 2, "fwdbwd": 8}  # × N·H·V
BETA, GAMMA = 0.5, 0.5


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


# ----------------------------------------------------------------------------
# inputs, cached for one shape at a time (a 256k-vocabulary head is 1 GiB)
# ----------------------------------------------------------------------------

_CACHE: dict = {}


def _inputs(batch: int, length: int, h: int, v: int) -> dict:
    key = (batch, length, h, v)
    if key not in _CACHE:
        _CACHE.clear()
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        n = batch * length  # tokens per set
        seq_ids = torch.arange(batch, device=DEVICE).repeat_interleave(length)  # packed back to back

        def hidden():
            return torch.randn(n, h, generator=gen, device=DEVICE).to(DTYPE).requires_grad_()

        _CACHE[key] = dict(
            policy_hidden=hidden(),
            policy_targets=torch.randint(0, v, (n,), generator=gen, device=DEVICE),
            policy_seq_ids=seq_ids,
            best_hidden=hidden(),
            best_targets=torch.randint(0, v, (n,), generator=gen, device=DEVICE),
            best_seq_ids=seq_ids,
            weight=(torch.randn(v, h, generator=gen, device=DEVICE) * h**-0.5).to(DTYPE).requires_grad_(),
            anchor_token_logps=-torch.rand(n, generator=gen, device=DEVICE) * 8,
            rewards=torch.randn(batch, generator=gen, device=DEVICE),
            anchor_rewards=torch.randn(batch, 2, generator=gen, device=DEVICE),
            grad_out=torch.rand(2 * n, generator=gen, device=DEVICE) * 2 - 0.5,  # per-token weights
        )
    return _CACHE[key]


def _skip_reason(impl: str):
    if impl == "triton" and not (CUDA and triton_available()):
        return "triton is benchmarked on CUDA only (tests run it interpreted)"
    return None


# ----------------------------------------------------------------------------
# one call: forward (+ backward)
# ----------------------------------------------------------------------------


def _target(impl: str, mode: str, x: dict):
    wrt = [x["policy_hidden"], x["best_hidden"], x["weight"]]

    if impl == "linear_logprobs":
        backend = "triton" if CUDA and triton_available() else "chunked"

        def forward():
            hidden = torch.cat([x["policy_hidden"], x["best_hidden"]])
            targets = torch.cat([x["policy_targets"], x["best_targets"]])
            return linear_logprobs(hidden, x["weight"], targets, backend=backend)

        def backward(out):
            return torch.autograd.grad(out, wrt, grad_outputs=x["grad_out"])
    else:

        def forward():
            loss, _ = jbond_linear_loss(
                x["policy_hidden"], x["policy_targets"], x["policy_seq_ids"],
                x["best_hidden"], x["best_targets"], x["best_seq_ids"],
                x["weight"], x["anchor_token_logps"], x["rewards"], x["anchor_rewards"],
                beta=BETA, gamma=GAMMA, backend=impl,
            )
            return loss

        def backward(out):
            return torch.autograd.grad(out, wrt)

    if mode == "fwd":

        def target():
            with torch.no_grad():
                out = forward()
            _sync()
            return out

        return target

    def target():
        grads = backward(forward())
        _sync()
        return grads

    return target


def _peak_extra_bytes(target):
    if not CUDA:
        return None
    _sync()
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = target()
    _sync()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak


CASES = [
    pytest.param(head, h, v, batch, length, impl, mode, id=f"{head}-B{batch}xT{length}-{impl}-{mode}")
    for head, h, v in HEADS
    for batch, length in BATCHES
    for impl in IMPLS
    for mode in MODES
]


@pytest.mark.parametrize("head, h, v, batch, length, impl, mode", CASES)
def test_bench_jbond_linear(benchmark, head, h, v, batch, length, impl, mode):
    reason = _skip_reason(impl)
    if reason:
        pytest.skip(reason)
    x = _inputs(batch, length, h, v)
    target = _target(impl, mode, x)
    try:  # untimed first call: compilation, cuBLAS workspaces; OOM → skip
        target()
        peak = _peak_extra_bytes(target)
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} runs out of memory at N={2 * batch * length}, V={v}")

    n = 2 * batch * length
    nhv = n * h * v
    benchmark.group = f"jbond_linear {head} B={batch} T={length} {mode}"
    benchmark.extra_info.update(
        impl=impl, mode=mode, head=head, B=batch, T=length, N=n, H=h, V=v, beta=BETA, gamma=GAMMA,
        dtype=str(DTYPE).replace("torch.", ""), device=torch.cuda.get_device_name() if CUDA else "cpu",
        flops=FLOPS[mode] * nhv, peak_extra_MiB=None if peak is None else _sig(peak / 2**20),
        logits_fp32_MiB=_sig(n * v * 4 / 2**20),  # what a materializing implementation would hold
    )
    benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # absent with --benchmark-disable
        seconds = stats.stats.median
        benchmark.extra_info["TFLOP/s"] = _sig(FLOPS[mode] * nhv / seconds / 1e12)
        benchmark.extra_info["tokens/s"] = _sig(n / seconds)


# ----------------------------------------------------------------------------
# summary of a --benchmark-json file
# ----------------------------------------------------------------------------


def summarize(path: str) -> str:
    """Median ms and peak MiB per implementation; the fused op against its floor and the reference."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    table: dict = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "impl" not in info or not bench.get("stats") or "B" not in info:
            continue
        key = (info["head"], info["B"], info["T"], info["mode"])
        table.setdefault(key, {})[info["impl"]] = (bench["stats"]["median"] * 1e3, info.get("peak_extra_MiB"))
    impls = [i for i in IMPLS if any(i in row for row in table.values())]
    fused = "triton" if "triton" in impls else "chunked"
    header = ["head", "B", "T", "mode"] + [f"{i} ms (MiB)" for i in impls]
    header += [f"{fused}/linear_logprobs", f"reference/{fused}"]
    lines = [" | ".join(header)]
    for (head, batch, length, mode), row in sorted(table.items()):
        cells = [head, str(batch), str(length), mode]
        cells += [f"{row[i][0]:.2f} ({row[i][1]})" if i in row else "-" for i in impls]
        ms = {i: row[i][0] for i in row}
        cells.append(f"{ms[fused] / ms['linear_logprobs']:.3f}" if fused in ms and "linear_logprobs" in ms else "-")
        cells.append(f"{ms['reference'] / ms[fused]:.2f}" if fused in ms and "reference" in ms else "-")
        lines.append(" | ".join(cells))
    env = data.get("fastbond_env", {})
    lines.append(f"device: {env.get('device')}  torch {env.get('torch')}  triton {env.get('triton')}  "
                 f"commit {env.get('commit')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
