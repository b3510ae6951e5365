"""Anchor EMA bandwidth: GB/s of every backend against the ceilings that matter.

    pytest benchmarks/test_bench_ema.py --benchmark-enable [--benchmark-json out.json]

The op is memory bound, so the figure of merit is bytes moved per second. One
update with fp32 state, a bf16 policy and a bf16 shadow moves 12 bytes per
parameter (fp32 anchor read + write, bf16 policy read, bf16 shadow write).
Ceilings, measured on the same buffers:

* `copy`         — one `Tensor.copy_` of the flat bf16 policy buffer into the
  flat bf16 shadow buffer (GBs at these sizes: the asymptotic device-to-device
  bandwidth an elementwise kernel can hope for; goal: the triton op reaches
  ≥ 85 % of its GB/s);
* `foreach_lerp` — `torch._foreach_lerp_` of the bf16 shadow toward the bf16
  policy: the naive bf16 EMA, PyTorch's own multi-tensor path (goal: the
  triton op's GB/s is no lower).

`triton_flat` runs the same update on the three flat buffers (one tensor each),
the form ZeRO's local partitions take. On CUDA the parameters are Gemma-like
lists of matrices, 2.5B (Gemma 2B) and
8.5B (Gemma 7B) parameters, or as many layers as fit in free memory at 8 bytes
a parameter (anchor + policy + shadow). On CPU a tiny model exercises the
harness (the triton case under TRITON_INTERPRET=1 only). The triton case
records the goal ratios in `extra_info`, timing the ceilings itself.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import pytest
import torch

from fastbond.kernels import ema as ema_module
from fastbond.kernels._backend import triton_available, triton_interpreted
from fastbond.kernels.ema import ema_

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TRITON_OK = triton_available() and (CUDA or triton_interpreted())
ETA = 0.01
STATE_BYTES_PER_PARAM = 4 + 2 + 2  # fp32 anchor, bf16 policy, bf16 shadow held in memory
MOVED_BYTES = {"copy": 2 + 2, "foreach_lerp": 2 + 2 + 2, "op": 4 + 4 + 2 + 2}  # read + written per parameter


@dataclasses.dataclass(frozen=True)
class Preset:
    """A Gemma-like decoder: the parameter list an anchor EMA walks over."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    q_dim: int
    kv_dim: int

    def layer_shapes(self) -> list[tuple[int, ...]]:
        h = self.hidden
        return [
            (self.q_dim, h), (self.kv_dim, h), (self.kv_dim, h), (h, self.q_dim),  # attention
            (self.intermediate, h), (self.intermediate, h), (h, self.intermediate),  # gated MLP
            (h,), (h,),  # the two RMSNorm weights
        ]

    def shapes(self, layers: int | None = None) -> list[tuple[int, ...]]:
        layers = self.layers if layers is None else layers
        return [(self.vocab, self.hidden)] + self.layer_shapes() * layers + [(self.hidden,)]


def _numel(shapes) -> int:
    return sum(int(torch.Size(s).numel()) for s in shapes)


GEMMA_2B = Preset("gemma-2b", vocab=256000, hidden=2048, intermediate=16384, layers=18, q_dim=2048, kv_dim=256)
GEMMA_7B = Preset("gemma-7b", vocab=256000, hidden=3072, intermediate=24576, layers=28, q_dim=4096, kv_dim=4096)
TINY = Preset("tiny", vocab=128, hidden=32, intermediate=64, layers=1, q_dim=32, kv_dim=16)
PRESETS = [GEMMA_2B, GEMMA_7B] if CUDA else [TINY]


def _fitting_shapes(preset: Preset) -> list[tuple[int, ...]]:
    """The preset's shapes, with as many layers as fit in free GPU memory (8 bytes a parameter)."""
    if not CUDA:
        return preset.shapes()
    free, _ = torch.cuda.mem_get_info()
    largest = max(_numel([s]) for s in preset.shapes(1))
    # Head-room: the reference backend's fp32 copy of the largest tensor, allocator slack.
    budget = free - 4 * largest - (2 << 30)
    per_layer = _numel(preset.layer_shapes()) * STATE_BYTES_PER_PARAM
    fixed = _numel(preset.shapes(0)) * STATE_BYTES_PER_PARAM
    layers = min(preset.layers, max(0, (budget - fixed) // per_layer))
    if layers < 1:
        pytest.skip(f"{preset.name}: not even one layer fits in {free / 2**30:.1f} GiB free")
    return preset.shapes(layers)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _median_seconds(fn, reps: int = 5 if CUDA else 1) -> float:
    """Median wall time of fn (synchronized), after one warm-up call."""
    fn()
    _sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def _device_info() -> dict:
    info = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


@pytest.fixture(scope="module", params=PRESETS, ids=lambda p: p.name)
def state(request):
    """fp32 anchor, bf16 policy and bf16 shadow: flat buffers, and lists of per-parameter views of them.

    Flat buffers with parameter views are how ZeRO and FSDP hold parameters; the
    lists are what a model's `parameters()` hands the EMA.
    """
    shapes = _fitting_shapes(request.param)
    numel = _numel(shapes)
    torch.manual_seed(0)
    flat = {
        "anchor": torch.randn(numel, device=DEVICE),
        "policy": torch.empty(numel, device=DEVICE, dtype=torch.bfloat16),
        "shadow": torch.empty(numel, device=DEVICE, dtype=torch.bfloat16),
    }
    flat["policy"].copy_(flat["anchor"]).add_(0.01)
    views = {name: list(torch.split(buffer, [_numel([s]) for s in shapes])) for name, buffer in flat.items()}
    views = {name: [v.view(s) for v, s in zip(tensors, shapes)] for name, tensors in views.items()}
    yield request.param, flat, views
    del flat, views
    if CUDA:
        torch.cuda.empty_cache()


def _ops(flat, views):
    anchors, policies, shadows = views["anchor"], views["policy"], views["shadow"]
    return {
        # One Tensor.copy_ of the whole bf16 policy buffer: the copy bandwidth ceiling.
        "copy": lambda: flat["shadow"].copy_(flat["policy"]),
        # PyTorch's multi-tensor lerp over the same parameter list (a bf16 EMA).
        "foreach_lerp": lambda: torch._foreach_lerp_(shadows, policies, ETA),
        "reference": lambda: ema_(anchors, policies, ETA, backend="reference", shadow=shadows),
        "chunked": lambda: ema_(anchors, policies, ETA, backend="chunked", shadow=shadows),
        "triton": lambda: ema_(anchors, policies, ETA, backend="triton", shadow=shadows),
        "triton_flat": lambda: ema_(flat["anchor"], flat["policy"], ETA, backend="triton", shadow=flat["shadow"]),
    }


_NEEDS_TRITON = pytest.mark.skipif(not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1")
OPS = ["copy", "foreach_lerp", "reference", "chunked", pytest.param("triton", marks=_NEEDS_TRITON),
       pytest.param("triton_flat", marks=_NEEDS_TRITON)]


@pytest.mark.parametrize("op", OPS)
def test_bench_ema(benchmark, state, op):
    preset, flat, views = state
    params = flat["anchor"].numel()
    moved = params * MOVED_BYTES.get(op, MOVED_BYTES["op"])
    fn = _ops(flat, views)[op]

    def run():
        fn()
        _sync()

    benchmark.group = f"ema {preset.name}"
    benchmark.extra_info.update(_device_info())
    benchmark.extra_info.update(preset=preset.name, params=params, tensors=len(views["anchor"]), bytes_moved=moved)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # absent with --benchmark-disable
        benchmark.extra_info["GB/s"] = moved / stats.stats.median / 1e9

    if op == "triton":
        # The goals are ratios to ceilings measured now, on these buffers.
        ops = _ops(flat, views)
        seconds = {name: _median_seconds(ops[name]) for name in ("copy", "foreach_lerp", "chunked", "triton")}
        gbps = {name: params * MOVED_BYTES.get(name, MOVED_BYTES["op"]) / t / 1e9 for name, t in seconds.items()}
        benchmark.extra_info.update(
            {f"{name}_GB/s": _sig(value) for name, value in gbps.items()},
            ratio_vs_copy=_sig(gbps["triton"] / gbps["copy"]),  # goal ≥ 0.85
            ratio_vs_foreach_lerp=_sig(gbps["triton"] / gbps["foreach_lerp"]),  # goal ≥ 1.0
            speedup_vs_chunked=_sig(seconds["chunked"] / seconds["triton"]),  # same job, fused
            goal_copy_met=gbps["triton"] >= 0.85 * gbps["copy"],
            goal_foreach_lerp_met=gbps["triton"] >= gbps["foreach_lerp"],
            launch_config=dict(zip(("BLOCK", "CHUNK", "num_warps"), ema_module._launch_config(DEVICE))),
        )
