"""Fused token log-probs from hidden states: time, TFLOP/s and memory of every implementation.

    python -m pytest benchmarks/test_bench_linear_logprobs.py --benchmark-enable \
        --benchmark-json=benchmarks/results/X.json
    python benchmarks/test_bench_linear_logprobs.py benchmarks/results/X.json   # ratio table

Implementations (same inputs, per-token upstream gradient where the API allows):

* `reference`  — backend="reference": fp32 [N, V] logits, log_softmax, gather;
* `compiled`   — torch.compile of that reference (CUDA only: on CPU inductor
  needs a C++ toolchain and minutes);
* `chunked`    — backend="chunked" (fp32 GEMMs over vocabulary chunks);
* `triton`     — backend="triton" (CUDA only here; CI runs it interpreted in tests);
* `triton_filter` — the same with the backward's gradient filter (`filter=True`,
  ε = 2⁻¹² in bf16): `bwd` and `fwdbwd` only (the forward is the same), and
  its extra_info has `tiles_kept`, the share of 128×128 tiles of dz the
  filter kept;
* `liger`      — Liger-Kernel's fused linear cross-entropy, reduction="sum":
  it computes the gradients inside its forward and cannot take per-token
  weights, so its `bwd` is only a rescale — compare `fwdbwd`;
* `cce`        — Cut Cross-Entropy's `linear_cross_entropy`, reduction="none";
* `cublas`     — the bare GEMMs any implementation needs, as plain torch.mm at
  the same shapes, unchunked: logits h·Wᵀ (fwd), dz·W and dzᵀ·h (bwd).
  Goal: triton `fwdbwd` within 1.1× of its 4-GEMM floor, and no slower than
  the faster of liger / cce. The recompute design executes 8·NHV flops
  against the baseline's 6·NHV, so 1.33× this is its floor at equal GEMM
  efficiency, and the goal 1.47× this.

liger and cce run only when importable. Modes: `fwd` (a training forward:
inputs require grad), `bwd` (the backward alone; the forward runs in the
untimed setup), `fwdbwd`.

extra_info per case: `flops` is the work of the recompute design in the mode
(fwd 2·NHV, bwd 6·NHV, fwdbwd 8·NHV) — the same count for every
implementation, so `TFLOP/s` ranks them as inverse time; `gemm_flops` is the
irreducible GEMM work (2 / 4 / 6 ·NHV) and `gemm_TFLOP/s` the rate at which an
implementation delivers it. `peak_extra_MiB`: torch.cuda.max_memory_allocated
above what was allocated before the timed call (None on CPU).

Shapes: on CUDA the LM heads of Gemma-2B (H 2048, V 256000), Gemma-7B (3072,
256000) and Llama-3-8B (4096, 128256) in bf16 with N ∈ {4096, 16384} tokens;
on CPU one tiny fp32 head, so the harness itself is exercised by
`pytest --benchmark-disable` in seconds.

Inputs (`lm_head_inputs.py`): `trained` gives the logits a trained LM's
statistics (per-token entropy spread over 1–3 nats, a Zipf vocabulary
marginal, targets sampled from the softmax); `random` is N(0, 1) hidden
states, N(0, 1/H) weights and uniform targets, where nearly every probability
is ≈ 1/V. Each case's extra_info carries its inputs' measured statistics
(`input_stats`: entropy, the top 1% of the vocabulary's mass, the share of
128×128 tiles a gradient filter at ε(dtype) would keep).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import sys

import pytest
import torch

from fastbond.kernels._backend import triton_available
from fastbond.kernels.linear_logprobs import linear_logprobs, linear_logprobs_ref, recording_tile_survival
from lm_head_inputs import eps, honest_inputs, measure, random_inputs

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
IGNORE = -100

HEADS = [("gemma-2b", 2048, 256000), ("gemma-7b", 3072, 256000), ("llama3-8b", 4096, 128256)] if CUDA else [("tiny", 64, 2048)]
TOKENS = [4096, 16384] if CUDA else [256]
IMPLS = ["reference", "compiled", "chunked", "triton", "triton_filter", "liger", "cce", "cublas"]
MODES = ["fwd", "bwd", "fwdbwd"]
ROUNDS, WARMUP = (5, 1) if CUDA else (2, 1)
FLOPS = {"fwd": 2, "bwd": 6, "fwdbwd": 8}  # × N·H·V, recompute design
GEMM_FLOPS = {"fwd": 2, "bwd": 4, "fwdbwd": 6}  # × N·H·V, the three GEMMs


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def _skip_reason(impl: str, mode: str):
    if impl == "triton_filter" and mode == "fwd":
        return "the filter acts on the backward only: the forward is triton's"
    if impl.startswith("triton") and not (CUDA and triton_available()):
        return "triton is benchmarked on CUDA only (tests run it interpreted)"
    if impl == "compiled" and not CUDA:
        return "torch.compile is benchmarked on CUDA only"
    if impl == "liger" and not (CUDA and importlib.util.find_spec("liger_kernel")):
        return "liger-kernel not importable (or no CUDA)"
    if impl == "cce" and not (CUDA and importlib.util.find_spec("cut_cross_entropy")):
        return "cut-cross-entropy not importable (or no CUDA)"
    return None


# ----------------------------------------------------------------------------
# inputs, cached for one shape at a time (a 256k-vocabulary head is GBs)
# ----------------------------------------------------------------------------

_CACHE: dict = {}
INPUTS = ["trained", "random"]  # lm_head_inputs: a trained LM's logit statistics, or N(0, 1) weights


def _inputs(n: int, h: int, v: int, kind: str = "trained") -> dict:
    key = (n, h, v, kind)
    if key not in _CACHE:
        _CACHE.clear()
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        make = honest_inputs if kind == "trained" else random_inputs
        x = make(n, h, v, DTYPE, DEVICE)
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        x["stats"] = measure(x["hidden"], x["weight"], x["targets"], eps(DTYPE))
        x["hidden"].requires_grad_()
        x["weight"].requires_grad_()
        x["grad_out"] = torch.rand(n, generator=gen, device=DEVICE) * 2 - 0.5  # per-token weights
        _CACHE[key] = x
    return _CACHE[key]


# ----------------------------------------------------------------------------
# implementations: forward() -> output, backward(output) -> grads
# ----------------------------------------------------------------------------

_COMPILED: dict = {}


def _forward_fn(impl: str, x: dict):
    hidden, weight, targets = x["hidden"], x["weight"], x["targets"]
    if impl in ("reference", "chunked", "triton"):
        return lambda: linear_logprobs(hidden, weight, targets, backend=impl, filter=False)
    if impl == "triton_filter":
        return lambda: linear_logprobs(hidden, weight, targets, backend="triton", filter=True)
    if impl == "compiled":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(linear_logprobs_ref)
        return lambda: _COMPILED["fn"](hidden, weight, targets)
    if impl == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
        return lambda: -loss(weight, hidden, targets)
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda: -linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, reduction="none")
    raise ValueError(impl)


def _backward(out: torch.Tensor, x: dict):
    wrt = [x["hidden"], x["weight"]]
    grad = None if out.dim() == 0 else x["grad_out"]  # liger: scalar loss, no per-token weights
    return torch.autograd.grad(out, wrt, grad_outputs=grad)


def _cublas(mode: str, x: dict):
    """The bare GEMMs at the op's shapes: logits, then dz·W and dzᵀ·h."""
    hidden, weight = x["hidden"].detach(), x["weight"].detach()
    if mode != "fwd" and "dz" not in x:
        x["dz"] = torch.randn(hidden.shape[0], weight.shape[0], device=DEVICE).mul_(1e-3).to(DTYPE)

    def fwd():
        return hidden @ weight.T

    def bwd():
        return x["dz"] @ weight, x["dz"].T @ hidden

    return {"fwd": fwd, "bwd": bwd, "fwdbwd": lambda: (fwd(), bwd())}[mode]


def _timed_and_setup(impl: str, mode: str, x: dict):
    """(target, setup or None): target is what a round times, setup runs before it untimed."""
    if impl == "cublas":
        fn = _cublas(mode, x)

        def target():
            out = fn()
            _sync()
            return out

        return target, None
    forward = _forward_fn(impl, x)
    if mode == "fwd":

        def target():
            out = forward()
            _sync()
            return out

        return target, None
    if mode == "fwdbwd":

        def target():
            grads = _backward(forward(), x)
            _sync()
            return grads

        return target, None

    def setup():
        out = forward()
        _sync()
        return (out,), {}

    def target(out):
        grads = _backward(out, x)
        _sync()
        return grads

    return target, setup


def _peak_extra_bytes(target, setup):
    if not CUDA:
        return None
    args, kwargs = setup() if setup is not None else ((), {})
    _sync()
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = target(*args, **kwargs)
    _sync()
    peak = torch.cuda.max_memory_allocated() - base
    del result, args, kwargs
    return peak


CASES = [
    pytest.param(head, h, v, n, kind, impl, mode, id=f"{head}-N{n}-{kind}-{impl}-{mode}")
    for head, h, v in HEADS
    for n in TOKENS
    for kind in INPUTS
    for impl in IMPLS
    for mode in MODES
]


@pytest.mark.parametrize("head, h, v, n, kind, impl, mode", CASES)
def test_bench_linear_logprobs(benchmark, head, h, v, n, kind, impl, mode):
    reason = _skip_reason(impl, mode)
    if reason:
        pytest.skip(reason)
    x = _inputs(n, h, v, kind)
    target, setup = _timed_and_setup(impl, mode, x)
    try:  # untimed first call: compilation, autotuning, cuBLAS workspaces; OOM → skip
        args, kwargs = setup() if setup is not None else ((), {})
        with recording_tile_survival() as survival:
            target(*args, **kwargs)
        del args, kwargs
        peak = _peak_extra_bytes(target, setup)
    except torch.cuda.OutOfMemoryError:
        x.pop("dz", None)
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} runs out of memory at N={n}, V={v}")

    nhv = n * h * v
    benchmark.group = f"linear_logprobs {head} N={n} {mode}"
    benchmark.extra_info.update(
        impl=impl, mode=mode, head=head, N=n, H=h, V=v, inputs=kind, input_stats=x["stats"],
        dtype=str(DTYPE).replace("torch.", ""),
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        flops=FLOPS[mode] * nhv, gemm_flops=GEMM_FLOPS[mode] * nhv,
        peak_extra_MiB=None if peak is None else _sig(peak / 2**20),
        tiles_kept=_sig(survival.fraction) if survival.counts else None,
    )
    if setup is not None:
        benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    else:
        benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # absent with --benchmark-disable
        seconds = stats.stats.median
        benchmark.extra_info["TFLOP/s"] = _sig(FLOPS[mode] * nhv / seconds / 1e12)
        benchmark.extra_info["gemm_TFLOP/s"] = _sig(GEMM_FLOPS[mode] * nhv / seconds / 1e12)


# ----------------------------------------------------------------------------
# summary of a --benchmark-json file: the goal ratios
# ----------------------------------------------------------------------------


def cases(data: dict) -> dict:
    """{(head, N, inputs, mode): {impl: (median ms, extra_info)}} of the timed cases of a --benchmark-json file."""
    table: dict = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "impl" not in info or not bench.get("stats"):
            continue
        key = (info["head"], info["N"], info.get("inputs", "random"), info["mode"])  # files before 12-04: random
        table.setdefault(key, {})[info["impl"]] = (bench["stats"]["median"] * 1e3, info)
    return table


def summarize(path: str) -> str:
    """Median ms per implementation and the ratios the goal is stated in."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    table = {key: {impl: ms for impl, (ms, _) in row.items()} for key, row in cases(data).items()}
    impls = [i for i in IMPLS if any(i in row for row in table.values())]
    lines = [
        " | ".join(["head", "N", "inputs", "mode"] + [f"{i} ms" for i in impls]
                   + ["triton/cublas", "triton/best(liger,cce)"]),
    ]
    for (head, n, kind, mode), row in sorted(table.items()):
        cells = [head, str(n), kind, mode] + [f"{row[i]:.2f}" if i in row else "-" for i in impls]
        tri = row.get("triton")
        cells.append(f"{tri / row['cublas']:.2f}" if tri and "cublas" in row else "-")
        rivals = [row[i] for i in ("liger", "cce") if i in row]
        cells.append(f"{tri / min(rivals):.2f}" if tri and rivals else "-")
        lines.append(" | ".join(cells))
    env = data.get("fastbond_env", {})
    lines.append(f"device: {env.get('device')}  torch {env.get('torch')}  triton {env.get('triton')}  commit {env.get('commit')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
