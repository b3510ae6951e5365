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
