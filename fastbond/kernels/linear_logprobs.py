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

Gradient filter (`filter=True`, triton with 16-bit inputs; off by default):
the dlogits kernel also flags each 128×128 tile of dz holding some
|∂logp/∂z|·T ≥ ε on a row with g_i ≠ 0, and the two gradient GEMMs run as
Triton GEMMs over the flagged tiles only (`live_tile_grads.py`). A skipped
tile changes ∂h_i by at most (|g_i|/T)·Σ_v d_iv|W_v| and ∂W_v by at most
(1/T)·Σ_i |g_i| d_iv |h_i| over its entries, each d_iv < ε (docs/kernels.md).

All backends take fp32, bf16 and fp16 inputs, return fp32 log-probs and give
gradients in the inputs' dtypes. The no-grad path (torch.is_grad_enabled()
false, or nothing requires grad) runs the forward only: one logits GEMM, no
saved state.
"""

from __future__ import annotations

import functools
import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from fastbond.kernels import live_tile_grads, tuning
from fastbond.kernels._backend import resolve_backend, triton_available
from fastbond.kernels.live_tile_grads import FILTER_TILE, live_dz_t_x, live_dz_w

__all__ = ["linear_logprobs", "linear_logprobs_ref", "resolve_linear_backend"]

try:  # the module must import (and `chunked` run) where triton is missing
    import triton
    import triton.language as tl

    from fastbond.kernels._triton_common import cast_rtne, fast_tanh, grouped_coords
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
# CUDA launches of the kernels need H % 16 == 0 (16-byte aligned rows of every operand).
_CUDA_H_MULTIPLE = 16


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
    filter_eps: Optional[float] = None  # the triton backward's gradient filter; None: exact


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
        INTERPRETED: tl.constexpr,
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
            if INTERPRETED:
                # Triton's CPU interpreter keeps bf16 as raw uint16 and its dot
                # multiplies those integers; 16-bit → fp32 is exact, so upcasting
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
    def _target_logits(x_ptr, w_ptr, b_ptr, rows, targets, live, H, stride_x, stride_w, HAS_BIAS: tl.constexpr,
                       EVEN_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
        """z[target] = h · W[target] + b[target] per row (fp32 products of exact 16-bit upcasts); 0 where not live."""
        offs_h = tl.arange(0, BLOCK_H)
        x_ptrs = x_ptr + rows[:, None] * stride_x + offs_h[None, :]
        w_ptrs = w_ptr + targets[:, None] * stride_w + offs_h[None, :]
        z = tl.zeros((BLOCK_N,), tl.float32)
        for h0 in range(0, H, BLOCK_H):
            mask = live[:, None] if EVEN_H else live[:, None] & (offs_h < H - h0)[None, :]
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
            z += tl.sum(x * w, axis=1)
            x_ptrs += BLOCK_H
            w_ptrs += BLOCK_H
        if HAS_BIAS:
            z += tl.load(b_ptr + targets, mask=live, other=0.0).to(tl.float32)
        return z

    @triton.jit
    def _scaled_logits(z, inv_temp, inv_softcap, softcap_over_temp, SOFTCAP: tl.constexpr,
                       INTERPRETED: tl.constexpr):
        """(s, tanh(z / cap)): s = cap·tanh(z / cap) / T, or z / T without a cap — multiplies only."""
        if SOFTCAP:
            th = fast_tanh(z * inv_softcap, INTERPRETED)
            s = th * softcap_over_temp
        else:
            th = z  # unused
            s = z * inv_temp
        return s, th

    @triton.jit
    def _forward_program(pid, N, n_split, group_tokens, BLOCK_N: tl.constexpr):
        """(token block, vocabulary span) of forward program `pid`.

        Groups of token blocks each sweep every span, the token block varying
        fastest. Programs resident together then share a span (each weight
        tile comes from HBM once and serves the whole group from L2) and cycle
        over the group's hidden rows only, which the host sizes to stay in L2.
        The LM head is thus read from HBM about once per group, not once per
        wave of programs as with the span varying fastest.
        """
        group = tl.maximum(group_tokens // BLOCK_N, 1)
        return grouped_coords(pid, tl.cdiv(N, BLOCK_N), n_split, group)

    @triton.jit(do_not_specialize=["arch"])
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
        span,  # vocabulary columns per span, a multiple of every candidate's BLOCK_V
        n_split,  # spans (SPLIT)
        group_tokens,  # tokens per program group (see below)
        inv_temp,
        inv_softcap,
        softcap_over_temp,
        arch,  # compute capability family: part of the autotune key only
        HAS_BIAS: tl.constexpr,
        SOFTCAP: tl.constexpr,
        ENTROPY: tl.constexpr,
        EVEN_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):
        pid_n, pid_s = _forward_program(tl.program_id(0), N, n_split, group_tokens, BLOCK_N)
        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # 64-bit: N·V and V·H offsets pass 2^31
        row_mask = rows < N
        tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)
        v_begin = pid_s.to(tl.int64) * span
        v_end = tl.minimum(v_begin + span, V)

        # finite start for the running max: (m − m_new) · l below must be 0, not −inf · 0
        m = tl.full((BLOCK_N,), -1.0e30, tl.float32)  # running max of s
        l = tl.zeros((BLOCK_N,), tl.float32)  # Σ e^{s − m}
        a = tl.zeros((BLOCK_N,), tl.float32)  # Σ e^{s − m} (s − m)
        t_s = tl.zeros((BLOCK_N,), tl.float32)
        # the target's column within the span, −1 outside it (a span is < 2^31 columns)
        t_span = tl.where((tgt >= v_begin) & (tgt < v_end), tgt - v_begin, -1).to(tl.int32)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < v_end
            z = _raw_logits_tile(
                x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_x, stride_w,
                HAS_BIAS, EVEN_H, BLOCK_N, BLOCK_V, BLOCK_H, INPUT_PRECISION, INTERPRETED,
            )
            s, _ = _scaled_logits(z, inv_temp, inv_softcap, softcap_over_temp, SOFTCAP, INTERPRETED)
            # masked columns (≥ V) hold s = −1e30: never picked, e^{s − m} = 0, and e·(s − m) = 0 (not 0·−inf)
            s = tl.where(col_mask[None, :], s, -1.0e30)
            # the target's column within the tile, in 32 bits: 64-bit compares per element crowd out the tile
            t_col = t_span - (v0 - v_begin).to(tl.int32)
            t_s += tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :] == t_col[:, None], s, 0.0), axis=1)
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile has a live column
            alpha = tl.exp(m - m_new)
            # one tile-sized value (s − m_new) live, not three: each reduction recomputes its exp
            d = s - m_new[:, None]
            if ENTROPY:
                # re-centre the old sum on m_new: Σ e^{s−m_new}(s−m_new) = α (a + (m − m_new) l)
                a = alpha * (a + (m - m_new) * l) + tl.sum(tl.exp(d) * d, axis=1)
            l = alpha * l + tl.sum(tl.exp(d), axis=1)
            m = m_new

        part = pid_s * N + rows
        tl.store(lse_part_ptr + part, m + tl.log(l), mask=row_mask)
        if ENTROPY:
            tl.store(ent_part_ptr + part, tl.log(l) - a / l, mask=row_mask)
        owns = row_mask & (t_span >= 0)
        tl.store(tgt_ptr + rows, t_s, mask=owns)

    @triton.jit(do_not_specialize=["arch"])
    def _linear_logprobs_dlogits_kernel(
        x_ptr,  # [N, H] hidden states
        w_ptr,  # [V, H] LM-head weight
        b_ptr,  # [V] bias (unread without HAS_BIAS)
        t_ptr,  # [N] int64 targets
        lse_ptr,  # [N] fp32 log-sum-exp from the forward
        g_ptr,  # [N] fp32 upstream gradient / T, 0 on ignored tokens
        dz_ptr,  # [N, >= v_hi − v_lo] dz for vocabulary columns [v_lo, v_hi), input dtype
        alive_ptr,  # [⌈N/FILTER_TILE⌉, ⌈chunk/FILTER_TILE⌉] int32 tile flags, zeroed (unread without FILTER)
        order_ptr,  # [V] int32 vocabulary ids by descending mean logit: column c is id order[c] (FILTER only)
        N,
        H,
        v_lo,
        v_hi,
        stride_x,
        stride_w,
        stride_dz,
        stride_alive,
        inv_temp,
        inv_softcap,
        softcap_over_temp,
        filter_eps,  # ε of the gradient filter
        arch,  # compute capability family: part of the autotune key only
        HAS_BIAS: tl.constexpr,
        SOFTCAP: tl.constexpr,
        EVEN_H: tl.constexpr,
        FILTER: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        GROUP_N: tl.constexpr,
        FILTER_TILE: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):
        # GROUP_N token blocks sweep the chunk's vocabulary blocks together, so
        # both the hidden rows and the weight rows are reused from L2.
        pid_n, pid_v = grouped_coords(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(v_hi - v_lo, BLOCK_V), GROUP_N)
        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = v_lo + pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_mask = rows < N
        col_mask = cols < v_hi
        if FILTER:  # columns in mean-logit order, so the probability mass shares tiles
            ids = tl.load(order_ptr + cols, mask=col_mask, other=0).to(tl.int64)
        else:
            ids = cols
        z = _raw_logits_tile(
            x_ptr, w_ptr, b_ptr, rows, ids, row_mask, col_mask, H, stride_x, stride_w,
            HAS_BIAS, EVEN_H, BLOCK_N, BLOCK_V, BLOCK_H, INPUT_PRECISION, INTERPRETED,
        )
        tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=float("inf"))  # padding rows: p = 0
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
        s, th = _scaled_logits(z, inv_temp, inv_softcap, softcap_over_temp, SOFTCAP, INTERPRETED)
        p = tl.exp(s - lse[:, None])
        dlogp = tl.where(ids[None, :] == tgt[:, None], 1.0, 0.0) - p  # ∂logp/∂s
        if SOFTCAP:
            dlogp = dlogp * (1.0 - th * th)  # ∂logp/∂z · T
        if FILTER:
            # the tile lives if any |∂logp/∂z|·T on a row that carries gradient reaches ε; the
            # flag's tile holds this program's, so programs sharing it only ever write 1
            size = tl.where((g != 0.0)[:, None] & col_mask[None, :], tl.abs(dlogp), 0.0)
            flag = (pid_n * BLOCK_N // FILTER_TILE) * stride_alive + pid_v * BLOCK_V // FILTER_TILE
            tl.store(alive_ptr + flag, 1, mask=tl.max(tl.max(size, axis=1), axis=0) >= filter_eps)
        dz = dlogp * g[:, None]
        if INTERPRETED:
            # the CPU interpreter truncates fp32 → bf16: round to nearest even, as the GPU does
            dz = cast_rtne(dz, dz_ptr.dtype.element_ty)
        dz_ptrs = dz_ptr + rows[:, None] * stride_dz + (cols - v_lo)[None, :]
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])

    # H rarely divides every candidate's BLOCK_H the same way: decide per launch
    _even_h = triton.heuristics({"EVEN_H": lambda args: args["H"] % args["BLOCK_H"] == 0})
    _fwd_kernel = _even_h(_linear_logprobs_fwd_kernel)
    _dlogits_kernel = _even_h(_linear_logprobs_dlogits_kernel)
    _AUTOTUNE_KEY = ["H", "HAS_BIAS", "SOFTCAP", "INPUT_PRECISION", "arch"]
    _fwd_tuned = tuning.autotuned(_fwd_kernel, tuning.LINEAR_FORWARD_TILES, key=["V", "ENTROPY"] + _AUTOTUNE_KEY,
                                  operand_of=lambda args: args["x_ptr"])
    # never N or anything sized from it (the dz chunk is): N changes every step
    _dlogits_tuned = tuning.autotuned(_dlogits_kernel, tuning.LINEAR_DLOGITS_TILES, key=_AUTOTUNE_KEY,
                                      operand_of=lambda args: args["x_ptr"])


# ----------------------------------------------------------------------------
# triton host launchers
# ----------------------------------------------------------------------------

# The CPU interpreter: few, large programs — its cost is per program and per op.
_INTERPRETER_TILES = tuning.Tiles(block_n=64, block_v=128, block_h=32, num_warps=4, num_stages=1)
# Hidden rows of one program group kept in L2 while the group sweeps the head: a third of the cache.
_GROUP_L2_SHARE = 3
# The dlogits kernel's group of token blocks (a chunk of the vocabulary is ~1/2 of L2 or less).
_DLOGITS_GROUP_N = 8


def _input_precision(dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """How the kernels' dots treat their operands.

    16-bit operands: Triton's default (bf16/fp16 tensor-core MMA, fp32
    accumulation). fp32 on CUDA: "tf32" when PyTorch allows TF32 matmuls,
    otherwise "tf32x3" — three TF32 products that recover about fp32
    precision on tensor cores. Plain "ieee" fp32 dots have no tensor cores and
    spill registers at these tiles; with TF32 off, `auto` sends fp32 to the
    chunked backend (cuBLAS SGEMM) instead, so only an explicit
    backend="triton" reaches tf32x3. The interpreter computes exact fp32.
    """
    if dtype != torch.float32:
        return None
    if device.type != "cuda":
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


@functools.lru_cache(maxsize=None)
def _device_facts(device_index: int) -> tuple[int, int, int]:
    """(SM count, L2 bytes, architecture family) of a CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    l2 = getattr(props, "L2_cache_size", 0) or 40 * 2**20
    return props.multi_processor_count, l2, tuning.arch_family(props.major, props.minor)


def _facts(device: torch.device) -> tuple[int, int, int]:
    if device.type != "cuda":
        return 1, 8 * 2**20, 0
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())


def _span_multiple(device: torch.device) -> int:
    """Spans must be whole numbers of tiles for every candidate the autotuner may pick."""
    if device.type != "cuda":
        return _INTERPRETER_TILES.block_v
    return max(t.block_v for group in tuning.LINEAR_FORWARD_TILES.values() for t in group)


def _split(n_tokens: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(spans, columns per span): the vocabulary is split so enough programs fill the GPU."""
    multiple = _span_multiple(device)
    units = triton.cdiv(vocab, multiple)
    if device.type == "cuda":
        # ~16 programs per SM (at 128-token blocks) keeps the tail of the last wave short
        target = 16 * _facts(device)[0]
        n_blocks = triton.cdiv(n_tokens, 128)
    else:
        target = 4  # interpreter: still ≥ 2 spans, so the merge is exercised
        n_blocks = triton.cdiv(n_tokens, _INTERPRETER_TILES.block_n)
    split = max(1, min(units, triton.cdiv(target, n_blocks)))
    units_per_split = triton.cdiv(units, split)
    split = triton.cdiv(units, units_per_split)  # no empty span
    return split, units_per_split * multiple


def _group_tokens(h: int, element_bytes: int, device: torch.device) -> int:
    """Tokens whose hidden rows take a third of L2: the forward's program group."""
    if device.type != "cuda":
        return 2 * _INTERPRETER_TILES.block_n  # several groups even at test sizes
    return max(1, _facts(device)[1] // _GROUP_L2_SHARE // (h * element_bytes))


def _launch_options(tiles: Optional[tuning.Tiles], device: torch.device) -> dict:
    """Tile constexprs and warps for a forced (or interpreter) configuration; {} lets the autotuner choose."""
    if tiles is None and device.type == "cuda":
        return {}
    tiles = tiles or _INTERPRETER_TILES
    return dict(tiles.constexprs(), num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _softcap_args(opts: _Options) -> tuple[float, float, float]:
    """(1/T, 1/cap, cap/T): the kernels multiply, never divide."""
    cap = opts.softcap or 1.0
    return 1.0 / opts.temperature, 1.0 / cap, cap / opts.temperature


def _forward_flags(dtype: torch.dtype, device: torch.device, has_bias: bool, opts: _Options) -> dict:
    return dict(
        HAS_BIAS=has_bias,
        SOFTCAP=opts.softcap is not None,
        ENTROPY=opts.entropy,
        INPUT_PRECISION=_input_precision(dtype, device),
        INTERPRETED=device.type != "cuda",
    )


def _triton_forward(hidden, weight, bias, targets, valid, opts: _Options, tiles: Optional[tuning.Tiles] = None):
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    split, span = _split(n, vocab, device)
    lse_part = torch.empty((split, n), dtype=torch.float32, device=device)
    ent_part = torch.empty((split, n), dtype=torch.float32, device=device) if opts.entropy else lse_part
    target_s = torch.zeros(n, dtype=torch.float32, device=device)
    options = _launch_options(tiles, device)
    kernel = _fwd_tuned if not options else _fwd_kernel
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * split,)](
        hidden, weight, bias if bias is not None else hidden, targets,
        lse_part, ent_part, target_s,
        n, vocab, h, hidden.stride(0), weight.stride(0), span, split,
        _group_tokens(h, hidden.element_size(), device), *_softcap_args(opts), _facts(device)[2],
        **_forward_flags(hidden.dtype, device, bias is not None, opts),
        **options,
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




def _triton_backward(hidden, weight, bias, targets, valid, lse, g, opts: _Options, needs,
                     tiles: Optional[tuning.Tiles] = None):
    need_h, need_w, need_b = needs
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    chunk = min(vocab, opts.chunk_size or _default_chunk(n, vocab, _TRITON_ELEMENTS))
    n_chunks = triton.cdiv(vocab, chunk)
    g_scaled = torch.where(valid, g.float(), torch.zeros_like(lse)) * (1.0 / opts.temperature)
    dz_buf = torch.empty((n, chunk), dtype=hidden.dtype, device=device)
    if need_h:
        # one chunk: the GEMM's own fp32 accumulation suffices; several: fp32 across chunks
        grad_h = torch.empty_like(hidden) if n_chunks == 1 else torch.zeros((n, h), dtype=torch.float32, device=device)
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    filtering = opts.filter_eps is not None
    if filtering:  # per chunk, which FILTER_TILE² tiles of dz take part in the two GEMMs
        alive = torch.empty((triton.cdiv(n, FILTER_TILE), triton.cdiv(chunk, FILTER_TILE)), dtype=torch.int32,
                            device=device)
        order = mean_logit_order(hidden, weight, bias)
        if need_h:  # the live-tile GEMM accumulates in fp32 even for one chunk
            grad_h = torch.zeros((n, h), dtype=torch.float32, device=device)
    options = _launch_options(tiles, device)
    kernel = _dlogits_tuned if not options else _dlogits_kernel
    flags = _forward_flags(hidden.dtype, device, bias is not None, opts)
    del flags["ENTROPY"]
    arch = _facts(device)[2]
    for v_lo in range(0, vocab, chunk):
        v_hi = min(vocab, v_lo + chunk)
        if filtering:
            alive.zero_()
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v_hi - v_lo, meta["BLOCK_V"]),)](
            hidden, weight, bias if bias is not None else hidden, targets, lse, g_scaled, dz_buf,
            alive if filtering else dz_buf, order if filtering else dz_buf,
            n, h, v_lo, v_hi, hidden.stride(0), weight.stride(0), dz_buf.stride(0),
            alive.stride(0) if filtering else 0,
            *_softcap_args(opts), opts.filter_eps or 0.0, arch,
            GROUP_N=_DLOGITS_GROUP_N, FILTER=filtering, FILTER_TILE=FILTER_TILE,
            **flags,
            **options,
        )
        dz = dz_buf[:, : v_hi - v_lo]  # [N, c], row stride `chunk`: cuBLAS takes it as is
        if filtering:  # dz's columns are the ids order[v_lo:v_hi]
            ids = order[v_lo:v_hi]
            if need_w:
                live_dz_t_x(dz, hidden, alive, ids, grad_w, arch, _live_tiles(tiles, device))
            if need_h:
                live_dz_w(dz, weight, alive, ids, grad_h, arch, _live_tiles(tiles, device))
            if need_b:  # the bias gradient stays exact: a column sum is cheap next to the GEMMs
                grad_b[ids.long()] = dz.sum(0, dtype=torch.float32).to(grad_b.dtype)
            _count_live_tiles(alive, n, v_hi - v_lo)
            continue
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


def mean_logit_order(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Vocabulary ids [V] (int32) by descending mean logit over the tokens, W·h̄ + b: the filtered
    backward's column order (CCE's), which gathers each row's probability mass into fewer tiles.
    One matrix-vector product: the mean of the logits is the logit of the mean hidden state."""
    mean_logit = torch.mv(weight, hidden.float().mean(0).to(weight.dtype)).float()
    if bias is not None:
        mean_logit += bias.float()
    return torch.argsort(mean_logit, descending=True).to(torch.int32)


def _live_tiles(tiles: Optional[tuning.Tiles], device: torch.device) -> Optional[tuning.Tiles]:
    """A forced dlogits configuration (benchmarks, tests) leaves the live-tile GEMMs to their own tuning."""
    return None if device.type == "cuda" else live_tile_grads.INTERPRETER_TILES


# ----------------------------------------------------------------------------
# how many tiles the gradient filter kept
# ----------------------------------------------------------------------------

_live_tile_counts: list = []


class TileSurvival:
    """Counts of the tiles the gradient filter kept, over the backward passes run inside
    `recording_tile_survival()`; `fraction` syncs once, when read."""

    def __init__(self):
        self.counts: list[tuple[torch.Tensor, int]] = []

    @property
    def fraction(self) -> float:
        if not self.counts:
            raise ValueError("no filtered backward ran while recording")
        return sum(int(live) for live, _ in self.counts) / sum(total for _, total in self.counts)


@contextmanager
def recording_tile_survival():
    """Record the share of dz tiles that survive the gradient filter (benchmarks and tests)."""
    record = TileSurvival()
    _live_tile_counts.append(record)
    try:
        yield record
    finally:
        _live_tile_counts.remove(record)


def _count_live_tiles(alive: torch.Tensor, n: int, columns: int) -> None:
    if not _live_tile_counts:  # not recording: no reduction, no sync
        return
    rows, cols = triton.cdiv(n, FILTER_TILE), triton.cdiv(columns, FILTER_TILE)
    _live_tile_counts[-1].counts.append((alive[:rows, :cols].sum(), rows * cols))


# ----------------------------------------------------------------------------
# every CUDA launch, for the compile check
# ----------------------------------------------------------------------------

# (operand dtype, its width, the dot's input precision) of every CUDA dispatch
_CUDA_OPERANDS = (("bf16", 2, None), ("fp16", 2, None), ("fp32", 4, "tf32"), ("fp32", 4, "tf32x3"))


def cuda_launches(arch: int):
    """Every launch the CUDA dispatch of this op can make on architecture family `arch`.

    Built from the autotune candidates (`tuning.LINEAR_*_TILES`) and the same
    flag and precision choices the launchers make; the representative subset
    is each candidate at the heaviest flags plus the lightest flags once.
    """
    if triton is None:
        return
    kernels = (
        (_linear_logprobs_fwd_kernel, tuning.LINEAR_FORWARD_TILES, ("HAS_BIAS", "SOFTCAP", "ENTROPY", "EVEN_H")),
        (_linear_logprobs_dlogits_kernel, tuning.LINEAR_DLOGITS_TILES, ("HAS_BIAS", "SOFTCAP", "EVEN_H", "FILTER")),
    )
    for kernel, table, flag_names in kernels:
        for dtype, width, precision in _CUDA_OPERANDS:
            for rank, tiles in enumerate(tuning.candidates(table, arch, tuning.operand_kind(width, precision))):
                for flags in itertools.product((True, False), repeat=len(flag_names)):
                    flag = dict(zip(flag_names, flags))
                    if flag.get("FILTER") and width == 4:  # fp32 is never filtered (`_filter_eps`)
                        continue
                    bias_dtypes = (dtype, "fp32") if flag["HAS_BIAS"] and dtype != "fp32" else (dtype,)
                    for bias_dtype in bias_dtypes:
                        heavy = all(v for k, v in flag.items()
                                    if k != "EVEN_H" and not (k == "FILTER" and width == 4)) and bias_dtype == dtype
                        representative = (heavy and (rank == 0 or not flag["EVEN_H"])
                                          or not any(flags) and rank == 0 and dtype == "bf16")
                        types = {name: f"*{dtype}" for name in ("x_ptr", "w_ptr", "dz_ptr")}
                        types.update(b_ptr=f"*{bias_dtype}", t_ptr="*i64", lse_part_ptr="*fp32",
                                     ent_part_ptr="*fp32", tgt_ptr="*fp32", lse_ptr="*fp32", g_ptr="*fp32",
                                     alive_ptr="*i32", order_ptr="*i32", inv_temp="fp32", inv_softcap="fp32",
                                     softcap_over_temp="fp32", filter_eps="fp32")
                        signature = tuning.runtime_signature(kernel, types)
                        # pointers come 16-byte aligned; H (ragged or not: CUDA launches need
                        # H % 16 == 0), V, strides and spans are multiples of 16
                        aligned = {name for name, kind in signature.items() if kind.startswith("*")}
                        aligned |= {"H", "V", "stride_x", "stride_w", "span", "v_lo", "stride_dz"} & set(signature)
                        constexprs = dict(flag, **tiles.constexprs(), INPUT_PRECISION=precision, INTERPRETED=False)
                        if "GROUP_N" in kernel.arg_names:
                            constexprs.update(GROUP_N=_DLOGITS_GROUP_N, FILTER_TILE=FILTER_TILE)
                        label = (f"{dtype}{'/' + precision if precision else ''} {tiles} "
                                 + " ".join(k.lower() for k, v in flag.items() if v)
                                 + (f" bias:{bias_dtype}" if bias_dtype != dtype else ""))
                        yield tuning.Launch(
                            kernel=kernel, label=label.strip(), signature=signature, constexprs=constexprs,
                            num_warps=tiles.num_warps, num_stages=tiles.num_stages, aligned=frozenset(aligned),
                            tensor_cores=True, representative=representative,
                        )


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


# Off by measurement: on a trained model's head (SmolLM2-135M-Instruct) 96% of the 128×128 tiles
# of |softmax − onehot| reach bf16's ε (89% in mean-logit order), and the honest inputs of
# `benchmarks/lm_head_inputs.py` keep 98%, so the filter can skip at most a few % of the GEMMs
# while making the gradient inexact; it pays on near-uniform softmaxes (random weights keep 8%).
FILTER_BY_DEFAULT = False


def _filter_eps(filter: Optional[bool], filter_eps: Optional[float], dtype: torch.dtype, backend: str):
    """ε of the gradient filter, or None for the exact backward."""
    if filter_eps is not None and not filter_eps > 0:
        raise ValueError(f"filter_eps must be > 0, got {filter_eps}")
    if filter is None:
        filter = FILTER_BY_DEFAULT
    if not filter or backend != "triton" or dtype == torch.float32:
        return None
    return float(filter_eps) if filter_eps is not None else torch.finfo(dtype).eps / 32


def resolve_linear_backend(backend: str, hidden: torch.Tensor) -> str:
    """The concrete backend for the LM-head op: as `resolve_backend`, except that on CUDA `auto`
    keeps on `chunked` (cuBLAS GEMMs)
    * fp32 with TF32 matmuls off (PyTorch's default): cuBLAS SGEMM is exact fp32, as the caller
      asked, where Triton would run 3-pass TF32 dots;
    * H not a multiple of 16 (no production model): rows are not 16-byte aligned, so the
      kernels' asynchronous copies cannot be used."""
    if backend == "auto" and hidden.is_cuda and (
            hidden.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
            or hidden.shape[-1] % _CUDA_H_MULTIPLE):
        return "chunked"
    backend = resolve_backend(backend, hidden)
    if backend == "triton" and hidden.is_cuda and hidden.shape[-1] % _CUDA_H_MULTIPLE:
        raise ValueError(f"backend='triton' on CUDA needs H divisible by {_CUDA_H_MULTIPLE} (16-byte aligned rows "
                         f"for the tensor-core pipeline), got H = {hidden.shape[-1]}: use 'auto' or 'chunked'")
    return backend


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
    filter: Optional[bool] = None,
    filter_eps: Optional[float] = None,
):
    """Log-probs [N] (fp32) of `targets` under log_softmax(softcap(hidden·Wᵀ + b) / T).

    hidden [N, H], weight [V, H] (the LM head), targets [N] (int64; tokens
    equal to `ignore_index` get log-prob 0, entropy 0 and no gradient), bias
    [V] or None. softcap: Gemma-2's final_logit_softcapping, applied to the
    raw logits before the temperature. With `return_entropy` also returns the
    entropy [N] of the same distribution (detached), from the same pass.

    backend: "auto" (triton on CUDA, except fp32 with TF32 matmuls off, which
    takes chunked's cuBLAS SGEMMs; else chunked), "reference", "chunked",
    "triton" (fp32 on CUDA: tf32 dots when TF32 matmuls are allowed, else
    tf32x3). chunk_size: vocabulary columns per chunk for chunked/triton
    (default: sized from N so one [N, chunk] buffer stays bounded).
    Differentiable w.r.t. hidden, weight and bias.

    filter: the triton backward's gradient filter (16-bit inputs): a 128×128
    tile of dz whose every |∂logp/∂z|·T (on rows with a non-zero upstream
    gradient) is below filter_eps skips both gradient GEMMs; the error this
    can make is bounded in SPEC §8. filter_eps defaults to the dtype's
    machine epsilon / 32 (2⁻¹² for bf16, 2⁻¹⁵ for fp16, as CCE). None takes
    `FILTER_BY_DEFAULT`; False is the exact backward. fp32 inputs and the
    other backends always run exact (fp32's ε is below its GEMMs' rounding;
    dense GEMMs gain nothing from skipping).
    """
    _check_inputs(hidden, weight, targets, bias, temperature, softcap, chunk_size)
    backend = resolve_linear_backend(backend, hidden)
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
    if hidden.shape[0] == 0 and backend == "triton":  # no empty grid
        backend = "chunked"
    eps = _filter_eps(filter, filter_eps, hidden.dtype, backend)
    opts = _Options(float(temperature), softcap, int(ignore_index), bool(return_entropy), backend, chunk_size, eps)

    inputs = (hidden, weight) + ((bias,) if bias is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        logp, ent = LinearLogprobsFunction.apply(hidden, weight, bias, targets, opts)
    else:  # no graph, nothing saved: the forward GEMM only
        logp, ent, _ = _FORWARD[backend](hidden, weight, bias, targets, valid, opts)
    return (logp, ent) if return_entropy else logp
