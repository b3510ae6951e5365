"""linear_logprobs: every backend against the fp64 oracle.

Ground truth is `linear_logprobs_ref` in fp64 on the very (rounded) inputs the
kernel sees. fp32 is held to a tight bound; bf16/fp16 to the error PyTorch
itself makes in that dtype (`F.linear` in the low dtype, then fp32 softmax, as
a model would), as max-norms:  |kernel − truth| ≤ 2·|torch_lowp − truth| + atol.

Shapes are odd on purpose (N=37, H=48, V=1031: no block divides them); the
Triton backend runs here through Triton's CPU interpreter (tests/conftest.py),
so its shapes stay small. Rows where the target dominates (p ≈ 1) are in every
case, as are ~20% ignored tokens and non-uniform upstream gradients.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fastbond.kernels._backend import triton_available, triton_interpreted
from fastbond.kernels.linear_logprobs import linear_logprobs, linear_logprobs_ref

op = importlib.import_module("fastbond.kernels.linear_logprobs")  # the module, whatever __init__ re-exports
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON_OK = triton_available() and (CUDA or triton_interpreted())
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton on CUDA or TRITON_INTERPRET=1")
BACKENDS = ["chunked", pytest.param("triton", marks=needs_triton)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100


# ----------------------------------------------------------------------------
# cases and comparisons
# ----------------------------------------------------------------------------


def make_case(n=37, h=48, v=1031, dtype=torch.float32, bias=False, dominant=4, seed=0, device=DEVICE):
    """Random head and hidden states, ~20% ignored tokens, `dominant` rows with p(target) ≈ 1."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (2.0 / h**0.5)  # logits of std ≈ 2
    targets = torch.randint(0, v, (n,), generator=gen)
    order = torch.randperm(n, generator=gen)
    dominant_rows = order[:dominant]
    # h ∥ w_target with h·w_target = 30: other logits stay ≲ 15, so p(target) ≈ 1 − 1e-6
    w_t = weight[targets[dominant_rows]]
    hidden[dominant_rows] = 30.0 * w_t / w_t.square().sum(1, keepdim=True)
    targets[order[dominant : dominant + max(1, n // 5)]] = IGNORE
    b = torch.randn(v, generator=gen) * 0.5 if bias else None
    to = dict(dtype=dtype, device=device)
    return dict(
        hidden=hidden.to(**to),
        weight=weight.to(**to),
        bias=b.to(**to) if b is not None else None,
        targets=targets.to(device),
        grad_out=torch.randn(n, generator=gen).to(device),  # per-token, mixed signs
        dominant_rows=dominant_rows.to(device),
    )


def torch_lowp(hidden, weight, targets, bias=None, temperature=1.0, softcap=None):
    """What a PyTorch model does in its own dtype: logits in that dtype, softmax in fp32."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != IGNORE
    picked = logprobs.gather(1, targets.masked_fill(~valid, 0)[:, None]).squeeze(1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def run(fn, case, grad_out, *, dtype=None, **kwargs):
    """(log-probs, entropy or None, {name: grad}) of fn with fresh leaf copies of the inputs."""
    names = ["hidden", "weight"] + (["bias"] if case["bias"] is not None else [])
    leaves = {k: case[k].detach().to(dtype or case[k].dtype).clone().requires_grad_() for k in names}
    out = fn(leaves["hidden"], leaves["weight"], case["targets"], bias=leaves.get("bias"), **kwargs)
    logp, ent = out if isinstance(out, tuple) else (out, None)
    (logp * grad_out.to(logp.dtype)).sum().backward()
    return logp.detach(), ent, {k: t.grad for k, t in leaves.items()}


def assert_within(name, got, truth, lowp, dtype, rtol=2e-5):
    """fp32: tight relative max-norm. bf16/fp16: 2·(PyTorch's own error) + atol."""
    scale = truth.abs().max().item()
    err = (got.double() - truth).abs().max().item()
    if dtype == torch.float32:
        bound = rtol * scale + 1e-6
    else:
        bound = 2.0 * (lowp.double() - truth).abs().max().item() + 1e-3 * scale + 1e-6
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (scale {scale:.3e})"


def truth_of(case, **kwargs):
    return run(linear_logprobs_ref, case, case["grad_out"], dtype=torch.float64, return_entropy=True, **kwargs)


# ----------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------

VARIANTS = {
    # plain head, one chunk
    "plain": dict(bias=False, kwargs=dict()),
    # Gemma-style cap, T ≠ 1, bias, and ragged vocabulary chunks (1031 = 4·256 + 7)
    "capped": dict(bias=True, kwargs=dict(temperature=0.7, softcap=20.0, chunk_size=256)),
}


@pytest.mark.smoke
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward_entropy_match_fp64(backend, dtype, variant):
    spec = VARIANTS[variant]
    case = make_case(dtype=dtype, bias=spec["bias"])
    kwargs = spec["kwargs"]
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    truth, truth_ent, truth_grads = truth_of(case, **ref_kwargs)

    # the case is what it claims: the dominant rows have p(target) ≈ 1
    assert truth[case["dominant_rows"]].min() > -1e-2

    logp, ent, grads = run(linear_logprobs, case, case["grad_out"], backend=backend, return_entropy=True, **kwargs)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert not ent.requires_grad

    lowp, lowp_grads = None, {}
    if dtype != torch.float32:
        lowp, _, lowp_grads = run(torch_lowp, case, case["grad_out"], **ref_kwargs)
    assert_within("logp", logp, truth, lowp, dtype)
    # entropy is fp32 from fp32 logits in every backend: hold it to the fp32 bound
    # for fp32 inputs, to PyTorch's log-prob error otherwise
    assert_within("entropy", ent, truth_ent, lowp, dtype, rtol=5e-5)
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
        assert_within(f"grad_{name}", grad, truth_grads[name], lowp_grads.get(name), dtype)


def test_reference_backend_is_the_oracle_in_fp32():
    case = make_case(bias=True)
    kwargs = dict(temperature=1.3, softcap=15.0)
    truth, truth_ent, truth_grads = truth_of(case, **kwargs)
    logp, ent, grads = run(linear_logprobs, case, case["grad_out"], backend="reference", return_entropy=True, **kwargs)
    assert_within("logp", logp, truth, None, torch.float32)
    assert_within("entropy", ent, truth_ent, None, torch.float32)
    for name, grad in grads.items():
        assert_within(f"grad_{name}", grad, truth_grads[name], None, torch.float32)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_softcap_then_temperature(backend):
    """Gemma-2 order: cap the raw logits, then divide by T (not cap · tanh(z / (cap · T)))."""
    case = make_case(n=9, h=16, v=33, dominant=2)  # H % 16 == 0: CUDA launches need aligned rows
    hidden, weight, targets = case["hidden"], case["weight"], case["targets"]
    cap, temperature = 1.5, 0.5
    z = (hidden.double() @ weight.double().T)
    expected = torch.log_softmax(cap * torch.tanh(z / cap) / temperature, dim=-1)
    valid = targets != IGNORE
    expected = torch.where(valid, expected.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    got = linear_logprobs(hidden, weight, targets, softcap=cap, temperature=temperature, backend=backend)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dominant_rows_keep_relative_precision(backend):
    """logp ≈ −1e-6 must not drown in the cancellation lse − s[target]."""
    case = make_case(dominant=8)
    truth, _, _ = truth_of(case)
    rows = case["dominant_rows"]
    logp = linear_logprobs(case["hidden"], case["weight"], case["targets"], backend=backend)
    assert truth[rows].max() < 0 and truth[rows].min() > -1e-4
    torch.testing.assert_close(logp[rows].double(), truth[rows], rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_upstream_gradient_other_than_one(backend):
    case = make_case(bias=True)
    grad_out = torch.full_like(case["grad_out"], 3.0)
    kwargs = dict(temperature=2.0, softcap=10.0)
    _, _, truth_grads = run(linear_logprobs_ref, case, grad_out, dtype=torch.float64, **kwargs)
    _, _, grads = run(linear_logprobs, case, grad_out, backend=backend, **kwargs)
    for name, grad in grads.items():
        assert_within(f"grad_{name}", grad, truth_grads[name], None, torch.float32)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_ignored_tokens_give_zero_and_no_gradient(backend):
    case = make_case()
    ignored = case["targets"] == IGNORE
    assert 0.1 < ignored.float().mean() < 0.4
    logp, ent, grads = run(
        linear_logprobs, case, torch.ones_like(case["grad_out"]) * 5.0, backend=backend, return_entropy=True
    )
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (ent[~ignored] > 0).all()
    assert (grads["hidden"][ignored] == 0).all()
    assert (grads["hidden"][~ignored] != 0).any(dim=1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_size_does_not_change_the_result(backend):
    case = make_case(bias=True)
    kwargs = dict(temperature=0.9, softcap=12.0, return_entropy=True)
    outs = [
        run(linear_logprobs, case, case["grad_out"], backend=backend, chunk_size=c, **kwargs)
        for c in (None, 300, 1031, 5000)
    ]
    for logp, ent, grads in outs[1:]:
        torch.testing.assert_close(logp, outs[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, outs[0][1], rtol=1e-5, atol=1e-5)
        for name in grads:
            torch.testing.assert_close(grads[name], outs[0][2][name], rtol=1e-5, atol=1e-6)


@needs_triton
def test_triton_several_token_blocks():
    """N spanning several token blocks: the split grid and the grouped dz ordering."""
    case = make_case(n=150, h=80, v=515, bias=True)  # ragged for every BLOCK_H, aligned for CUDA
    kwargs = dict(temperature=1.5, softcap=8.0)
    truth, truth_ent, truth_grads = truth_of(case, **kwargs)
    logp, ent, grads = run(
        linear_logprobs, case, case["grad_out"], backend="triton", return_entropy=True, chunk_size=200, **kwargs
    )
    assert_within("logp", logp, truth, None, torch.float32)
    assert_within("entropy", ent, truth_ent, None, torch.float32, rtol=5e-5)
    for name, grad in grads.items():
        assert_within(f"grad_{name}", grad, truth_grads[name], None, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend):
    """A frozen LM head: grads for hidden only, and the same values as with all grads."""
    case = make_case()
    hidden = case["hidden"].clone().requires_grad_()
    logp = linear_logprobs(hidden, case["weight"], case["targets"], backend=backend)
    (logp * case["grad_out"]).sum().backward()
    _, _, truth_grads = truth_of(case)
    assert_within("grad_hidden", hidden.grad, truth_grads["hidden"], None, torch.float32)
    assert case["weight"].grad is None


# ----------------------------------------------------------------------------
# no-grad path, inputs, errors
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_path_builds_no_graph(backend, monkeypatch):
    case = make_case(bias=True)
    leaves = [case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    with_grad = linear_logprobs(leaves[0], leaves[1], case["targets"], bias=leaves[2], backend=backend, softcap=9.0)
    assert with_grad.grad_fn is not None

    def no_autograd_function(*args, **kwargs):
        raise AssertionError("the no-grad path must not enter the autograd.Function")

    monkeypatch.setattr(op.LinearLogprobsFunction, "apply", no_autograd_function)
    with torch.no_grad():
        no_grad = linear_logprobs(leaves[0], leaves[1], case["targets"], bias=leaves[2], backend=backend, softcap=9.0)
    frozen = linear_logprobs(case["hidden"], case["weight"], case["targets"], bias=case["bias"], backend=backend, softcap=9.0)
    for out in (no_grad, frozen):
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, with_grad.detach())


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_int32_targets_and_non_contiguous_hidden(backend):
    case = make_case()
    expected = linear_logprobs(case["hidden"], case["weight"], case["targets"], backend=backend)
    hidden_t = case["hidden"].T.contiguous().T  # same values, column-major
    assert not hidden_t.is_contiguous()
    got = linear_logprobs(hidden_t, case["weight"], case["targets"].int(), backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_empty_batch(backend):
    case = make_case()
    hidden = case["hidden"][:0].clone().requires_grad_()
    logp, ent = linear_logprobs(hidden, case["weight"], case["targets"][:0], backend=backend, return_entropy=True)
    assert logp.shape == (0,) and ent.shape == (0,)


def test_auto_backend_picks_chunked_without_cuda():
    if CUDA:
        pytest.skip("auto picks triton on CUDA")
    case = make_case()
    auto = linear_logprobs(case["hidden"], case["weight"], case["targets"])
    chunked = linear_logprobs(case["hidden"], case["weight"], case["targets"], backend="chunked")
    assert torch.equal(auto, chunked)


def test_bad_inputs_raise_clear_errors():
    case = make_case(n=5, h=8, v=11, dominant=1)
    h, w, t = case["hidden"], case["weight"], case["targets"].clamp(min=0)
    cases = [
        (ValueError, "2-D tensor \\[N, H\\]", dict(hidden=h[0])),
        (ValueError, "ZeRO-3", dict(weight=torch.empty(0, device=h.device))),
        (ValueError, "differ in H", dict(weight=w[:, :7])),
        (ValueError, "targets must have shape", dict(targets=t[:3])),
        (TypeError, "targets must be int64", dict(targets=t.float())),
        (TypeError, "hidden must be float32", dict(hidden=h.double(), weight=w.double())),
        (TypeError, "share a dtype", dict(weight=w.half())),
        (ValueError, "bias must have shape", dict(bias=torch.zeros(10, device=h.device))),
        (ValueError, r"targets must lie in \[0, 11\)", dict(targets=torch.full_like(t, 11))),
        (ValueError, "temperature must be > 0", dict(temperature=0.0)),
        (ValueError, "softcap must be > 0", dict(softcap=-1.0)),
        (ValueError, "chunk_size must be a positive int", dict(chunk_size=0)),
        (ValueError, "unknown backend", dict(backend="cuda")),
    ]
    for exc, message, override in cases:
        args = dict(hidden=h, weight=w, targets=t)
        args.update(override)
        with pytest.raises(exc, match=message):
            linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


# ----------------------------------------------------------------------------
# memory: the chunked backends never hold an [N, V] tensor
# ----------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor, in bytes, any op produces (views included).

    Bytes rather than elements: Triton's interpreter moves kernel arguments
    through raw uint8 views of their storage.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel() * leaf.element_size())
        return out


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_largest_intermediate_is_bounded_by_the_chunk(backend):
    # H ≪ N so the [V, H] weight (and its gradient) stay far below the [N, V] logits
    n, h, v, chunk = 256, 16, 1031, 128
    case = make_case(n=n, h=h, v=v, bias=True, device="cpu")
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    bias = case["bias"].clone().requires_grad_()
    with LargestTensor() as mode:
        logp, _ = linear_logprobs(
            hidden, weight, case["targets"], bias=bias, softcap=10.0, return_entropy=True,
            backend=backend, chunk_size=chunk,
        )
        (logp * case["grad_out"]).sum().backward()
    logits_bytes = n * v * 4  # the fp32 [N, V] logits
    if backend == "reference":
        assert mode.largest >= logits_bytes  # the method sees them
    else:
        assert mode.largest < logits_bytes // 4, f"{backend}: a {mode.largest}-byte tensor (logits: {logits_bytes})"
        assert mode.largest <= 4 * max(n * chunk, v * h, n * h)


# ----------------------------------------------------------------------------
# CUDA, real-ish shapes
# ----------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_cuda_real_shape_bf16(backend):
    n, h, v = 4096, 2048, 32000
    case = make_case(n=n, h=h, v=v, dtype=torch.bfloat16, dominant=64, device="cuda")
    kwargs = dict(softcap=30.0, temperature=0.8)
    # ground truth: the fp32 reference (PyTorch's default: no TF32 in fp32 matmuls)
    assert not torch.backends.cuda.matmul.allow_tf32
    truth, truth_ent, truth_grads = run(
        linear_logprobs_ref, case, case["grad_out"], dtype=torch.float32, return_entropy=True, **kwargs
    )
    lowp, _, lowp_grads = run(torch_lowp, case, case["grad_out"], **kwargs)
    logp, ent, grads = run(linear_logprobs, case, case["grad_out"], backend=backend, return_entropy=True, **kwargs)
    assert_within("logp", logp, truth.double(), lowp, torch.bfloat16)
    assert_within("entropy", ent, truth_ent.double(), lowp, torch.bfloat16)
    for name, grad in grads.items():
        assert_within(f"grad_{name}", grad, truth_grads[name].double(), lowp_grads[name], torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_triton_memory_is_bounded():
    n, h, v, chunk = 4096, 2048, 32000, 4096
    case = make_case(n=n, h=h, v=v, dtype=torch.bfloat16, dominant=8, device="cuda")
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()

    def step():
        logp = linear_logprobs(hidden, weight, case["targets"], backend="triton", chunk_size=chunk)
        (logp * case["grad_out"]).sum().backward()

    step()  # compile kernels, create the cuBLAS workspace
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    grads_bytes = (n * h + v * h) * 2
    extra = torch.cuda.max_memory_allocated() - base - grads_bytes
    logits_fp32 = n * v * 4
    assert extra < logits_fp32 // 4, f"extra {extra / 2**20:.0f} MiB vs fp32 logits {logits_fp32 / 2**20:.0f} MiB"
