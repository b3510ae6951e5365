"""What the CUDA dispatch may launch: tile candidates, the autotuner, and launch descriptions.

One list per kernel and architecture family holds the tile configurations a
CUDA launch may pick. The launchers hand that list to `triton.autotune`
(pruned at run time to what the device's shared memory holds), and the
compile check (`fastbond.kernels.compile_check`) compiles every entry for
sm_80 and sm_90 and fails on a spill or a shared-memory overflow. Both read
the same lists, so a candidate cannot reach a GPU without having compiled
cleanly in CI.

Autotuning is keyed on the shapes that set a kernel's cost (H and V for the
LM-head kernels, never N, which changes every step), the operand dtypes
(Triton adds them to every key) and the architecture. It picks the fastest
candidate once per key and process, by timing; `FASTBOND_AUTOTUNE=0` skips it
and launches each list's first entry, for runs that must be bitwise
reproducible across processes (different tiles sum in a different order).
Where Triton supports it, the choice is also kept in Triton's on-disk cache,
so a resumed run on the same machine reuses it.

Nothing here imports triton at module level: the lists read the same on
machines without it.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable

# Per-block shared memory a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_MEMORY_PER_BLOCK = {80: 166_912, 90: 232_448}
ARCH_NAMES = {80: "sm_80 (A100)", 90: "sm_90 (H100/H200)"}
ARCHS = tuple(SHARED_MEMORY_PER_BLOCK)


@dataclass(frozen=True)
class Tiles:
    """One tile configuration of the LM-head kernels: a [BLOCK_N tokens × BLOCK_V vocabulary] tile, K step BLOCK_H."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_V": self.block_v, "BLOCK_H": self.block_h}

    def shared_estimate(self, element_bytes: int) -> int:
        """Bytes of the pipelined operand buffers: each stage holds an [N, H] and an [H, V] tile."""
        return self.num_stages * (self.block_n + self.block_v) * self.block_h * element_bytes

    def __str__(self) -> str:
        return f"{self.block_n}x{self.block_v}x{self.block_h} w{self.num_warps} s{self.num_stages}"


# Candidates of the LM-head kernels per architecture family and operand kind:
# "16-bit" (bf16/fp16), "tf32" (fp32 with TF32 matmuls allowed) and "tf32x3"
# (fp32 without: three TF32 products, twice the operand registers). Every
# entry compiles without spills for every flag combination (the compile
# check); the first entry of each list is the untuned default.
#
# The forward holds an fp32 accumulator tile and the online softmax/entropy
# state; 64 accumulator registers a thread (128×128×64 over 8 warps) spill in
# some flag combinations, so most candidates keep 32 (128×64 over 8 warps,
# 64×64 over 4). Since the forward's epilogue keeps one tile-sized value live
# (s − m, each reduction recomputing its exp) and finds the target's column in
# 32 bits, 128×128×64 w8 and 128×64×64 w4 compile spill-free on sm_90 and join
# its list (the 4-warp 128×128×64 still spills 16 B: its 128 accumulator
# registers a thread leave no room for the target's compare). Removed after a
# full compile check found spills: dlogits
# 128×256×64 on sm_90 (bias without soft-cap, 1,340 B), dlogits tf32x3
# 128×64×32 on sm_90.
T = Tiles
LINEAR_FORWARD_TILES = {
    (90, "16-bit"): (T(128, 64, 64, 8, 3), T(64, 64, 64, 4, 4), T(128, 128, 32, 8, 4), T(128, 128, 64, 8, 3),
                     T(128, 64, 64, 4, 3)),
    (80, "16-bit"): (T(128, 64, 64, 8, 3), T(128, 64, 64, 8, 4), T(128, 128, 32, 8, 3), T(64, 64, 64, 4, 4)),
    (90, "tf32"): (T(128, 64, 32, 8, 3), T(64, 64, 32, 4, 4), T(128, 64, 32, 4, 3)),
    (80, "tf32"): (T(128, 64, 32, 8, 3), T(128, 64, 32, 8, 4), T(64, 64, 32, 4, 4)),
    (90, "tf32x3"): (T(64, 64, 32, 4, 4),),
    (80, "tf32x3"): (T(64, 64, 32, 8, 4),),
}
# The backward's dlogits kernel holds one tile and no running state: it
# affords the larger tiles.
LINEAR_DLOGITS_TILES = {
    (90, "16-bit"): (T(128, 128, 64, 8, 3), T(128, 64, 64, 4, 4)),
    (80, "16-bit"): (T(128, 128, 64, 8, 3), T(128, 64, 64, 4, 4), T(64, 128, 64, 4, 4)),
    (90, "tf32"): (T(128, 64, 32, 4, 3), T(64, 128, 32, 4, 3)),
    (80, "tf32"): (T(128, 64, 32, 4, 3), T(64, 128, 32, 4, 3)),
    (90, "tf32x3"): (T(64, 128, 32, 4, 3),),
    (80, "tf32x3"): (T(64, 64, 32, 8, 4), T(128, 64, 32, 8, 3)),
}
# The gradient filter's GEMMs over live tiles (`fastbond.kernels.live_tile_grads`), 16-bit operands only.
# Tiles as above: BLOCK_N tokens × BLOCK_V vocabulary columns, BLOCK_H hidden columns of the output; the
# token and vocabulary steps divide the filter's 128 × 128 tile, so a flag covers whole steps.
# grad_W = dzᵀ·X: [BLOCK_V × BLOCK_H] outputs, the token dimension in steps of BLOCK_N.
LIVE_DZ_T_X_TILES = {
    (90, "16-bit"): (T(64, 128, 128, 8, 3), T(64, 128, 64, 4, 3)),
    (80, "16-bit"): (T(64, 128, 128, 8, 3), T(64, 128, 64, 4, 3)),
}
# grad_h += dz·W: [BLOCK_N × BLOCK_H] outputs, the vocabulary in steps of BLOCK_V.
LIVE_DZ_W_TILES = {
    (90, "16-bit"): (T(128, 64, 128, 8, 3), T(128, 64, 64, 4, 3)),
    (80, "16-bit"): (T(128, 64, 128, 8, 3), T(128, 64, 64, 4, 3)),
}
del T


def arch_family(major: int, minor: int = 0) -> int:
    """The candidate family of a compute capability: Hopper and later use sm_90's lists, earlier GPUs sm_80's."""
    return 90 if major >= 9 else 80


def operand_kind(element_bytes: int, input_precision) -> str:
    """The candidate list a launch draws from: "16-bit", or the fp32 dot's precision."""
    return "16-bit" if element_bytes <= 2 else str(input_precision)


def candidates(table: dict, arch: int, kind: str) -> tuple[Tiles, ...]:
    return table[(arch, kind)]


def autotune_enabled() -> bool:
    return os.environ.get("FASTBOND_AUTOTUNE", "1") != "0"


@dataclass(frozen=True)
class Launch:
    """One kernel launch the CUDA dispatch can make, as the compile check compiles it.

    `signature` gives the Triton type of every runtime parameter, in order;
    `aligned` the parameters a real launch sees as multiples of 16 (pointers
    from the caching allocator, model dimensions), which Triton specializes
    on and which decide vector widths; `constexprs` every compile-time one.
    """

    kernel: Any  # a triton JITFunction
    label: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    aligned: frozenset = field(default_factory=frozenset)
    tensor_cores: bool = False  # must lower to mma.sync / wgmma
    min_vector_loads: int = 0  # at least this many 16-byte (or wider) global loads in the PTX
    representative: bool = False  # part of the subset CI compiles

    @property
    def name(self) -> str:
        return self.kernel.__name__ if hasattr(self.kernel, "__name__") else self.kernel.fn.__name__


def runtime_signature(kernel, types: dict[str, str]) -> dict[str, str]:
    """Triton types of `kernel`'s runtime parameters, in order: those named in `types`, the others i32."""
    return {p.name: types.get(p.name, "i32") for p in kernel.params if not p.is_constexpr}


def _accepts_cache_results() -> bool:
    import triton

    return "cache_results" in inspect.signature(triton.autotune).parameters


def autotuned(kernel, table: dict, key: list[str], operand_of: Callable[[dict], Any], do_bench=None,
              restore: tuple[str, ...] = ()):
    """`kernel` under triton.autotune over every candidate of `table`, pruned per launch.

    `restore`: output arguments the kernel reads back (accumulators), put back after every timed trial.

    A launch keeps the candidates of its device's architecture family and
    operand width that fit the device's per-block shared memory (sm_86/89
    and later parts have less or more than the families' reference GPUs).
    """
    import torch
    import triton

    every = []
    for tiles in dict.fromkeys(t for group in table.values() for t in group):
        every.append(triton.Config(tiles.constexprs(), num_warps=tiles.num_warps, num_stages=tiles.num_stages))

    def prune(configs, named_args, **kwargs):
        operand = operand_of(named_args)  # a tensor: the kernels' matmul operand
        props = torch.cuda.get_device_properties(operand.device)
        element_bytes = operand.element_size()
        kind = operand_kind(element_bytes, kwargs.get("INPUT_PRECISION"))
        allowed = candidates(table, arch_family(props.major, props.minor), kind)
        if not autotune_enabled():
            allowed = allowed[:1]
        limit = getattr(props, "shared_memory_per_block_optin", None) or SHARED_MEMORY_PER_BLOCK[90]
        fitting = [t for t in allowed if t.shared_estimate(element_bytes) <= limit] or list(allowed[-1:])
        wanted = {(t.block_n, t.block_v, t.block_h, t.num_warps, t.num_stages) for t in fitting}
        return [c for c in configs
                if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_H"], c.num_warps, c.num_stages) in wanted]

    extra = {"cache_results": True} if _accepts_cache_results() else {}
    if restore:
        extra["restore_value"] = list(restore)
    if do_bench is not None:  # tests time candidates without a GPU
        extra["do_bench"] = do_bench
    return triton.autotune(configs=every, key=key, prune_configs_by={"early_config_prune": prune}, **extra)(kernel)
