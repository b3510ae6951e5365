"""Triton helpers shared by several kernels (imported only where triton is)."""

import triton
import triton.language as tl


@triton.jit
def cast_rtne(x, DTYPE: tl.constexpr):
    """fp32 → DTYPE rounding to nearest even. bf16 by hand: GPUs round, but Triton's CPU
    interpreter truncates; spelling it out gives the same bits on both (and equals torch's .to)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        out = tl.where(x != x, x, rounded).to(tl.bfloat16)  # a NaN must not carry into the sign bit
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def grouped_coords(pid, num_rows, num_cols, group):
    """(row, column) of program `pid` when `group` rows at a time sweep every column.

    Inside a group the row varies fastest, so programs running together share
    a column (their column operand is read from HBM once and then from L2)
    and cycle over only `group` rows (whose operand stays in L2 while the
    group sweeps the columns): the Triton matmul tutorial's ordering.
    """
    per_group = group * num_cols
    first_row = (pid // per_group) * group
    size = tl.minimum(num_rows - first_row, group)
    row = first_row + (pid % per_group) % size
    col = (pid % per_group) // size
    return row, col


@triton.jit
def fast_tanh(x, INTERPRETED: tl.constexpr):
    """tanh(x) = 1 − 2 / (e^{2x} + 1) with one ex2 and one reciprocal, both on the special-function unit.

    ex2.approx and rcp.approx each carry ~2⁻²² relative error, so the result's
    absolute error is below 1e-6 — about 2e-5 of a logit after Gemma-2's
    ×30 cap, far under the bf16 rounding of the operands. PTX's tanh.approx
    would be one instruction, but its 2⁻¹¹ relative error is ~1e-2 of a
    logit after the cap: too coarse for log-probs that are summed over a
    sequence. ±inf and large |x| give ±1 exactly (e^{2x} = inf → 1/inf = 0).
    The CPU interpreter has no inline PTX: it divides.
    """
    e = tl.exp2(x * 2.885390081777927)  # e^{2x} = 2^{2x·log2(e)}
    if INTERPRETED:
        r = 1.0 / (e + 1.0)
    else:
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [e + 1.0], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return 1.0 - 2.0 * r
