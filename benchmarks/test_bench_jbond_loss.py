"""J-BOND loss head, forward + backward: fused triton vs chunked vs the PyTorch reference.

    pytest benchmarks/test_bench_jbond_loss.py --benchmark-enable [--benchmark-json out.json]

One timed call is what a training step pays for the head: the loss, its
metrics, and the gradients w.r.t. the policy and better-anchor token log-probs
(bf16, as the fused log-prob kernel's callers hold them). Cases:

* `reference` — `jbond_loss_ref` (the oracle beside the kernel) under autograd (a dozen small kernels);
* `compiled`  — the same under `torch.compile` (CUDA only: on CPU inductor
  needs a C++ toolchain and minutes);
* `chunked`   — vectorized PyTorch with the closed-form backward;
* `triton`    — one launch forward, one backward.

The op is memory bound: `GB/s` counts the bytes it must touch (three log-prob
arrays and two masks read forward, the masks read and two gradients written
backward). The triton case also times the others inline and records the
speedups in `extra_info`. On CPU a tiny batch exercises the harness (triton
only under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from fastbond.kernels._backend import triton_available, triton_interpreted
from fastbond.kernels.jbond_loss import jbond_loss
from fastbond.kernels.jbond_loss import jbond_loss_ref as jbond_loss_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TRITON_OK = triton_available() and (CUDA or triton_interpreted())
DTYPE = torch.bfloat16
SHAPES = [(128, 512), (256, 1024), (512, 2048), (512, 4096)] if CUDA else [(4, 64)]
BETA, GAMMA = 0.5, 0.5


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def _inputs(batch: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch + length)
    cols = torch.arange(length)

    def mask():
        lengths = torch.randint(length // 4, length + 1, (batch,), generator=g)
        return cols < lengths[:, None]

    policy_mask, best_mask = mask(), mask()
    out = dict(
        policy_logps=-torch.rand(batch, length, generator=g) * 4,
        policy_mask=policy_mask,
        best_anchor_logps=-torch.rand(batch, length, generator=g) * 4,
        best_anchor_mask=best_mask,
        anchor_logps=-torch.rand(batch, length, generator=g) * 4,
        rewards=torch.randn(batch, generator=g),
        anchor_rewards=torch.randn(batch, 2, generator=g),
    )
    for key in ("policy_logps", "best_anchor_logps", "anchor_logps"):
        out[key] = out[key].to(DTYPE)
    out = {k: v.to(DEVICE) for k, v in out.items()}
    out["policy_logps"].requires_grad_()
    out["best_anchor_logps"].requires_grad_()
    return out


def _bytes_touched(batch: int, length: int) -> int:
    logps = batch * length * DTYPE.itemsize
    masks = 2 * batch * length  # bool
    return 3 * logps + masks + masks + 2 * logps  # forward reads; backward reads masks, writes grads


_COMPILED = {}


def _loss_fn(name: str):
    if name == "reference":
        return jbond_loss_reference
    if name == "compiled":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(jbond_loss_reference)
        return _COMPILED["fn"]
    return lambda *args, **kwargs: jbond_loss(*args, **kwargs, backend=name)


def _step(name: str, inputs):
    loss_fn = _loss_fn(name)
    wrt = [inputs["policy_logps"], inputs["best_anchor_logps"]]

    def step():
        loss, metrics = loss_fn(**inputs, beta=BETA, gamma=GAMMA)
        grads = torch.autograd.grad(loss, wrt)
        _sync()
        return loss, metrics, grads

    return step


def _median_seconds(fn, reps: int = 20 if CUDA else 1) -> float:
    for _ in range(3 if CUDA else 1):  # warm-up (and compilation)
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _device_info() -> dict:
    info = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


_NEEDS_TRITON = pytest.mark.skipif(not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1")
_NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="torch.compile is benchmarked on CUDA only")
BACKENDS = [
    "reference",
    pytest.param("compiled", marks=_NEEDS_CUDA),
    "chunked",
    pytest.param("triton", marks=_NEEDS_TRITON),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch, length", SHAPES, ids=[f"B{b}-T{t}" for b, t in SHAPES])
def test_bench_jbond_loss(benchmark, backend, batch, length):
    inputs = _inputs(batch, length)
    step = _step(backend, inputs)
    moved = _bytes_touched(batch, length)
    benchmark.group = f"jbond_loss B={batch} T={length}"
    benchmark.extra_info.update(_device_info())
    benchmark.extra_info.update(batch=batch, length=length, dtype=str(DTYPE), bytes_touched=moved)
    benchmark.pedantic(step, rounds=20 if CUDA else 3, warmup_rounds=3 if CUDA else 1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # absent with --benchmark-disable
        benchmark.extra_info["GB/s"] = _sig(moved / stats.stats.median / 1e9)

    if backend == "triton":
        seconds = {name: _median_seconds(_step(name, inputs)) for name in ("reference", "chunked", "triton")}
        if CUDA:
            seconds["compiled"] = _median_seconds(_step("compiled", inputs))
        benchmark.extra_info.update(
            {f"{name}_us": _sig(t * 1e6) for name, t in seconds.items()},
            **{f"speedup_vs_{name}": _sig(t / seconds["triton"]) for name, t in seconds.items() if name != "triton"},
        )
