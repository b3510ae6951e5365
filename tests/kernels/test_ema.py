"""ema_: every backend against the fp32 reference, edge cases, and the numerics of SPEC §8.

The Triton kernel runs through the interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1), which costs tens of milliseconds per launch: shapes here
stay small (the 1,000-step tracking test on 256 elements takes ~20 s that way).
"""

from __future__ import annotations

import pytest
import torch

from fastbond.kernels import ema as ema_module
from fastbond.kernels._backend import triton_available, triton_interpreted
from fastbond.kernels.ema import ema_

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON_OK = triton_available() and (CUDA or triton_interpreted())
BACKENDS = ["reference", "chunked", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="no triton"))]
FAST_BACKENDS = BACKENDS[1:]  # compared against the reference

# Odd sizes: not multiples of any block, a single element, an empty tensor, n-d shapes.
SHAPES = [(1031,), (1,), (0,), (7, 13), (3, 5, 2), (600,)]


def _make(shapes, policy_dtype, shadow_dtype=None, anchor_dtype=torch.float32, device=DEVICE):
    anchors = [torch.randn(s, device=device).to(anchor_dtype) for s in shapes]
    policies = [torch.randn(s, device=device).to(policy_dtype) for s in shapes]
    if shadow_dtype is None:
        return anchors, policies, None
    shadows = [torch.full(s, float("nan"), device=device, dtype=shadow_dtype) for s in shapes]
    return anchors, policies, shadows


def _clone(tensors):
    return None if tensors is None else [t.clone() for t in tensors]


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above each fp32 value (equal when x is representable)."""
    bits = x.view(torch.int32)
    low = (bits & -65536).view(torch.float32)  # truncation: toward zero
    high = ((bits & -65536) + 65536).view(torch.float32)  # next bf16 away from zero
    exact = (bits & 0xFFFF) == 0
    high = torch.where(exact, low, high)
    return torch.minimum(low, high), torch.maximum(low, high)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("policy_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shadow_dtype", [None, torch.bfloat16, torch.float16])
def test_matches_reference(backend, policy_dtype, shadow_dtype):
    anchors, policies, shadows = _make(SHAPES, policy_dtype, shadow_dtype)
    expected = _clone(anchors)
    ema_(expected, policies, 0.3, backend="reference")
    ema_(anchors, policies, 0.3, backend=backend, shadow=shadows)
    for i, (got, want) in enumerate(zip(anchors, expected)):
        # fp32 lerp; a fused multiply-add may differ from the reference in the last bit.
        torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7, msg=f"anchor[{i}]")
        if shadows is not None:
            # The shadow is the updated fp32 anchor rounded to nearest: bit for bit.
            assert torch.equal(shadows[i], got.to(shadow_dtype)), f"shadow[{i}]"


@pytest.mark.parametrize("backend", BACKENDS)
def test_eta_zero_and_one(backend):
    anchors, policies, shadows = _make(SHAPES, torch.bfloat16, torch.bfloat16)
    before = _clone(anchors)
    ema_(anchors, policies, 0.0, backend=backend, shadow=shadows)
    for a, b, s in zip(anchors, before, shadows):
        assert torch.equal(a, b)  # η = 0 leaves the anchor bit for bit
        assert torch.equal(s, b.to(torch.bfloat16))  # ... and still writes the shadow
    ema_(anchors, policies, 1, backend=backend, shadow=shadows)
    for a, p, s in zip(anchors, policies, shadows):
        assert torch.equal(a, p.float())  # η = 1 copies the policy exactly
        assert torch.equal(s, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place(backend):
    storage = torch.randn(2000, device=DEVICE)
    anchors = [storage[:1000].view(10, 100), storage[1000:]]  # views of one buffer
    policies = [torch.randn(10, 100, device=DEVICE), torch.randn(1000, device=DEVICE)]
    ptrs = [a.data_ptr() for a in anchors]
    expected = storage.clone()
    expected.lerp_(torch.cat([p.reshape(-1) for p in policies]), 0.25)
    result = ema_(anchors, policies, 0.25, backend=backend)
    assert result is anchors
    assert [a.data_ptr() for a in anchors] == ptrs
    torch.testing.assert_close(storage, expected, rtol=2e-7, atol=1e-7)  # the caller's buffer moved


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_flat_buffer(backend):
    anchor = torch.randn(1031, device=DEVICE)
    policy = torch.randn(1031, device=DEVICE, dtype=torch.bfloat16)
    shadow = torch.empty(1031, device=DEVICE, dtype=torch.bfloat16)
    expected = torch.lerp(anchor, policy.float(), 0.02)
    ema_(anchor, policy, 0.02, backend=backend, shadow=shadow)
    torch.testing.assert_close(anchor, expected, rtol=2e-7, atol=1e-7)
    assert torch.equal(shadow, anchor.to(torch.bfloat16))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("vector_sizes", [True, False], ids=["sizes-whole-vectors", "any-sizes"])
def test_many_tensors_one_launch(backend, vector_sizes, monkeypatch):
    """Aligned tensors whose sizes are whole 16-byte vectors share one launch; other sizes take a second."""
    generator = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 300, (200,), generator=generator)
    if vector_sizes:
        sizes = sizes // 8 * 8
    shapes = [(int(n),) for n in sizes]
    anchors, policies, shadows = _make(shapes, torch.bfloat16, torch.bfloat16)
    expected = _clone(anchors)
    ema_(expected, policies, 0.1, backend="reference")

    launches = []
    if backend == "triton":
        kernel = ema_module._ema_kernel

        class Counting:
            def __getitem__(self, grid):
                launches.append(grid)
                return kernel[grid]

        monkeypatch.setattr(ema_module, "_ema_kernel", Counting())
    ema_(anchors, policies, 0.1, backend=backend, shadow=shadows)
    for got, want, s in zip(anchors, expected, shadows):
        torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7)
        assert torch.equal(s, got.to(torch.bfloat16))
    if backend == "triton":
        # one dtype group, aligned: one launch for 200 tensors (two when some sizes end mid-vector)
        assert len(launches) == (1 if vector_sizes else 2)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_strided_and_unaligned(backend):
    """Non-contiguous tensors fall back to torch; misaligned ones take the kernel's scalar path."""
    base = torch.randn(64, 66, device=DEVICE)
    flat = torch.randn(1100, device=DEVICE)
    anchors = [base[:, ::2], flat[1:1032]]  # strided; 4-byte offset from a 16-byte boundary
    policies = [torch.randn(64, 33, device=DEVICE, dtype=torch.bfloat16), torch.randn(1031, device=DEVICE)]
    expected = [torch.lerp(a, p.float(), 0.7) for a, p in zip(anchors, policies)]
    ema_(anchors, policies, 0.7, backend=backend)
    for got, want in zip(anchors, expected):
        torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7)


def _random_walk_policy(theta0: torch.Tensor, steps: int, generator: torch.Generator):
    """A policy that drifts and jitters, as a trained policy does: bf16 weights, step t."""
    drift = 1e-4 * torch.randn(theta0.shape, generator=generator, dtype=torch.float64).sign()
    noise = torch.zeros_like(theta0, dtype=torch.float64)
    for t in range(1, steps + 1):
        noise += 3e-4 * torch.randn(theta0.shape, generator=generator, dtype=torch.float64)
        yield (theta0.double() + t * drift + noise).to(torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_anchor_tracks_exact_ema_while_bf16_stalls(backend):
    """SPEC §8: over 1,000 steps at η = 0.01 the fp32 state follows the fp64 EMA; a bf16 EMA stalls."""
    steps = 1000
    eta = 0.01
    generator = torch.Generator().manual_seed(0)
    theta0 = torch.randn(256, generator=generator).to(torch.bfloat16)
    exact = theta0.double()
    anchor = theta0.float().to(DEVICE)
    shadow = torch.empty(256, dtype=torch.bfloat16, device=DEVICE)
    naive = theta0.clone().to(DEVICE)  # a bf16 anchor updated by bf16 lerp_
    for policy in _random_walk_policy(theta0, steps, generator):
        exact += eta * (policy.double() - exact)
        policy = policy.to(DEVICE)
        ema_(anchor, policy, eta, backend=backend, shadow=shadow)
        naive.lerp_(policy, eta)
    movement = (exact - theta0.double()).abs().max()  # how far the EMA travelled
    fp32_err = (anchor.cpu().double() - exact).abs().max()
    naive_err = (naive.cpu().double() - exact).abs().max()
    assert fp32_err < 1e-5 * movement.clamp(min=1.0) + 1e-6
    assert float((anchor.cpu().double() - exact).abs().div(exact.abs().clamp(min=1e-2)).max()) < 1e-4
    assert torch.equal(shadow, anchor.to(torch.bfloat16))
    # The failure this design avoids: the bf16 EMA loses a large share of the movement.
    assert naive_err > 0.3 * movement
    assert naive_err > 1000 * fp32_err


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_lands_on_a_neighbour(backend):
    anchor = torch.randn(1031, device=DEVICE).to(torch.bfloat16)
    policy = torch.randn(1031, device=DEVICE).to(torch.bfloat16)
    exact = torch.lerp(anchor.float(), policy.float(), 0.3)
    ema_(anchor, policy, 0.3, backend=backend, stochastic_rounding=True, seed=5)
    low, high = _bf16_neighbours(exact.cpu())
    got = anchor.float().cpu()
    assert bool(((got == low) | (got == high)).all())
    assert bool((got != exact.cpu().to(torch.bfloat16).float()).any())  # it is not round-to-nearest


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_is_unbiased(backend):
    """One step from the same point on many elements: the mean lands on the exact value, round-to-nearest does not."""
    n = 4096 if backend != "triton" or CUDA else 2048
    anchor = torch.ones(n, device=DEVICE, dtype=torch.bfloat16)
    policy = torch.full((n,), 1.25, device=DEVICE, dtype=torch.bfloat16)
    eta = 0.01  # exact = 1.0025: a third of a bf16 ulp (2^-7) above 1, rounds to 1 by nearest
    ema_(anchor, policy, eta, backend=backend, stochastic_rounding=True, seed=11)
    exact = 1.0 + eta * 0.25
    mean_err = anchor.double().mean().item() - exact
    nearest_err = 1.0 - exact
    ulp = 2.0**-7
    sigma = ulp * (0.32 * 0.68 / n) ** 0.5  # std of the mean of n Bernoulli(0.32) ulps
    assert abs(mean_err) < 5 * sigma
    assert abs(mean_err) < 0.2 * abs(nearest_err)


def test_stochastic_rounding_tracks_exact_ema():
    """Over 1,000 steps a bf16 anchor with stochastic rounding stays unbiased where a bf16 lerp_ stalls."""
    steps, eta = 1000, 0.01
    generator = torch.Generator().manual_seed(2)
    theta0 = torch.randn(4096, generator=generator).to(torch.bfloat16)
    exact = theta0.double()
    stochastic = theta0.clone().to(DEVICE)
    naive = theta0.clone().to(DEVICE)
    for step, policy in enumerate(_random_walk_policy(theta0, steps, generator)):
        exact += eta * (policy.double() - exact)
        policy = policy.to(DEVICE)
        ema_(stochastic, policy, eta, backend="chunked", stochastic_rounding=True, seed=step)
        naive.lerp_(policy, eta)
    sr_err = stochastic.cpu().double() - exact
    naive_err = naive.cpu().double() - exact
    # The drift has a random sign per element; compare errors along it so biases do not cancel.
    direction = (exact - theta0.double()).sign()
    assert abs(float((sr_err * direction).mean())) < 0.05 * float((naive_err * direction).abs().mean())
    assert float(sr_err.abs().mean()) < 0.5 * float(naive_err.abs().mean())


def test_seed_reproducible():
    policy = torch.randn(600, device=DEVICE).to(torch.bfloat16)
    runs = []
    for _ in range(2):
        anchor = torch.zeros(600, device=DEVICE, dtype=torch.bfloat16)
        ema_(anchor, policy, 0.1, backend="chunked", stochastic_rounding=True, seed=3)
        runs.append(anchor)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eta=1.5), r"eta must lie in \[0, 1\]"),
        (dict(eta=float("nan")), r"eta must lie in \[0, 1\]"),
        (dict(eta=-0.1), r"eta must lie in \[0, 1\]"),
        (dict(policy=[torch.zeros(3)]), r"2 anchor tensors but 1 policy"),
        (dict(policy=[torch.zeros(3), torch.zeros(5)]), r"differ in shape"),
        (dict(anchor=[torch.zeros(3, dtype=torch.bfloat16), torch.zeros(4)]), r"must be float32"),
        (dict(stochastic_rounding=True), r"needs a bfloat16 anchor"),
        (dict(shadow=[torch.zeros(3)]), r"2 anchor tensors but 1 shadow"),
        (dict(policy=[torch.zeros(3), torch.zeros(4, device="meta")]), r"one device"),
        (dict(policy=[torch.zeros(3), torch.zeros(4, dtype=torch.int32)]), r"floating point"),
        (dict(backend="cuda"), r"unknown backend"),
    ],
)
def test_validation(kwargs, message):
    args = dict(anchor=[torch.zeros(3), torch.zeros(4)], policy=[torch.zeros(3), torch.zeros(4)], eta=0.5)
    args.update(kwargs)
    anchor, policy, eta = args.pop("anchor"), args.pop("policy"), args.pop("eta")
    with pytest.raises(ValueError, match=message):
        ema_(anchor, policy, eta, **args)


def test_shadow_with_stochastic_rounding_is_refused():
    anchor = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="shadow"):
        ema_(anchor, torch.zeros(3), 0.1, shadow=torch.zeros(3, dtype=torch.bfloat16), stochastic_rounding=True)


def test_empty_list_is_a_no_op():
    assert ema_([], [], 0.5) == []


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("stochastic_rounding", [False, True])
def test_cuda_real_sizes(stochastic_rounding):
    shapes = [(2048, 2048), (256000 // 8, 2048), (2048,), (16384 * 3 + 5,), (2048, 16384)]
    anchor_dtype = torch.bfloat16 if stochastic_rounding else torch.float32
    shadow_dtype = None if stochastic_rounding else torch.bfloat16
    anchors, policies, shadows = _make(shapes, torch.bfloat16, shadow_dtype, anchor_dtype=anchor_dtype)
    expected = [torch.lerp(a.float(), p.float(), 0.02) for a, p in zip(anchors, policies)]
    ema_(anchors, policies, 0.02, backend="triton", shadow=shadows, stochastic_rounding=stochastic_rounding, seed=1)
    for got, want in zip(anchors, expected):
        if stochastic_rounding:
            low, high = _bf16_neighbours(want)
            assert bool(((got.float() == low) | (got.float() == high)).all())
            # Unbiased: each element lands on high with probability (want − low)/(high − low), an
            # error of variance (want − low)(high − want); the mean error stays within 5σ of 0.
            want64, low64, high64 = want.double(), low.double(), high.double()
            sigma = float(((want64 - low64) * (high64 - want64)).sum().sqrt()) / want.numel()
            mean_err = float((got.double() - want64).mean())
            assert abs(mean_err) < 5 * sigma + 1e-12, f"{tuple(got.shape)}: mean error {mean_err:.3g}, σ {sigma:.3g}"
        else:
            torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7)
    if shadows is not None:
        for s, a in zip(shadows, anchors):
            assert torch.equal(s, a.to(torch.bfloat16))
