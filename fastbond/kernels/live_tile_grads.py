"""The LM-head backward's two gradient GEMMs over the live tiles of dz only.

    grad_W[ids] = dzᵀ · X        grad_h += dz · W[ids]

with dz the [N, chunk] buffer the dlogits kernel wrote, `ids` the vocabulary
ids of its columns (the chunk's slice of the mean-logit order), and `alive`
[⌈N/FILTER_TILE⌉, ⌈chunk/FILTER_TILE⌉] its flags: a FILTER_TILE × FILTER_TILE
tile of dz takes part only when the dlogits kernel found some |∂logp/∂z| in it
(on a row with a non-zero upstream gradient) at or above ε. Every other tile's
products are skipped, in both GEMMs — the gradient filter of
`linear_logprobs(..., filter=True)`; its error bound is in SPEC §8 and the
module docstring of `fastbond.kernels.linear_logprobs`.

cuBLAS cannot skip tiles, so these are Triton GEMMs: each program owns one
output tile and walks the shared dimension, testing the flag before it loads
anything. No atomics: every output element is written by one program, so the
result is deterministic. grad_h is accumulated across vocabulary chunks in an
fp32 buffer (read, add, write per chunk); grad_W rows are complete after their
chunk and are written once in the weight's dtype.

16-bit operands only: fp32's ε (2⁻²⁸) lies below the GEMMs' own rounding, so
fp32 keeps the exact cuBLAS path.
"""

from __future__ import annotations

import itertools

import torch

from fastbond.kernels import tuning

__all__ = ["FILTER_TILE", "live_dz_t_x", "live_dz_w", "cuda_launches"]

try:
    import triton
    import triton.language as tl

    from fastbond.kernels._triton_common import cast_rtne
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

# The filter's granularity (tokens × vocabulary columns): CCE's, and a multiple of every
# dlogits tile, so each dlogits program's tile lies inside one flag.
FILTER_TILE = 128

# The CPU interpreter: few, large programs.
INTERPRETER_TILES = tuning.Tiles(block_n=64, block_v=64, block_h=64, num_warps=4, num_stages=1)


if triton is not None:

    @triton.jit(do_not_specialize=["arch"])
    def _live_dz_t_x_kernel(
        dz_ptr,  # [N, C] dz of one vocabulary chunk
        x_ptr,  # [N, H] hidden states
        alive_ptr,  # [⌈N/FILTER_TILE⌉, ⌈C/FILTER_TILE⌉] int32 flags
        ids_ptr,  # [C] int32 the vocabulary id of each column of dz
        out_ptr,  # [V, H] grad_W: rows ids[c] are written
        N,
        C,
        H,
        stride_dz,
        stride_x,
        stride_out,
        stride_alive,
        arch,  # compute capability family: part of the autotune key only
        BLOCK_N: tl.constexpr,  # the shared (token) dimension's step
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        FILTER_TILE: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):
        pid_v = tl.program_id(0)
        pid_h = tl.program_id(1)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        col_mask = cols < C
        h_mask = hs < H
        flag_col = (pid_v * BLOCK_V) // FILTER_TILE
        acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            live = tl.load(alive_ptr + (n0 // FILTER_TILE) * stride_alive + flag_col)
            if live != 0:
                rows = n0 + tl.arange(0, BLOCK_N)
                row_mask = rows < N
                dz = tl.load(dz_ptr + rows[:, None] * stride_dz + cols[None, :],
                             mask=row_mask[:, None] & col_mask[None, :], other=0.0)
                x = tl.load(x_ptr + rows[:, None] * stride_x + hs[None, :],
                            mask=row_mask[:, None] & h_mask[None, :], other=0.0)
                if INTERPRETED:  # the interpreter's 16-bit dot multiplies raw bits: upcast (exactly) first
                    dz = dz.to(tl.float32)
                    x = x.to(tl.float32)
                acc = tl.dot(tl.trans(dz), x, acc)
        rows_out = tl.load(ids_ptr + cols, mask=col_mask, other=0).to(tl.int64)
        out_ptrs = out_ptr + rows_out[:, None] * stride_out + hs[None, :]
        mask = col_mask[:, None] & h_mask[None, :]
        if INTERPRETED:
            tl.store(out_ptrs, cast_rtne(acc, out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["arch"])
    def _live_dz_w_kernel(
        dz_ptr,  # [N, C] dz of one vocabulary chunk
        w_ptr,  # [V, H] the LM head: rows ids[c] are read
        alive_ptr,  # [⌈N/FILTER_TILE⌉, ⌈C/FILTER_TILE⌉] int32 flags
        ids_ptr,  # [C] int32 the vocabulary id of each column of dz
        acc_ptr,  # [N, H] fp32 grad_h, accumulated across chunks
        N,
        C,
        H,
        stride_dz,
        stride_w,
        stride_acc,
        stride_alive,
        arch,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,  # the shared (vocabulary) dimension's step
        BLOCK_H: tl.constexpr,
        FILTER_TILE: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_h = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        row_mask = rows < N
        h_mask = hs < H
        flags = alive_ptr + ((pid_n * BLOCK_N) // FILTER_TILE) * stride_alive
        acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
        for v0 in range(0, C, BLOCK_V):
            live = tl.load(flags + v0 // FILTER_TILE)
            if live != 0:
                cols = v0 + tl.arange(0, BLOCK_V)
                col_mask = cols < C
                dz = tl.load(dz_ptr + rows[:, None] * stride_dz + cols[None, :],
                             mask=row_mask[:, None] & col_mask[None, :], other=0.0)
                ids = tl.load(ids_ptr + cols, mask=col_mask, other=0).to(tl.int64)
                w = tl.load(w_ptr + ids[:, None] * stride_w + hs[None, :],
                            mask=col_mask[:, None] & h_mask[None, :], other=0.0)
                if INTERPRETED:
                    dz = dz.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(dz, w, acc)
        acc_ptrs = acc_ptr + rows[:, None] * stride_acc + hs[None, :]
        mask = row_mask[:, None] & h_mask[None, :]
        tl.store(acc_ptrs, tl.load(acc_ptrs, mask=mask, other=0.0) + acc, mask=mask)

    _dz_t_x_tuned = tuning.autotuned(_live_dz_t_x_kernel, tuning.LIVE_DZ_T_X_TILES, key=["H", "arch"],
                                     operand_of=lambda args: args["x_ptr"])
    _dz_w_tuned = tuning.autotuned(_live_dz_w_kernel, tuning.LIVE_DZ_W_TILES, key=["H", "arch"],
                                   operand_of=lambda args: args["w_ptr"], restore=("acc_ptr",))


def _launch(tuned, kernel, grid_rows: int, h: int, device: torch.device, tiles, arch: int, *args):
    if tiles is None and device.type == "cuda":
        tuned[lambda meta: (triton.cdiv(grid_rows, meta[_ROWS[kernel]]), triton.cdiv(h, meta["BLOCK_H"]))](
            *args, arch, FILTER_TILE=FILTER_TILE, INTERPRETED=False)
        return
    tiles = tiles or INTERPRETER_TILES
    rows = tiles.block_v if kernel is _live_dz_t_x_kernel else tiles.block_n
    kernel[(triton.cdiv(grid_rows, rows), triton.cdiv(h, tiles.block_h))](
        *args, arch, FILTER_TILE=FILTER_TILE, INTERPRETED=device.type != "cuda",
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **tiles.constexprs())


def live_dz_t_x(dz: torch.Tensor, hidden: torch.Tensor, alive: torch.Tensor, ids: torch.Tensor, out: torch.Tensor,
                arch: int, tiles=None) -> None:
    """out[ids] = dzᵀ · hidden over the live tiles of dz [N, C]: C whole rows of out [V, H] (the weight's dtype)."""
    n, c = dz.shape
    h = hidden.shape[1]
    _launch(_dz_t_x_tuned, _live_dz_t_x_kernel, c, h, dz.device, tiles, arch,
            dz, hidden, alive, ids, out, n, c, h, dz.stride(0), hidden.stride(0), out.stride(0), alive.stride(0))


def live_dz_w(dz: torch.Tensor, weight: torch.Tensor, alive: torch.Tensor, ids: torch.Tensor, acc: torch.Tensor,
              arch: int, tiles=None) -> None:
    """acc [N, H] (fp32) += dz · weight[ids] over the live tiles of dz [N, C]."""
    n, c = dz.shape
    h = weight.shape[1]
    _launch(_dz_w_tuned, _live_dz_w_kernel, n, h, dz.device, tiles, arch,
            dz, weight, alive, ids, acc, n, c, h, dz.stride(0), weight.stride(0), acc.stride(0), alive.stride(0))


# The dimension each kernel's grid rows cover.
_ROWS = {} if triton is None else {_live_dz_t_x_kernel: "BLOCK_V", _live_dz_w_kernel: "BLOCK_N"}


def cuda_launches(arch: int):
    """Every launch the CUDA dispatch can make on `arch`: each candidate of each kernel, bf16 and fp16."""
    if triton is None:
        return
    kernels = ((_live_dz_t_x_kernel, tuning.LIVE_DZ_T_X_TILES, "x_ptr", "out_ptr"),
               (_live_dz_w_kernel, tuning.LIVE_DZ_W_TILES, "w_ptr", "acc_ptr"))
    for (kernel, table, operand, out), dtype in itertools.product(kernels, ("bf16", "fp16")):
        for rank, tiles in enumerate(tuning.candidates(table, arch, "16-bit")):
            types = {"dz_ptr": f"*{dtype}", operand: f"*{dtype}", "alive_ptr": "*i32", "ids_ptr": "*i32",
                     out: f"*{dtype}" if out == "out_ptr" else "*fp32"}
            signature = tuning.runtime_signature(kernel, types)
            aligned = {name for name, kind in signature.items() if kind.startswith("*")}
            aligned |= {"H", "stride_dz", "stride_x", "stride_w", "stride_out", "stride_acc"} & set(signature)
            constexprs = dict(tiles.constexprs(), FILTER_TILE=FILTER_TILE, INTERPRETED=False)
            yield tuning.Launch(
                kernel=kernel, label=f"{dtype} {tiles}", signature=signature, constexprs=constexprs,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages, aligned=frozenset(aligned),
                tensor_cores=True, representative=rank == 0,
            )
