"""Anchor EMA, in place: θ_anc ← θ_anc + η (θ − θ_anc) over a list of tensors (SPEC §5 step 8).

Why not a plain bf16 `lerp_`: at η = 0.01 the update η·(θ − θ_anc) is below half
a bf16 ulp of θ_anc for most weights, so round-to-nearest throws it away and the
anchor stalls (SPEC §8; `tests/kernels/test_ema.py` shows it). Two cures:

* **fp32 master state** (the default): the anchor's EMA state is a list of fp32
  tensors; the bf16 copy the anchor's forward pass reads is `shadow`, written
  from the updated fp32 value in the same pass (round-to-nearest-even, exactly
  `anchor.to(torch.bfloat16)`). Per parameter the fused op moves 12 bytes —
  fp32 anchor read + write, bf16 policy read, bf16 shadow write — the minimum
  for this job; `chunked` moves about twice that (an fp32 copy of the policy
  and a separate shadow copy).
* **stochastic rounding**, `stochastic_rounding=True`: the anchor itself is
  bf16 (no fp32 state, 6 bytes per parameter). The fp32 result is rounded to
  one of its two bf16 neighbours with probabilities that make the rounding
  unbiased: add 16 uniform random bits below the bf16 mantissa to the fp32 bit
  pattern, then truncate. The expected anchor follows the exact EMA; its noise
  is that of one bf16 rounding per step.

The update is `torch.lerp`'s formula in fp32, a + w·(p − a) for w < 0.5 and
p − (1 − w)·(p − a) otherwise, so η = 0 leaves the anchor as it is and η = 1
copies the policy exactly.

Backends (one signature, `fastbond/kernels/_backend.py`):

* `reference` — a per-tensor torch loop in fp32: the oracle.
* `chunked`   — `torch._foreach_lerp_` over groups of tensors of one dtype,
  with the fp32 copies of a low-precision policy made a bounded number of
  elements at a time (large tensors are split into flat slices): plain
  PyTorch, any device.
* `triton`    — multi-tensor apply: one launch per (dtype, alignment) group,
  usually one launch in all. A table holds each tensor's addresses and size,
  and a second table maps every program to (tensor, chunk); programs whose
  chunk is whole take an unmasked path, and where addresses are 16-byte
  aligned and sizes a multiple of one 16-byte vector (every weight matrix of
  a real model) the last, partial chunk is masked per vector, so loads and
  stores are 16 bytes wide everywhere (the tables are built once per set of
  tensors and cached by address). Small rolled blocks keep registers low
  and occupancy high: latency is hidden by many programs per SM.

ZeRO-3: the EMA is elementwise, so two identically partitioned models update
on their local shards with no communication — pass the flat local partitions
(single tensors are accepted as well as lists).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import torch

from fastbond.kernels._backend import resolve_backend

try:  # the module must import where triton is absent (macOS, Windows CI)
    import triton
    import triton.language as tl

    from fastbond.kernels._triton_common import cast_rtne
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

__all__ = ["ema_", "ema_reference", "ema_chunked", "ema_triton"]

TensorList = Sequence[torch.Tensor]

# fp32 temporaries of the chunked backend are bounded by this many elements (256 MB).
CHUNKED_MAX_ELEMENTS = 1 << 26


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


def _as_list(name: str, value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in value):
        return list(value)
    raise TypeError(f"ema_: {name} must be a tensor or a list of tensors, got {type(value).__name__}")


def _validate(
    anchor, policy, eta, shadow, stochastic_rounding: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None, float]:
    anchors = _as_list("anchor", anchor)
    policies = _as_list("policy", policy)
    shadows = None if shadow is None else _as_list("shadow", shadow)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"ema_: eta must be a Python number, got {type(eta).__name__}")
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:  # also rejects NaN
        raise ValueError(f"ema_: eta must lie in [0, 1], got {eta}")
    if len(policies) != len(anchors):
        raise ValueError(f"ema_: {len(anchors)} anchor tensors but {len(policies)} policy tensors")
    if shadows is not None:
        if stochastic_rounding:
            raise ValueError(
                "ema_: shadow is the low-precision copy of an fp32 anchor; "
                "with stochastic_rounding the bf16 anchor is that copy"
            )
        if len(shadows) != len(anchors):
            raise ValueError(f"ema_: {len(anchors)} anchor tensors but {len(shadows)} shadow tensors")
    anchor_dtype = torch.bfloat16 if stochastic_rounding else torch.float32
    device = anchors[0].device if anchors else None
    for i, (a, p) in enumerate(zip(anchors, policies)):
        if a.dtype != anchor_dtype:
            if stochastic_rounding:
                raise ValueError(f"ema_: stochastic_rounding needs a bfloat16 anchor, anchor[{i}] is {a.dtype}")
            raise ValueError(
                f"ema_: anchor[{i}] is {a.dtype}; the EMA state must be float32 (a low-precision EMA stalls "
                "at small eta, SPEC §8) -- or pass a bfloat16 anchor with stochastic_rounding=True"
            )
        if not p.is_floating_point():
            raise ValueError(f"ema_: policy[{i}] must be floating point, got {p.dtype}")
        if p.shape != a.shape:
            raise ValueError(f"ema_: anchor[{i}] {tuple(a.shape)} and policy[{i}] {tuple(p.shape)} differ in shape")
        tensors = [("anchor", a), ("policy", p)]
        if shadows is not None:
            s = shadows[i]
            if not s.is_floating_point():
                raise ValueError(f"ema_: shadow[{i}] must be floating point, got {s.dtype}")
            if s.shape != a.shape:
                raise ValueError(f"ema_: anchor[{i}] {tuple(a.shape)} and shadow[{i}] {tuple(s.shape)} differ in shape")
            tensors.append(("shadow", s))
        for name, t in tensors:
            if t.device != device:
                raise ValueError(
                    f"ema_: all tensors must be on one device, {name}[{i}] is on {t.device}, anchor[0] on {device}"
                )
    return anchors, policies, shadows, eta


def _resolve_seed(seed: int | None) -> int:
    """A 31-bit RNG key; drawn from torch's default CPU generator when not given (no device sync)."""
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    return int(seed) & 0x7FFFFFFF


# --------------------------------------------------------------------------- #
# Stochastic rounding in PyTorch (reference and chunked backends)
# --------------------------------------------------------------------------- #


def _stochastic_round_to_bf16_(out: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> None:
    """out (bf16) ← value (fp32) rounded up or down to a bf16 neighbour, unbiased.

    bf16 is the upper half of fp32. Adding a uniform 16-bit integer to the low
    half carries into the upper half with probability (low half)/2^16, i.e. the
    distance to the lower neighbour in units of the gap; truncating then yields
    the upper neighbour with exactly that probability. On the magnitude bits
    this holds for both signs. NaNs are passed through untouched (a carry could
    turn some NaN payloads into inf).
    """
    value = value.contiguous()
    bits = value.view(torch.int32)
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    rounded = (bits + noise).bitwise_and_(-65536).view(torch.float32)  # -65536 == 0xFFFF0000
    out.copy_(torch.where(torch.isnan(value), value, rounded))  # exact: low half is zero


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# --------------------------------------------------------------------------- #
# reference backend
# --------------------------------------------------------------------------- #


@torch.no_grad()
def ema_reference(anchors, policies, eta, shadows=None, stochastic_rounding=False, seed=None) -> None:
    """Per-tensor torch loop in fp32: the oracle the other backends are tested against."""
    generator = _generator(anchors[0].device, _resolve_seed(seed)) if stochastic_rounding and anchors else None
    for i, (a, p) in enumerate(zip(anchors, policies)):
        if stochastic_rounding:
            _stochastic_round_to_bf16_(a, torch.lerp(a.float(), p.float(), eta), generator)
        else:
            a.lerp_(p.float(), eta)
            if shadows is not None:
                shadows[i].copy_(a)


# --------------------------------------------------------------------------- #
# chunked backend
# --------------------------------------------------------------------------- #


def _split_large(triples, limit: int):
    """Yield (anchor, policy, shadow) triples, splitting contiguous tensors above `limit` elements into flat slices."""
    for a, p, s in triples:
        flat = a.is_contiguous() and p.is_contiguous() and (s is None or s.is_contiguous())
        if a.numel() <= limit or not flat:
            yield a, p, s
            continue
        a, p = a.view(-1), p.view(-1)
        s = None if s is None else s.view(-1)
        for start in range(0, a.numel(), limit):
            stop = start + limit
            yield a[start:stop], p[start:stop], (None if s is None else s[start:stop])


def _batches(triples, limit: int):
    """Group triples into lists whose element count stays near `limit` (the fp32 temporaries' budget)."""
    batch, count = [], 0
    for triple in _split_large(triples, limit):
        if batch and count + triple[0].numel() > limit:
            yield batch
            batch, count = [], 0
        batch.append(triple)
        count += triple[0].numel()
    if batch:
        yield batch


@torch.no_grad()
def ema_chunked(anchors, policies, eta, shadows=None, stochastic_rounding=False, seed=None) -> None:
    """`torch._foreach_lerp_` over same-dtype groups; fp32 copies of low-precision inputs made in bounded batches."""
    groups: dict[tuple, list] = {}
    for i, (a, p) in enumerate(zip(anchors, policies)):
        if a.numel() == 0:
            continue
        s = None if shadows is None else shadows[i]
        key = (p.dtype, None if s is None else s.dtype)
        groups.setdefault(key, []).append((a, p, s))
    generator = _generator(anchors[0].device, _resolve_seed(seed)) if stochastic_rounding and anchors else None

    for (policy_dtype, shadow_dtype), triples in groups.items():
        if not stochastic_rounding and policy_dtype == torch.float32:
            # Nothing to convert: one foreach call over the whole group, no temporaries.
            anc = [t[0] for t in triples]
            torch._foreach_lerp_(anc, [t[1] for t in triples], eta)
            if shadow_dtype is not None:
                torch._foreach_copy_([t[2] for t in triples], anc)
            continue
        for batch in _batches(triples, CHUNKED_MAX_ELEMENTS):
            anc = [t[0] for t in batch]
            pol = [t[1] if t[1].dtype == torch.float32 else t[1].float() for t in batch]
            if stochastic_rounding:
                state = [a.float() for a in anc]
                torch._foreach_lerp_(state, pol, eta)
                for a, x in zip(anc, state):
                    _stochastic_round_to_bf16_(a, x, generator)
            else:
                torch._foreach_lerp_(anc, pol, eta)
                if shadow_dtype is not None:
                    torch._foreach_copy_([t[2] for t in batch], anc)


# --------------------------------------------------------------------------- #
# triton backend
# --------------------------------------------------------------------------- #

if triton is not None:
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def _ema_block(
        anchor_ptr,   # *ANCHOR_DTYPE  start of this tensor
        policy_ptr,   # *POLICY_DTYPE
        shadow_ptr,   # *SHADOW_DTYPE  (never read unless HAS_SHADOW)
        offs,         # [BLOCK] int64  element offsets inside the tensor
        numel,        # int64
        eta,          # fp32
        rng_key,      # int64 philox key of this program
        rng_offs,     # [BLOCK] int32 counters, unique inside the program
        ANCHOR_DTYPE: tl.constexpr,
        SHADOW_DTYPE: tl.constexpr,
        MASKED: tl.constexpr,
        HAS_SHADOW: tl.constexpr,
        STOCHASTIC_ROUNDING: tl.constexpr,
    ):
        if MASKED:
            mask = offs < numel
            a = tl.load(anchor_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.load(policy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            a = tl.load(anchor_ptr + offs).to(tl.float32)
            p = tl.load(policy_ptr + offs).to(tl.float32)
        # torch.lerp's two-sided formula: exact at eta = 0 and eta = 1.
        diff = p - a
        out = tl.where(eta < 0.5, a + eta * diff, p - diff * (1.0 - eta))
        if STOCHASTIC_ROUNDING:
            # Add 16 random bits below the bf16 mantissa, truncate: an unbiased rounding.
            noise = tl.randint(rng_key, rng_offs) & 0xFFFF
            bits = out.to(tl.uint32, bitcast=True)
            bits = ((bits + noise) >> 16) << 16
            rounded = bits.to(tl.float32, bitcast=True)
            out = tl.where(out != out, out, rounded)  # keep NaN payloads NaN
        if STOCHASTIC_ROUNDING:
            new_anchor = out.to(ANCHOR_DTYPE)  # exact: the low 16 bits are zero
        else:
            new_anchor = out  # fp32 state
        if HAS_SHADOW:
            new_shadow = cast_rtne(out, SHADOW_DTYPE)
        if MASKED:
            tl.store(anchor_ptr + offs, new_anchor, mask=mask)
            if HAS_SHADOW:
                tl.store(shadow_ptr + offs, new_shadow, mask=mask)
        else:
            tl.store(anchor_ptr + offs, new_anchor)
            if HAS_SHADOW:
                tl.store(shadow_ptr + offs, new_shadow)

    @triton.jit(do_not_specialize=["seed", "program_base"])
    def _ema_kernel(
        table_ptr,   # [G, 4] int64: anchor address, policy address, shadow address (0 if none), numel
        chunks_ptr,  # [C, 2] int32: (tensor, chunk index inside it) of each program
        eta,               # fp32 scalar
        seed,              # int32 RNG seed of this launch (stochastic rounding only)
        program_base,      # int32: programs of earlier launches in this call, so RNG keys never repeat
        ANCHOR_DTYPE: tl.constexpr,
        POLICY_DTYPE: tl.constexpr,
        SHADOW_DTYPE: tl.constexpr,
        HAS_SHADOW: tl.constexpr,
        STOCHASTIC_ROUNDING: tl.constexpr,
        ALIGNED: tl.constexpr,  # 16-byte aligned addresses and numel a multiple of VECTOR: vector loads everywhere
        BLOCK: tl.constexpr,
        CHUNK: tl.constexpr,    # elements per program, a multiple of BLOCK
        VECTOR: tl.constexpr,   # elements of one 16-byte access of the narrowest dtype
    ):
        pid = tl.program_id(0)
        tensor = tl.load(chunks_ptr + 2 * pid).to(tl.int64)
        # chunk index × constexpr CHUNK: the compiler then knows offsets are multiples of CHUNK.
        start = tl.load(chunks_ptr + 2 * pid + 1).to(tl.int64) * CHUNK
        row = table_ptr + tensor * 4
        anchor_ptr = tl.load(row).to(tl.pointer_type(ANCHOR_DTYPE))
        policy_ptr = tl.load(row + 1).to(tl.pointer_type(POLICY_DTYPE))
        shadow_ptr = tl.load(row + 2).to(tl.pointer_type(SHADOW_DTYPE))
        numel = tl.load(row + 3)
        if ALIGNED:
            # Addresses and sizes come from a table, so the compiler cannot see their alignment:
            # say it. With numel a multiple of VECTOR, the tail's mask is constant over each
            # vector, so the last chunk of a tensor is read and written in vectors too.
            anchor_ptr = tl.multiple_of(anchor_ptr, 16)
            policy_ptr = tl.multiple_of(policy_ptr, 16)
            shadow_ptr = tl.multiple_of(shadow_ptr, 16)
            numel = tl.multiple_of(numel, VECTOR)
        # Philox key = (global program id, seed): distinct for every chunk of every launch and step.
        rng_key = ((pid.to(tl.int64) + program_base) << 32) + seed
        lane = tl.arange(0, BLOCK)
        # A rolled loop over small blocks: few registers a thread, so many programs fit on an
        # SM and keep enough loads in flight (occupancy, not unrolling, hides the latency).
        if start + CHUNK <= numel:
            for i in range(0, CHUNK, BLOCK):  # whole chunk: no mask
                _ema_block(anchor_ptr, policy_ptr, shadow_ptr, start + i + lane, numel, eta, rng_key, i + lane,
                           ANCHOR_DTYPE, SHADOW_DTYPE, False, HAS_SHADOW, STOCHASTIC_ROUNDING)
        else:
            for i in range(0, CHUNK, BLOCK):
                _ema_block(anchor_ptr, policy_ptr, shadow_ptr, start + i + lane, numel, eta, rng_key, i + lane,
                           ANCHOR_DTYPE, SHADOW_DTYPE, True, HAS_SHADOW, STOCHASTIC_ROUNDING)


# One configuration for every GPU: the op is bandwidth-bound and each program
# streams CHUNK elements in blocks of BLOCK (8 a thread at 4 warps: one or two
# 16-byte vectors per operand). Checked for registers and vector width by the
# compile check (`cuda_launches`).
_CUDA_LAUNCH = {"BLOCK": 1024, "CHUNK": 8192, "num_warps": 4}
_INTERPRETER_LAUNCH = {"BLOCK": 128, "CHUNK": 256, "num_warps": 4}  # small: tests stay fast and multi-chunk


def _launch_config(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, num_warps) for tensors on `device`."""
    config = _CUDA_LAUNCH if device.type == "cuda" else _INTERPRETER_LAUNCH
    return config["BLOCK"], config["CHUNK"], config["num_warps"]


def _vector(*dtypes: torch.dtype) -> int:
    """Elements in 16 bytes of the narrowest dtype."""
    return 16 // min(d.itemsize for d in dtypes)


_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 16


def _tables(triples, chunk: int, device: torch.device):
    """Device tables for one launch, cached by (addresses, sizes): a trainer passes the same tensors every step."""
    rows = tuple((a.data_ptr(), p.data_ptr(), 0 if s is None else s.data_ptr(), a.numel()) for a, p, s in triples)
    key = (device, chunk, rows)
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    numels = torch.tensor([r[3] for r in rows], dtype=torch.int64)
    per_tensor = (numels + chunk - 1) // chunk
    n_chunks = int(per_tensor.sum())
    if n_chunks >= 2**31:
        raise ValueError(f"ema_: {n_chunks} chunks exceed one launch's grid; use a larger CHUNK")
    first_chunk = torch.cumsum(per_tensor, 0) - per_tensor
    chunks = torch.empty(n_chunks, 2, dtype=torch.int32)
    chunks[:, 0] = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), per_tensor)
    chunks[:, 1] = torch.arange(n_chunks, dtype=torch.int64) - first_chunk.repeat_interleave(per_tensor)
    hit = (torch.tensor(rows, dtype=torch.int64).to(device), chunks.to(device), n_chunks)
    _TABLE_CACHE[key] = hit
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return hit


@torch.no_grad()
def ema_triton(anchors, policies, eta, shadows=None, stochastic_rounding=False, seed=None) -> None:
    """Multi-tensor apply: one launch per (dtype, alignment) group of contiguous tensors."""
    if not anchors:
        return
    device = anchors[0].device
    block, chunk, num_warps = _launch_config(device)
    groups: dict[tuple, list] = {}
    fallback = []  # the kernel addresses tensors linearly; the rare strided (or fp64) one goes through torch
    for i, (a, p) in enumerate(zip(anchors, policies)):
        if a.numel() == 0:
            continue
        s = None if shadows is None else shadows[i]
        contiguous = a.is_contiguous() and p.is_contiguous() and (s is None or s.is_contiguous())
        if not contiguous or p.dtype not in _TL_DTYPES or (s is not None and s.dtype not in _TL_DTYPES):
            fallback.append((a, p, s))
            continue
        vector = _vector(*(t.dtype for t in (a, p, s) if t is not None))
        aligned = all(t.data_ptr() % 16 == 0 for t in (a, p, s) if t is not None) and a.numel() % vector == 0
        key = (p.dtype, None if s is None else s.dtype, aligned)
        groups.setdefault(key, []).append((a, p, s))
    seed = _resolve_seed(seed) if stochastic_rounding else 0
    program_base = 0
    for (policy_dtype, shadow_dtype, aligned), triples in groups.items():
        table, chunks, n_chunks = _tables(triples, chunk, device)
        _ema_kernel[(n_chunks,)](
            table, chunks, eta, seed, program_base,
            ANCHOR_DTYPE=_TL_DTYPES[anchors[0].dtype],
            POLICY_DTYPE=_TL_DTYPES[policy_dtype],
            SHADOW_DTYPE=_TL_DTYPES[shadow_dtype or torch.float32],
            HAS_SHADOW=shadow_dtype is not None,
            STOCHASTIC_ROUNDING=stochastic_rounding,
            ALIGNED=aligned,
            BLOCK=block,
            CHUNK=chunk,
            VECTOR=_vector(anchors[0].dtype, policy_dtype, shadow_dtype or policy_dtype),
            num_warps=num_warps,
        )
        program_base = (program_base + n_chunks) & 0x7FFFFFFF
    if fallback:
        ema_chunked([t[0] for t in fallback], [t[1] for t in fallback], eta,
                    None if shadows is None else [t[2] for t in fallback], stochastic_rounding,
                    None if not stochastic_rounding else seed + 1)


def _vectors_per_thread(dtype: torch.dtype) -> int:
    """16-byte accesses a thread makes to one operand per block, at the CUDA launch configuration."""
    elements = _CUDA_LAUNCH["BLOCK"] // (32 * _CUDA_LAUNCH["num_warps"])
    return max(1, elements * dtype.itemsize // 16)


def cuda_launches(arch: int):
    """Every launch the CUDA dispatch of `ema_triton` can make (the compile check's list)."""
    if triton is None:
        return
    from fastbond.kernels.tuning import Launch, runtime_signature

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    variants = [(torch.float32, p, s, False) for p in names for s in (None, torch.bfloat16, torch.float16)]
    variants += [(torch.bfloat16, p, None, True) for p in names]  # stochastic rounding: a bf16 anchor
    signature = runtime_signature(_ema_kernel, {"table_ptr": "*i64", "chunks_ptr": "*i32", "eta": "fp32"})
    for (anchor, policy, shadow, rounding), aligned in itertools.product(variants, (True, False)):
        dtypes = [d for d in (anchor, policy, shadow) if d is not None]
        label = f"anchor:{names[anchor]} policy:{names[policy]}" + (f" shadow:{names[shadow]}" if shadow else "")
        yield Launch(
            kernel=_ema_kernel, label=label + (" stochastic" if rounding else "") + (" aligned" if aligned else ""),
            signature=signature,
            constexprs=dict(ANCHOR_DTYPE=_TL_DTYPES[anchor], POLICY_DTYPE=_TL_DTYPES[policy],
                            SHADOW_DTYPE=_TL_DTYPES[shadow or torch.float32], HAS_SHADOW=shadow is not None,
                            STOCHASTIC_ROUNDING=rounding, ALIGNED=aligned, BLOCK=_CUDA_LAUNCH["BLOCK"],
                            CHUNK=_CUDA_LAUNCH["CHUNK"], VECTOR=_vector(*dtypes)),
            num_warps=_CUDA_LAUNCH["num_warps"], num_stages=3, aligned=frozenset({"table_ptr", "chunks_ptr"}),
            # aligned: the anchor's and the policy's loads are 16-byte vectors in the whole-chunk
            # path and in the tail alike
            min_vector_loads=2 * (_vectors_per_thread(anchor) + _vectors_per_thread(policy)) if aligned else 0,
            representative=True,
        )


# --------------------------------------------------------------------------- #
# Public entry point
# --------------------------------------------------------------------------- #

_BACKENDS = {"reference": ema_reference, "chunked": ema_chunked, "triton": ema_triton}


def ema_(
    anchor: torch.Tensor | TensorList,
    policy: torch.Tensor | TensorList,
    eta: float,
    *,
    backend: str = "auto",
    shadow: torch.Tensor | TensorList | None = None,
    stochastic_rounding: bool = False,
    seed: int | None = None,
):
    """In place, for every i: anchor[i] ← anchor[i] + η·(policy[i] − anchor[i]), in fp32.

    Args:
        anchor: fp32 tensor or list of fp32 tensors, the anchor's EMA state
            (bf16 with `stochastic_rounding`). Updated in place.
        policy: tensors of the same shapes (fp32, bf16 or fp16), the policy's
            parameters after the optimizer step.
        eta:    EMA rate in [0, 1]; 0 leaves the anchor, 1 copies the policy.
        backend: "auto" (triton on CUDA, chunked elsewhere), "reference",
            "chunked" or "triton".
        shadow: optional low-precision tensors (e.g. the bf16 weights of the
            anchor model) written with the updated fp32 state, round-to-nearest.
        stochastic_rounding: the anchor is bf16 and is rounded stochastically,
            which keeps it unbiased without fp32 state.
        seed:   RNG seed for stochastic rounding; None draws one from torch's
            default generator. Pass a different seed every step.
    Returns:
        `anchor`, updated.
    """
    anchors, policies, shadows, eta = _validate(anchor, policy, eta, shadow, stochastic_rounding)
    if not anchors:
        return anchor
    resolved = resolve_backend(backend, anchors[0])
    _BACKENDS[resolved](anchors, policies, eta, shadows, stochastic_rounding, seed)
    return anchor

