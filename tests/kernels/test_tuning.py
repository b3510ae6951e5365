"""The CUDA dispatch's choices, checked without a GPU.

* every autotune candidate of the LM-head kernels computes the right thing
  (forced, one at a time, through Triton's CPU interpreter);
* the forward's program order reads the LM head about once per group of
  token blocks (the real `grouped_coords`, run by the interpreter, replayed
  wave by wave at a Gemma-2B shape on a 132-SM GPU);
* tf32x3, the precision fp32 takes on the Triton path with TF32 matmuls
  off, is about as accurate as an fp32 GEMM (emulated in PyTorch: the
  interpreter computes plain fp32);
* the candidate lists and the autotuner's pruning agree with the compile
  check's shared-memory limits.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastbond.kernels import tuning
from fastbond.kernels._backend import triton_available, triton_interpreted

from test_linear_logprobs import assert_within, make_case, truth_of

op = importlib.import_module("fastbond.kernels.linear_logprobs")
INTERPRETER = triton_available() and triton_interpreted() and not torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="runs the kernels under TRITON_INTERPRET=1 on CPU")

EVERY_TILES = sorted(
    {t for table in (tuning.LINEAR_FORWARD_TILES, tuning.LINEAR_DLOGITS_TILES) for group in table.values()
     for t in group},
    key=str,
)


# ----------------------------------------------------------------------------
# every candidate is correct
# ----------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("tiles", EVERY_TILES, ids=str)
def test_every_candidate_matches_the_oracle(tiles):
    """Forward (log-probs, entropy) and backward at each candidate's tiles; H = 72 is ragged for every BLOCK_H."""
    case = make_case(n=70, h=72, v=300, dtype=torch.bfloat16, bias=True)
    opts = op._Options(temperature=0.7, softcap=20.0, ignore_index=-100, entropy=True, backend="triton",
                       chunk_size=None)
    hidden, weight, bias, targets = case["hidden"], case["weight"], case["bias"], case["targets"]
    valid = targets != -100
    logp, ent, lse = op._triton_forward(hidden, weight, bias, targets, valid, opts, tiles=tiles)
    grads = op._triton_backward(hidden, weight, bias, targets, valid, lse, case["grad_out"], opts,
                                (True, True, True), tiles=tiles)
    truth_logp, truth_ent, truth_grads = truth_of(case, temperature=0.7, softcap=20.0)
    chunked_logp, chunked_ent, chunked_lse = op._chunked_forward(hidden, weight, bias, targets, valid, opts)
    chunked_grads = op._chunked_backward(hidden, weight, bias, targets, valid, chunked_lse, case["grad_out"],
                                         opts, (True, True, True))
    # the chunked backend computes in fp32 from the same bf16 inputs: the kernels must agree with it
    # to fp32 rounding, and both with the fp64 oracle
    torch.testing.assert_close(logp, chunked_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, chunked_ent, rtol=1e-5, atol=1e-5)
    assert_within("logp", logp, truth_logp.double(), chunked_logp, torch.float32, rtol=1e-5)
    assert_within("entropy", ent, truth_ent.double(), chunked_ent, torch.float32, rtol=1e-5)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, chunked_grads):
        assert_within(f"grad_{name}", got.float(), truth_grads[name].double(), want, torch.bfloat16)


class _FakeProps:
    major, minor, multi_processor_count = 9, 0, 132
    shared_memory_per_block_optin = tuning.SHARED_MEMORY_PER_BLOCK[90]


@needs_interpreter
def test_the_autotuned_launch_prunes_to_the_family_and_picks_the_fastest(monkeypatch):
    """The CUDA launch path (autotuner, pruning, grid from the chosen tiles), run by the interpreter.

    Timings are made up (the interpreter has no clock worth reading): the
    last candidate of the family is declared fastest, and the result must
    be that candidate's, correct, and tuned once per key.
    """
    family = tuning.candidates(tuning.LINEAR_FORWARD_TILES, 90, "16-bit")
    timed = []

    def fake_bench(call, quantiles):
        call()  # a candidate must run (and be idempotent) before it can be chosen
        timed.append(len(timed))
        rank = len(timed) - 1
        return [float(len(family) - rank)] * 3  # later candidates are faster

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _FakeProps())
    tuned = tuning.autotuned(op._fwd_kernel, tuning.LINEAR_FORWARD_TILES, key=["V", "ENTROPY"] + op._AUTOTUNE_KEY,
                             operand_of=lambda args: args["x_ptr"], do_bench=fake_bench)
    monkeypatch.setattr(op, "_fwd_tuned", tuned)
    monkeypatch.setattr(op, "_launch_options", lambda tiles, device: {})  # the CUDA path: let the tuner choose

    case = make_case(n=70, h=72, v=300, dtype=torch.bfloat16)
    opts = op._Options(temperature=1.0, softcap=None, ignore_index=-100, entropy=True, backend="triton",
                       chunk_size=None)
    valid = case["targets"] != -100
    args = (case["hidden"], case["weight"], None, case["targets"], valid, opts)
    logp, ent, _ = op._triton_forward(*args)
    assert len(timed) == len(family)  # pruned to sm_90's 16-bit candidates: none from other lists
    best = tuned.cache[next(iter(tuned.cache))]
    assert (best.kwargs["BLOCK_N"], best.kwargs["BLOCK_V"], best.kwargs["BLOCK_H"], best.num_warps,
            best.num_stages) == tuple(vars(family[-1]).values())
    want_logp, want_ent, _ = op._chunked_forward(*args)
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)

    op._triton_forward(*args)  # same key (N differs or not): no second tuning
    short = make_case(n=33, h=72, v=300, dtype=torch.bfloat16)
    op._triton_forward(short["hidden"], short["weight"], None, short["targets"], short["targets"] != -100, opts)
    assert len(timed) == len(family)

    monkeypatch.setenv("FASTBOND_AUTOTUNE", "0")
    untuned = tuning.autotuned(op._fwd_kernel, tuning.LINEAR_FORWARD_TILES, key=["V"] + op._AUTOTUNE_KEY,
                               operand_of=lambda args: args["x_ptr"], do_bench=fake_bench)
    monkeypatch.setattr(op, "_fwd_tuned", untuned)
    op._triton_forward(*args)
    assert len(timed) == len(family)  # one candidate left: nothing timed, the list's first entry runs
    first = untuned.cache[next(iter(untuned.cache))]
    assert first.kwargs["BLOCK_N"] == family[0].block_n and first.num_warps == family[0].num_warps


@needs_interpreter
def test_autotune_keys_hold_no_size_that_changes_with_the_number_of_tokens():
    """N (and the dz chunk, sized from N) changes every step: a key holding it would re-tune every step."""
    allowed = {"H", "V", "HAS_BIAS", "SOFTCAP", "ENTROPY", "INPUT_PRECISION", "arch"}
    for tuned in (op._fwd_tuned, op._dlogits_tuned):
        assert set(tuned.keys) <= allowed, tuned.keys
        assert {"H", "arch", "INPUT_PRECISION"} <= set(tuned.keys)


# ----------------------------------------------------------------------------
# program order: the LM head is read about once per group
# ----------------------------------------------------------------------------

if INTERPRETER:
    import triton
    import triton.language as tl

    @triton.jit
    def _order_kernel(out_ptr, N, n_split, group_tokens, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        block, span = op._forward_program(pid, N, n_split, group_tokens, BLOCK_N)
        tl.store(out_ptr + 2 * pid, block)
        tl.store(out_ptr + 2 * pid + 1, span)


def forward_order(n: int, split: int, group_tokens: int, block_n: int) -> torch.Tensor:
    """[programs, 2]: (token block, span) of each forward program, in launch order, from the kernel's own code."""
    programs = triton.cdiv(n, block_n) * split
    out = torch.empty(programs, 2, dtype=torch.int32)
    _order_kernel[(programs,)](out, n, split, group_tokens, BLOCK_N=block_n)
    return out


def head_reads(order: torch.Tensor, resident: int) -> float:
    """Passes over the LM head from HBM when `resident` consecutive programs run at once.

    Programs running together on one span share its weight tiles through L2;
    a later wave on the same span finds them evicted (the head, ~1 GiB, is
    far larger than L2), so each (wave, span) pair reads that span once.
    Returns the reads per span: 1.0 = the head read once.
    """
    waves = [set(order[i:i + resident, 1].tolist()) for i in range(0, len(order), resident)]
    return sum(len(wave) for wave in waves) / len(set(order[:, 1].tolist()))


@needs_interpreter
def test_forward_reads_the_lm_head_about_once_per_group(monkeypatch):
    # Gemma-2B's head in bf16 on an H100-like GPU: 132 SMs, 50 MiB of L2; N = 8192 tokens
    n, h, vocab, sms, l2 = 8192, 2048, 256000, 132, 50 * 2**20
    monkeypatch.setattr(op, "_facts", lambda device: (sms, l2, 90))
    cuda = torch.device("cuda")
    split, span = op._split(n, vocab, cuda)
    block_n = tuning.LINEAR_FORWARD_TILES[(90, "16-bit")][0].block_n
    n_blocks = triton.cdiv(n, block_n)
    group_tokens = op._group_tokens(h, 2, cuda)
    group = max(group_tokens // block_n, 1)
    assert group * block_n * h * 2 <= l2 // 2, "a group's hidden rows must stay in L2"
    groups = triton.cdiv(n_blocks, group)

    grouped = forward_order(n, split, group_tokens, block_n)
    # every (token block, span) exactly once
    assert len({tuple(p) for p in grouped.tolist()}) == n_blocks * split
    reads = head_reads(grouped, sms)
    assert reads <= groups + 1, f"{reads:.1f} passes over the head for {groups} groups"

    # the order the forward had before: the span fastest, 16 programs an SM
    span_fastest = torch.tensor([(pid // split, pid % split) for pid in range(n_blocks * split)])
    assert head_reads(span_fastest, sms) >= 4 * reads


# ----------------------------------------------------------------------------
# tf32x3: fp32 accuracy on tensor cores
# ----------------------------------------------------------------------------


def _to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (10 mantissa bits), to nearest even, as the tensor cores' operands are."""
    bits = x.view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def _tf32x3_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Triton's "tf32x3" dot: a = a_hi + a_lo in TF32 each; a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi."""
    a_hi, b_hi = _to_tf32(a), _to_tf32(b)
    a_lo, b_lo = _to_tf32(a - a_hi), _to_tf32(b - b_hi)
    return a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi


def test_tf32x3_is_about_as_accurate_as_fp32_and_far_better_than_tf32():
    torch.manual_seed(0)
    hidden = torch.randn(256, 2048) * 2.0
    weight = torch.randn(2048, 4096) / 2048**0.5
    exact = hidden.double() @ weight.double()
    err = {
        "fp32": (hidden @ weight - exact).abs().max().item(),
        "tf32x3": (_tf32x3_matmul(hidden, weight) - exact).abs().max().item(),
        "tf32": (_to_tf32(hidden) @ _to_tf32(weight) - exact).abs().max().item(),
    }
    assert err["tf32x3"] <= 4 * err["fp32"], err
    assert err["tf32"] >= 50 * err["tf32x3"], err


# ----------------------------------------------------------------------------
# candidate lists
# ----------------------------------------------------------------------------


def test_every_family_and_operand_kind_has_candidates_that_fit_shared_memory():
    for table in (tuning.LINEAR_FORWARD_TILES, tuning.LINEAR_DLOGITS_TILES):
        for arch in tuning.ARCHS:
            for kind, width in (("16-bit", 2), ("tf32", 4), ("tf32x3", 4)):
                tiles = tuning.candidates(table, arch, kind)
                assert tiles, (arch, kind)
                for t in tiles:
                    assert t.shared_estimate(width) <= tuning.SHARED_MEMORY_PER_BLOCK[arch], (arch, kind, t)
                    if table is tuning.LINEAR_FORWARD_TILES:  # its spans are whole tiles for every candidate
                        assert op._span_multiple(torch.device("cuda")) % t.block_v == 0


def test_operand_kind_follows_dtype_and_precision():
    assert tuning.operand_kind(2, None) == "16-bit"
    assert tuning.operand_kind(4, "tf32") == "tf32"
    assert tuning.operand_kind(4, "tf32x3") == "tf32x3"
    assert tuning.arch_family(8, 0) == tuning.arch_family(8, 9) == 80
    assert tuning.arch_family(9, 0) == tuning.arch_family(10, 0) == 90


# ----------------------------------------------------------------------------
# CUDA: the same choices on hardware
# ----------------------------------------------------------------------------

CUDA = torch.cuda.is_available()


def _device_candidates(table, kind):
    major, minor = torch.cuda.get_device_capability()
    return tuning.candidates(table, tuning.arch_family(major, minor), kind)


def _real_case(dtype, n=2048, h=2048, v=32000):
    case = make_case(n=n, h=h, v=v, dtype=dtype, bias=False, dominant=16, device="cuda")
    return case, case["targets"] != -100


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["16-bit", "tf32x3"])
@pytest.mark.parametrize("table", ["forward", "dlogits"])
def test_cuda_every_candidate_matches_chunked(table, kind):
    dtype = torch.bfloat16 if kind == "16-bit" else torch.float32
    case, valid = _real_case(dtype)
    opts = op._Options(temperature=0.8, softcap=30.0, ignore_index=-100, entropy=True, backend="triton",
                       chunk_size=None)
    args = (case["hidden"], case["weight"], None, case["targets"], valid)
    want_logp, want_ent, want_lse = op._chunked_forward(*args, opts)
    want_grads = op._chunked_backward(*args, want_lse, case["grad_out"], opts, (True, True, False))
    tables = {"forward": tuning.LINEAR_FORWARD_TILES, "dlogits": tuning.LINEAR_DLOGITS_TILES}
    for tiles in _device_candidates(tables[table], kind):
        forced = dict(tiles=tiles)
        if table == "forward":
            logp, ent, _ = op._triton_forward(*args, opts, **forced)
            torch.testing.assert_close(logp, want_logp, rtol=2e-5, atol=2e-4, msg=lambda m: f"{tiles}: {m}")
            torch.testing.assert_close(ent, want_ent, rtol=2e-5, atol=2e-4, msg=lambda m: f"{tiles}: {m}")
        else:
            grad_h, grad_w, _ = op._triton_backward(*args, want_lse, case["grad_out"], opts, (True, True, False),
                                                    **forced)
            for got, want in ((grad_h, want_grads[0]), (grad_w, want_grads[1])):
                # 16-bit gradients: one rounding of dz to the input dtype on each side
                tol = dict(rtol=2e-2, atol=2e-2 * want.abs().max().item()) if kind == "16-bit" else \
                    dict(rtol=1e-4, atol=1e-4 * want.abs().max().item())
                torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{tiles}: {m}")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_fp32_goes_to_cublas_under_auto_and_tf32x3_under_triton():
    assert not torch.backends.cuda.matmul.allow_tf32
    case, _ = _real_case(torch.float32, n=1024)
    hidden, weight, targets = case["hidden"], case["weight"], case["targets"]
    assert op.resolve_linear_backend("auto", hidden) == "chunked"
    assert op._input_precision(torch.float32, hidden.device) == "tf32x3"
    truth = op.linear_logprobs_ref(hidden.double(), weight.double(), targets)
    errors = {backend: (op.linear_logprobs(hidden, weight, targets, backend=backend).double() - truth).abs().max()
              for backend in ("chunked", "triton")}
    assert errors["triton"] <= 4 * errors["chunked"] + 1e-6, errors
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert op.resolve_linear_backend("auto", hidden) == "triton"
        assert op._input_precision(torch.float32, hidden.device) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_unaligned_hidden_size_goes_to_chunked_or_is_refused():
    hidden = torch.randn(8, 37, device="cuda", dtype=torch.bfloat16)
    assert op.resolve_linear_backend("auto", hidden) == "chunked"
    with pytest.raises(ValueError, match="divisible by 16"):
        op.resolve_linear_backend("triton", hidden)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_fast_tanh_is_within_1e6_of_tanh():
    import triton
    import triton.language as tl

    from fastbond.kernels._triton_common import fast_tanh

    @triton.jit
    def _tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, fast_tanh(x, False), mask=offs < n)

    x = torch.cat([torch.linspace(-20, 20, 1 << 20, device="cuda"),
                   torch.tensor([0.0, -0.0, 1e-30, float("inf"), -float("inf")], device="cuda")])
    y = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    error = (y.double() - torch.tanh(x.double())).abs().max().item()
    assert error < 1e-6, error
