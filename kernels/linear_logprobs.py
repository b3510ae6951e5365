"""Token log-probs from hidden states and the LM head, without [N, V] logits.

    linear_logprobs(hidden [N, H], weight [V, H], targets [N]) -> logp [N] (fp32)

The math (one row i; z = logits, s = scaled logits, p = softmax):

    z     = h_i · Wᵀ + b                                   [V]
    c     = cap · tanh(z / cap)        (soft-cap; c = z without one)
    s     = c / T                      (sampling temperature)
    lse   = log Σ_v exp(s_v)
    logp  = s[t_i] − lse               (0 where t_i == ignore_index)
    ent   = lse − Σ_v p_v s_v = −Σ_v p_v log p_v

Order of soft-cap and temperature: Gemma-2's `final_logit_softcapping` is part
of the model — its forward returns capped logits — and generation divides
those by the temperature. So the cap acts on the raw logits and T on the capped
ones, exactly as above; it is not cap · tanh(z / (cap · T)).

Gradient with an arbitrary upstream gradient g_i (per-token J-BOND weights,
SPEC §8: a backward that assumes a uniform g is wrong):

    ∂logp_i/∂s_v = 1[v = t_i] − p_v
    ∂s_v/∂c_v    = 1 / T
    ∂c_v/∂z_v    = 1 − tanh²(z_v / cap) = 1 − (c_v / cap)²
    dz_iv        = g_i · (1[v = t_i] − p_iv) · (1 − tanh²(z_iv / cap)) / T
    grad_h = dz · W      grad_W = dzᵀ · h      grad_b = Σ_i dz_i

`dz` is [N, V] and never exists whole: it is formed one vocabulary chunk at a
time. Ignored tokens get g_i = 0, so they add nothing to any gradient. The
entropy comes out of the same pass as the log-probs (no extra GEMM) and is
returned detached: nothing in fastbond differentiates it.

Design: forward 1 GEMM, backward 3 GEMMs (8·N·H·V flops in all)
-----------------------------------------------------------------
The forward keeps per token only the log-sum-exp (fp32 [N]) for the backward.
The backward recomputes the logits chunk by chunk (1 GEMM), forms dz in
registers and takes grad_h and grad_W (2 GEMMs). The alternative that skips the
recompute — computing the gradients inside the forward, as fused cross-entropy
kernels do — needs g in the forward. For grad_h that could be deferred
(grad_h_i = g_i · γ_i with γ_i independent of g), but grad_W = Σ_i g_i dz̃_iᵀ h_i
is not separable, and the J-BOND weights are only known after the forward.
Recomputing costs 2·N·H·V flops (1/3 over the 6·N·H·V of the three GEMMs any
implementation needs) and keeps no [N, V] or [V, H] state between the passes.

Chunks run over the vocabulary, not over tokens: each chunk [v0, v1) yields its
rows of grad_W and grad_b completely (one GEMM over all N tokens, fp32
accumulation inside the GEMM, written once in the weight's dtype), while only
grad_h ([N, H], far smaller than [V, H] for a 256k vocabulary) is accumulated
across chunks in fp32. Peak extra memory is O(N·chunk + N·H): one [N, chunk]
buffer plus the fp32 grad_h accumulator.

Backends (one signature):
  reference  naive fp32 (fp64 for fp64 inputs) logits, log_softmax, gather;
             plain autograd — the test oracle. Materializes [N, V].
  chunked    plain PyTorch over vocabulary chunks, fp32 throughout (it is the
             CPU path, where fp32 GEMMs are the fast ones). Forward per chunk:
             logits, chunk log-sum-exp and chunk entropy, merged across chunks
             exactly; backward as above.
  triton     forward: one fused kernel — a program owns BLOCK_N tokens and a
             contiguous span of the vocabulary, computes logits tiles with
             tl.dot (fp32 accumulation), folds them into an online
             log-sum-exp / entropy and picks the target logit; the per-span
             partials ([SPLIT, N], tiny) are merged on the host. Splitting the
             vocabulary keeps every SM busy when N is small.
             backward: per vocabulary chunk, a kernel recomputes the logits
             tile and writes dz (input dtype) into an [N, chunk] buffer; the
             two gradient GEMMs then run on cuBLAS (torch.mm), which is faster
             than atomics-based fused accumulation and deterministic.

All backends take fp32, bf16 and fp16 inputs, return fp32 log-probs and give
gradients in the inputs' dtypes. The no-grad path (torch.is_grad_enabled()
false, or nothing requires grad) runs the forward only: one logits GEMM, no
saved state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ._backend import resolve_backend, triton_available

__all__ = ["linear_logprobs", "linear_logprobs_ref"]

try:  # the module must import (and `chunked` run) where triton is missing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Elements of the per-chunk [N, chunk] buffers. chunked keeps a few fp32
# temporaries of that size (64 MiB each); triton one dz buffer in the input
# dtype (512 MiB in bf16) — large enough that each chunk's GEMMs run at full
# speed and the fp32 grad_h accumulation stays a few % of the GEMM time.
_CHUNKED_ELEMENTS = 1 << 24
_TRITON_ELEMENTS = 1 << 28
_CHUNK_MULTIPLE = 128


# ----------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------


def linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """The naive oracle: full logits in fp32 (fp64 for fp64 inputs), plain autograd."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).T  # [N, V]
    if bias is not None:
        logits = logits + bias.to(dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != ignore_index
    picked = logprobs.gather(1, targets.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    zero = torch.zeros((), dtype=dtype, device=hidden.device)
    logp = torch.where(valid, picked, zero)
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, torch.where(valid, entropy, zero).detach()


# ----------------------------------------------------------------------------
# helpers shared by chunked and triton
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    temperature: float
    softcap: Optional[float]
    ignore_index: int
    entropy: bool
    backend: str
    chunk_size: Optional[int]


def _merge_parts(part_lse: torch.Tensor, part_ent: Optional[torch.Tensor]):
    """Exact merge of softmax statistics computed over disjoint vocabulary ranges.

    part_lse[k] = log Σ_{v∈k} e^{s_v}, part_ent[k] the entropy of the softmax
    restricted to range k. With w_k = e^{lse_k − lse} the mass of range k,
    −Σ p log p = Σ_k w_k (ent_k − log w_k): a sum of non-negative terms, so a
    near-deterministic row does not lose its entropy to cancellation.
    """
    if part_lse.shape[0] == 1:
        return part_lse[0], (part_ent[0] if part_ent is not None else None)
    lse = torch.logsumexp(part_lse, dim=0)  # [N]
    if part_ent is None:
        return lse, None
    log_w = part_lse - lse  # [K, N], ≤ 0
    return lse, (log_w.exp() * (part_ent - log_w)).sum(0)


def _default_chunk(n_tokens: int, vocab: int, budget: int) -> int:
    chunk = max(_CHUNK_MULTIPLE, budget // max(n_tokens, 1) // _CHUNK_MULTIPLE * _CHUNK_MULTIPLE)
    return min(chunk, vocab)


def _finish(target_s, lse, ent, valid):
    zero = torch.zeros((), dtype=torch.float32, device=lse.device)
    logp = torch.where(valid, target_s - lse, zero)
    if ent is not None:
        ent = torch.where(valid, ent, zero)
    return logp, ent


# ----------------------------------------------------------------------------
# chunked: plain PyTorch over vocabulary chunks
# ----------------------------------------------------------------------------


def _chunk_logits(x32, weight, bias, v0, v1, opts: _Options):
    """Scaled logits s [N, v1 − v0] in fp32, and tanh(z / cap) when soft-capped."""
    z = x32 @ weight[v0:v1].float().T
    if bias is not None:
        z += bias[v0:v1].float()
    if opts.softcap is None:
        return z.mul_(1.0 / opts.temperature), None
    th = z.mul_(1.0 / opts.softcap).tanh_()
    return th * (opts.softcap / opts.temperature), th


def _chunked_forward(hidden, weight, bias, targets, valid, opts: _Options):
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk = opts.chunk_size or _default_chunk(n, vocab, _CHUNKED_ELEMENTS)
    x32 = hidden.float()
    safe_t = targets.masked_fill(~valid, 0)
    target_s = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    part_lse, part_ent = [], []
    for v0 in range(0, vocab, chunk):
        v1 = min(vocab, v0 + chunk)
        s, _ = _chunk_logits(x32, weight, bias, v0, v1, opts)  # [N, c]
        picked = s.gather(1, (safe_t - v0).clamp_(0, v1 - v0 - 1)[:, None]).squeeze(1)
        lse_c = torch.logsumexp(s, dim=1)
        part_lse.append(lse_c)
        if opts.entropy:
            # entropy of the chunk-restricted softmax q: −Σ q log q
            log_q = s.sub_(lse_c[:, None])
            part_ent.append(-(log_q.exp() * log_q).sum(1))
        hit = (safe_t >= v0) & (safe_t < v1)
        target_s += torch.where(hit, picked, torch.zeros_like(picked))
    lse, ent = _merge_parts(torch.stack(part_lse), torch.stack(part_ent) if opts.entropy else None)
    logp, ent = _finish(target_s, lse, ent, valid)
    return logp, ent, lse


def _chunked_backward(hidden, weight, bias, targets, valid, lse, g, opts: _Options, needs):
    need_h, need_w, need_b = needs
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk = opts.chunk_size or _default_chunk(n, vocab, _CHUNKED_ELEMENTS)
    x32 = hidden.float()
    safe_t = targets.masked_fill(~valid, 0)
    scale = torch.where(valid, g.float(), torch.zeros_like(lse)) * (1.0 / opts.temperature)  # [N]
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    for v0 in range(0, vocab, chunk):
        v1 = min(vocab, v0 + chunk)
        s, th = _chunk_logits(x32, weight, bias, v0, v1, opts)
        dz = s.sub_(lse[:, None]).exp_().neg_()  # −p, in place of s
        hit = ((safe_t >= v0) & (safe_t < v1)).float()
        dz.scatter_add_(1, (safe_t - v0).clamp_(0, v1 - v0 - 1)[:, None], hit[:, None])  # onehot − p
        dz.mul_(scale[:, None])
        if th is not None:
            dz.mul_(th.square_().neg_().add_(1.0))  # dc/dz = 1 − tanh²
        if need_w:
            grad_w[v0:v1] = dz.T @ x32
        if need_h:
            grad_h.addmm_(dz, weight[v0:v1].float())
        if need_b:
            grad_b[v0:v1] = dz.sum(0)
    return (grad_h.to(hidden.dtype) if need_h else None), grad_w, grad_b


# ----------------------------------------------------------------------------
# triton kernels
# ----------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _tanh(x):
        # tanh through the sigmoid: tl.math.tanh / libdevice moved between
        # Triton releases; absolute error ~1e-7, ample after the · cap.
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _raw_logits_tile(
        x_ptr,  # [N, H] hidden states
        w_ptr,  # [V, H] LM-head weight
        b_ptr,  # [V] bias
        rows,  # [BLOCK_N] int64 token indices
        cols,  # [BLOCK_V] int64 vocabulary indices
        row_mask,
        col_mask,
        H,
        stride_x,
        stride_w,
        HAS_BIAS: tl.constexpr,
        EVEN_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        INTERPRET_BF16: tl.constexpr,
    ):
        """z = h · Wᵀ + b for one [BLOCK_N, BLOCK_V] tile, fp32 accumulation."""
        offs_h = tl.arange(0, BLOCK_H)
        x_ptrs = x_ptr + rows[:, None] * stride_x + offs_h[None, :]  # [BLOCK_N, BLOCK_H]
        w_ptrs = w_ptr + cols[None, :] * stride_w + offs_h[:, None]  # [BLOCK_H, BLOCK_V]: a Wᵀ tile
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            if EVEN_H:
                x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
            else:
                h_mask = offs_h < H - h0
                x = tl.load(x_ptrs, mask=row_mask[:, None] & h_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=h_mask[:, None] & col_mask[None, :], other=0.0)
            if INTERPRET_BF16:
                # Triton's CPU interpreter keeps bf16 as raw uint16 and its dot
                # multiplies those integers; bf16 → fp32 is exact, so upcasting
                # first changes nothing but the speed
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_H
            w_ptrs += BLOCK_H
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _linear_logprobs_fwd_kernel(
        x_ptr,  # [N, H] hidden states
        w_ptr,  # [V, H] LM-head weight
        b_ptr,  # [V] bias (unread without HAS_BIAS)
        t_ptr,  # [N] int64 targets (ignore_index never matches a column)
        lse_part_ptr,  # [SPLIT, N] fp32 log-sum-exp of s over the program's vocabulary span
        ent_part_ptr,  # [SPLIT, N] fp32 entropy of the span-restricted softmax
        tgt_ptr,  # [N] fp32 s[target], written by the one span that holds the target
        N,
        V,
        H,
        stride_x,
        stride_w,
        span,  # vocabulary columns per span, a multiple of BLOCK_V
        n_split,  # spans (SPLIT)
        inv_temp,
        softcap,
        HAS_BIAS: tl.constexpr,
        SOFTCAP: tl.constexpr,
        ENTROPY: tl.constexpr,
        EVEN_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        INTERPRET_BF16: tl.constexpr,
    ):
        # The span index varies fastest: programs resident at the same time
        # share a few token blocks (whose hidden rows stay in L2) and stream
        # the weight spans once for all of them.
        pid = tl.program_id(0).to(tl.int64)  # 64-bit: N·V and V·H offsets pass 2^31
        pid_n = pid // n_split
        pid_s = pid % n_split
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)
        v_begin = pid_s * span
        v_end = tl.minimum(v_begin + span, V)

        # finite start for the running max: (m − m_new) · l below must be 0, not −inf · 0
        m = tl.full((BLOCK_N,), -1.0e30, tl.float32)  # running max of s
        l = tl.zeros((BLOCK_N,), tl.float32)  # Σ e^{s − m}
        a = tl.zeros((BLOCK_N,), tl.float32)  # Σ e^{s − m} (s − m)
        t_s = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < v_end
            z = _raw_logits_tile(
                x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_x, stride_w,
                HAS_BIAS, EVEN_H, BLOCK_N, BLOCK_V, BLOCK_H, INPUT_PRECISION, INTERPRET_BF16,
            )
            if SOFTCAP:
                z = softcap * _tanh(z / softcap)
            s = tl.where(col_mask[None, :], z * inv_temp, float("-inf"))
            # masked columns (≥ V) hold s = −inf and must never be picked
            hit = (cols[None, :] == tgt[:, None]) & col_mask[None, :]
            t_s += tl.sum(tl.where(hit, s, 0.0), axis=1)
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile has a live column
            alpha = tl.exp(m - m_new)
            e = tl.exp(s - m_new[:, None])
            if ENTROPY:
                d = tl.where(col_mask[None, :], s - m_new[:, None], 0.0)
                # re-centre the old sum on m_new: Σ e^{s−m_new}(s−m_new) = α (a + (m − m_new) l)
                a = alpha * (a + (m - m_new) * l) + tl.sum(e * d, axis=1)
            l = alpha * l + tl.sum(e, axis=1)
            m = m_new

        part = pid_s * N + rows
        tl.store(lse_part_ptr + part, m + tl.log(l), mask=row_mask)
        if ENTROPY:
            tl.store(ent_part_ptr + part, tl.log(l) - a / l, mask=row_mask)
        owns = row_mask & (tgt >= v_begin) & (tgt < v_end)
        tl.store(tgt_ptr + rows, t_s, mask=owns)

    @triton.jit
    def _linear_logprobs_dlogits_kernel(
        x_ptr,  # [N, H] hidden states
        w_ptr,  # [V, H] LM-head weight
        b_ptr,  # [V] bias (unread without HAS_BIAS)
        t_ptr,  # [N] int64 targets
        lse_ptr,  # [N] fp32 log-sum-exp from the forward
        g_ptr,  # [N] fp32 upstream gradient / T, 0 on ignored tokens
        dz_ptr,  # [N, >= v_hi − v_lo] dz for vocabulary columns [v_lo, v_hi), input dtype
        N,
        H,
        v_lo,
        v_hi,
        stride_x,
        stride_w,
        stride_dz,
        inv_temp,
        softcap,
        HAS_BIAS: tl.constexpr,
        SOFTCAP: tl.constexpr,
        EVEN_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        GROUP_N: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        INTERPRET_BF16: tl.constexpr,
    ):
        # Grouped ordering (as in the Triton matmul tutorial): GROUP_N token
        # blocks sweep the chunk's vocabulary blocks together, so both the
        # hidden rows and the weight rows are reused from L2.
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_v = tl.cdiv(v_hi - v_lo, BLOCK_V)
        num_pid_in_group = GROUP_N * num_pid_v
        group_id = pid // num_pid_in_group
        first_n = group_id * GROUP_N
        group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
        pid_n = first_n + (pid % num_pid_in_group) % group_size
        pid_v = (pid % num_pid_in_group) // group_size

        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = v_lo + pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_mask = rows < N
        col_mask = cols < v_hi
        z = _raw_logits_tile(
            x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_x, stride_w,
            HAS_BIAS, EVEN_H, BLOCK_N, BLOCK_V, BLOCK_H, INPUT_PRECISION, INTERPRET_BF16,
        )
        tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=float("inf"))  # padding rows: p = 0
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
        if SOFTCAP:
            th = _tanh(z / softcap)
            s = softcap * th * inv_temp
        else:
            s = z * inv_temp
        p = tl.exp(s - lse[:, None])
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        dz = (onehot - p) * g[:, None]
        if SOFTCAP:
            dz = dz * (1.0 - th * th)
        if INTERPRET_BF16:
            # the CPU interpreter truncates fp32 → bf16; round to nearest even
            # first, as the GPU's conversion does
            bits = dz.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            dz = bits.to(tl.float32, bitcast=True)
        dz_ptrs = dz_ptr + rows[:, None] * stride_dz + (cols - v_lo)[None, :]
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------
# triton host launchers
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tiles:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


def _tiles(dtype: torch.dtype, device: torch.device) -> _Tiles:
    if device.type != "cuda":
        # interpreter: few, large programs — its cost is per program and per op
        return _Tiles(block_n=64, block_v=128, block_h=32, num_warps=4, num_stages=1)
    # 128×128 fp32 accumulator over 8 warps (64 registers a thread), 3-stage
    # pipeline: 3·(128 + 128)·64·2 B = 96 KiB of shared memory in 16-bit.
    block_h = 32 if dtype == torch.float32 else 64
    return _Tiles(block_n=128, block_v=128, block_h=block_h, num_warps=8, num_stages=3)


def _input_precision(dtype: torch.dtype, device: torch.device):
    if dtype != torch.float32:
        return None  # irrelevant for 16-bit operands: Triton's default
    # follow PyTorch's own setting for fp32 matmuls (off by default: exact fp32)
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _interpret_bf16(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype == torch.bfloat16 and device.type != "cuda"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split(n_tokens: int, vocab: int, tiles: _Tiles, device: torch.device):
    """Vocabulary spans per token block: enough programs to fill the GPU."""
    n_blocks = triton.cdiv(n_tokens, tiles.block_n)
    v_blocks = triton.cdiv(vocab, tiles.block_v)
    if device.type == "cuda":
        # ~16 programs per SM keeps the tail of the last wave short
        target = 16 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4  # interpreter: still ≥ 2 spans, so the merge is exercised
    split = max(1, min(v_blocks, triton.cdiv(target, n_blocks)))
    blocks_per_split = triton.cdiv(v_blocks, split)
    split = triton.cdiv(v_blocks, blocks_per_split)  # no empty span
    return split, blocks_per_split * tiles.block_v


def _triton_forward(hidden, weight, bias, targets, valid, opts: _Options):
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    tiles = _tiles(hidden.dtype, device)
    split, span = _split(n, vocab, tiles, device)
    lse_part = torch.empty((split, n), dtype=torch.float32, device=device)
    ent_part = torch.empty((split, n), dtype=torch.float32, device=device) if opts.entropy else lse_part
    target_s = torch.zeros(n, dtype=torch.float32, device=device)
    grid = (triton.cdiv(n, tiles.block_n) * split,)
    _linear_logprobs_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets,
        lse_part, ent_part, target_s,
        n, vocab, h, hidden.stride(0), weight.stride(0), span, split,
        1.0 / opts.temperature, float(opts.softcap or 1.0),
        HAS_BIAS=bias is not None,
        SOFTCAP=opts.softcap is not None,
        ENTROPY=opts.entropy,
        EVEN_H=h % tiles.block_h == 0,
        BLOCK_N=tiles.block_n,
        BLOCK_V=tiles.block_v,
        BLOCK_H=tiles.block_h,
        INPUT_PRECISION=_input_precision(hidden.dtype, device),
        INTERPRET_BF16=_interpret_bf16(hidden.dtype, device),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    lse, ent = _merge_parts(lse_part, ent_part if opts.entropy else None)
    logp, ent = _finish(target_s, lse, ent, valid)
    return logp, ent, lse


@functools.lru_cache(maxsize=None)
def _fp32_accumulation(device: str, dtype: torch.dtype) -> str:
    """How this PyTorch build can add a 16-bit matmul into an fp32 tensor.

    "addmm": cuBLAS with an fp32 C, in place (recent CUDA builds take
    `out_dtype=torch.float32`); "mm": an fp32 product, then an add; "": none —
    the product is formed in the input dtype.
    """
    a = torch.ones((2, 3), dtype=dtype, device=device)
    try:
        acc = torch.full((2, 2), 0.5, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a.T, out_dtype=torch.float32, out=acc)
        if bool((acc == 3.5).all()):
            return "addmm"
    except (RuntimeError, TypeError):
        pass
    try:
        if torch.mm(a, a.T, out_dtype=torch.float32).dtype == torch.float32:
            return "mm"
    except (RuntimeError, TypeError):
        pass
    return ""


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if not a.is_cuda:  # the interpreter path: exact and cheap at test sizes
        acc.addmm_(a.float(), b.float())
        return
    how = _fp32_accumulation(str(a.device), a.dtype)
    if how == "addmm":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif how == "mm":
        acc += torch.mm(a, b, out_dtype=torch.float32)
    else:  # older PyTorch: the product rounds to 16 bits once per chunk
        acc += a @ b


def _triton_backward(hidden, weight, bias, targets, valid, lse, g, opts: _Options, needs):
    need_h, need_w, need_b = needs
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    tiles = _tiles(hidden.dtype, device)
    chunk = min(vocab, opts.chunk_size or _default_chunk(n, vocab, _TRITON_ELEMENTS))
    n_chunks = triton.cdiv(vocab, chunk)
    g_scaled = torch.where(valid, g.float(), torch.zeros_like(lse)) * (1.0 / opts.temperature)
    dz_buf = torch.empty((n, chunk), dtype=hidden.dtype, device=device)
    if need_h:
        # one chunk: the GEMM's own fp32 accumulation suffices; several: fp32 across chunks
        grad_h = torch.empty_like(hidden) if n_chunks == 1 else torch.zeros((n, h), dtype=torch.float32, device=device)
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    for v_lo in range(0, vocab, chunk):
        v_hi = min(vocab, v_lo + chunk)
        grid = (triton.cdiv(n, tiles.block_n) * triton.cdiv(v_hi - v_lo, tiles.block_v),)
        _linear_logprobs_dlogits_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, targets, lse, g_scaled, dz_buf,
            n, h, v_lo, v_hi, hidden.stride(0), weight.stride(0), dz_buf.stride(0),
            1.0 / opts.temperature, float(opts.softcap or 1.0),
            HAS_BIAS=bias is not None,
            SOFTCAP=opts.softcap is not None,
            EVEN_H=h % tiles.block_h == 0,
            BLOCK_N=tiles.block_n,
            BLOCK_V=tiles.block_v,
            BLOCK_H=tiles.block_h,
            GROUP_N=8,
            INPUT_PRECISION=_input_precision(hidden.dtype, device),
            INTERPRET_BF16=_interpret_bf16(hidden.dtype, device),
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )
        dz = dz_buf[:, : v_hi - v_lo]  # [N, c], row stride `chunk`: cuBLAS takes it as is
        if need_w:
            torch.mm(dz.T, hidden, out=grad_w[v_lo:v_hi])  # complete rows: K = N in one GEMM
        if need_h:
            if n_chunks == 1:
                torch.mm(dz, weight, out=grad_h)
            else:
                _accumulate_mm(grad_h, dz, weight[v_lo:v_hi])
        if need_b:
            grad_b[v_lo:v_hi] = dz.sum(0, dtype=torch.float32)
    if need_h:
        grad_h = grad_h.to(hidden.dtype)
    return (grad_h if need_h else None), grad_w, grad_b


# ----------------------------------------------------------------------------
# autograd and the public entry point
# ----------------------------------------------------------------------------

_FORWARD = {"chunked": _chunked_forward, "triton": _triton_forward}
_BACKWARD = {"chunked": _chunked_backward, "triton": _triton_backward}


class LinearLogprobsFunction(torch.autograd.Function):
    """Forward: 1 logits GEMM, saves lse [N]. Backward: recompute + 2 GEMMs per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: _Options):
        valid = targets != opts.ignore_index
        logp, ent, lse = _FORWARD[opts.backend](hidden, weight, bias, targets, valid, opts)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.opts = opts
        if ent is None:
            return logp, None
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        opts = ctx.opts
        needs = ctx.needs_input_grad[:3]
        if grad_logp is None or not any(needs):
            return None, None, None, None, None
        valid = targets != opts.ignore_index
        grads = _BACKWARD[opts.backend](hidden, weight, bias, targets, valid, lse, grad_logp, opts, needs)
        return grads[0], grads[1], grads[2], None, None


def _check_inputs(hidden, weight, targets, bias, temperature, softcap, chunk_size):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2-D tensor [N, H], got shape {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(
            f"weight must be a non-empty 2-D tensor [V, H], got shape {tuple(getattr(weight, 'shape', ()))}"
            " (a ZeRO-3 partitioned LM head must be gathered first)"
        )
    n, h = hidden.shape
    vocab = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"hidden [N, H] = {tuple(hidden.shape)} and weight [V, H] = {tuple(weight.shape)} differ in H")
    if not isinstance(targets, torch.Tensor) or targets.shape != (n,):
        raise ValueError(f"targets must have shape [N] = ({n},), got {tuple(getattr(targets, 'shape', ()))}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    tensors = [("weight", weight), ("targets", targets)]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (vocab,):
            raise ValueError(f"bias must have shape [V] = ({vocab},), got {tuple(getattr(bias, 'shape', ()))}")
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bias must be float32, bfloat16 or float16, got {bias.dtype}")
        tensors.append(("bias", bias))
    for name, tensor in tensors:
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden on {hidden.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
):
    """Log-probs [N] (fp32) of `targets` under log_softmax(softcap(hidden·Wᵀ + b) / T).

    hidden [N, H], weight [V, H] (the LM head), targets [N] (int64; tokens
    equal to `ignore_index` get log-prob 0, entropy 0 and no gradient), bias
    [V] or None. softcap: Gemma-2's final_logit_softcapping, applied to the
    raw logits before the temperature. With `return_entropy` also returns the
    entropy [N] of the same distribution (detached), from the same pass.

    backend: "auto" (triton on CUDA, else chunked), "reference", "chunked",
    "triton". chunk_size: vocabulary columns per chunk for chunked/triton
    (default: sized from N so one [N, chunk] buffer stays bounded).
    Differentiable w.r.t. hidden, weight and bias.
    """
    _check_inputs(hidden, weight, targets, bias, temperature, softcap, chunk_size)
    backend = resolve_backend(backend, hidden)
    valid = targets != ignore_index
    vocab = weight.shape[0]
    # a target outside [0, V) would silently read another token's logit in
    # the kernels; one host sync is negligible next to the GEMMs
    if bool((valid & ((targets < 0) | (targets >= vocab))).any()):
        raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    softcap = None if softcap is None else float(softcap)
    if backend == "reference":
        return linear_logprobs_ref(
            hidden, weight, targets, bias, temperature, softcap, ignore_index, return_entropy
        )
    if backend == "triton" and not triton_available():  # pragma: no cover - resolve_backend says so first
        raise RuntimeError("backend='triton' needs the triton package")

    hidden = hidden.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    targets = targets.to(torch.int64).contiguous()
    opts = _Options(float(temperature), softcap, int(ignore_index), bool(return_entropy), backend, chunk_size)

    if hidden.shape[0] == 0 and backend == "triton":
        opts = _Options(opts.temperature, softcap, opts.ignore_index, opts.entropy, "chunked", chunk_size)  # no empty grid

    inputs = (hidden, weight) + ((bias,) if bias is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        logp, ent = LinearLogprobsFunction.apply(hidden, weight, bias, targets, opts)
    else:  # no graph, nothing saved: the forward GEMM only
        logp, ent, _ = _FORWARD[backend](hidden, weight, bias, targets, valid, opts)
    return (logp, ent) if return_entropy else logp
