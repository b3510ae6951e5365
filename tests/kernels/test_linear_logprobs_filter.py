"""The triton backward's gradient filter (`linear_logprobs(..., filter=True)`) against its bound.

A 128×128 tile of dz is skipped when every |∂logp/∂z|·T in it (on rows with a
non-zero upstream gradient) is below ε. Every entry a skipped tile drops has
|∂logp_i/∂z_v|·T < ε, so against the exact gradients (SPEC §8)

    |Δ∂h_ik| ≤ (|g_i| / T) Σ_v d_iv |W_vk|        |Δ∂W_vk| ≤ (1 / T) Σ_i |g_i| d_iv |h_ik|

with d_iv = |∂logp_i/∂z_v|·T where that is below ε, 0 elsewhere. The tests take
d from the fp64 oracle and hold the filtered gradients to that bound plus the
exact backward's own distance from fp64 and one rounding of the output's dtype.
Cases: peaked rows (one token dominates: the target's own 1 − p falls below ε
and whole tiles die) and flat rows (every p ≈ 1/V) with targets drawn from a
heavy-tailed marginal, as a trained model's tokens are; a soft-capped head with
T ≠ 1; ignored tokens and mixed-sign upstream gradients throughout. Each case
checks that the filter did skip tiles, so the bound is never tested vacuously.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastbond.kernels import tuning
from fastbond.kernels.linear_logprobs import (
    linear_logprobs,
    linear_logprobs_ref,
    recording_tile_survival,
)
from fastbond.kernels.live_tile_grads import FILTER_TILE, INTERPRETER_TILES
from tests.kernels.test_linear_logprobs import DEVICE, IGNORE, needs_triton

op = importlib.import_module("fastbond.kernels.linear_logprobs")  # the module, whatever __init__ re-exports
pytestmark = needs_triton

LOW = [torch.bfloat16, torch.float16]


def filter_case(kind: str, dtype, n: int = 150, h: int = 48, v: int | None = None, seed: int = 0):
    """Hidden states, head and targets; ~15% ignored tokens, mixed-sign upstream gradients.

    peaked: the first 128 rows (one filter tile of rows) put p ≈ 1 − 1e-6 on one of the 40 first
    ids and draw it as their target; the other rows spread their mass (logits of std ≈ 1: most
    p between bf16's ε and 100 ε) and draw targets from their softmax. flat: logits of std 0.05 (every p ≈ 1/V), targets from a
    heavy-tailed marginal over the ids, most among the first (frequent) ones.
    """
    gen = torch.Generator().manual_seed(seed)
    v = v or (3000 if kind == "peaked" else 1400)  # peaked: more tiles than the spread rows' targets fill
    hidden = torch.randn(n, h, generator=gen)
    if kind == "peaked":
        weight = torch.randn(v, h, generator=gen) * (2.0 / h**0.5)
        hidden *= 0.5
        top = torch.randint(0, 40, (FILTER_TILE,), generator=gen)
        w_top = weight[top]
        hidden[:FILTER_TILE] = 30.0 * w_top / w_top.square().sum(1, keepdim=True)  # h·w_top = 30
    else:
        weight = torch.randn(v, h, generator=gen) * (0.05 / h**0.5)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    probs = torch.softmax(hidden.double() @ weight.double().T, dim=-1)
    if kind == "peaked":
        targets = torch.multinomial(probs.float(), 1, generator=gen).squeeze(1)
    else:  # Pareto(8, 2.5) − 8: the id of rank k is drawn ∝ (k + 8)^−3.5
        pareto = 8.0 * torch.rand(n, generator=gen, dtype=torch.float64) ** (-1 / 2.5)
        targets = (pareto - 8).long().clamp(max=v - 1)
    targets[torch.randperm(n, generator=gen)[: n * 15 // 100]] = IGNORE
    grad_out = torch.randn(n, generator=gen)
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), grad_out.to(DEVICE)


def grads(hidden, weight, targets, grad_out, fn=linear_logprobs, dtype=None, bias=None, **kwargs):
    """(grad_hidden, grad_weight[, grad_bias]) of Σ grad_out · logp."""
    h = hidden.detach().to(dtype or hidden.dtype).requires_grad_()
    w = weight.detach().to(dtype or weight.dtype).requires_grad_()
    b = bias.detach().to(dtype or bias.dtype).requires_grad_() if bias is not None else None
    logp = fn(h, w, targets, bias=b, **kwargs)
    (logp * grad_out.to(logp.dtype)).sum().backward()
    return (h.grad, w.grad) + ((b.grad,) if b is not None else ())


def bound(hidden, weight, targets, grad_out, eps, temperature=1.0, softcap=None, bias=None):
    """The error the filter may make (module docstring), from fp64 |∂logp/∂z|·T below ε."""
    h64, w64 = hidden.double(), weight.double()
    z = h64 @ w64.T + (bias.double() if bias is not None else 0.0)
    c = softcap * torch.tanh(z / softcap) if softcap is not None else z
    p = torch.softmax(c / temperature, dim=-1)
    valid = targets != IGNORE
    onehot = torch.zeros_like(p)
    onehot[valid, targets[valid]] = 1.0
    d = (onehot - p).abs()
    if softcap is not None:
        d = d * (1.0 - torch.tanh(z / softcap) ** 2)
    d = torch.where(d < eps * (1 + 1e-3), d, torch.zeros_like(d))  # fp32 may decide a hair below
    g = torch.where(valid, grad_out.double(), torch.zeros_like(grad_out.double())).abs() / temperature
    return (g[:, None] * d) @ w64.abs(), d.T @ (g[:, None] * h64.abs())


def assert_within_bound(name, filtered, exact, truth, allowed, dtype):
    rounding = torch.finfo(dtype).eps * truth.abs()  # one ulp of the output's dtype: a rounding either way
    slack = allowed + (exact.double() - truth).abs() + rounding + 1e-7
    excess = (filtered.double() - truth).abs() - slack
    worst = excess.argmax()
    assert excess.max() <= 0, (
        f"{name}: the filtered gradient is off by {(filtered.double() - truth).abs().flatten()[worst]:.3e} "
        f"where the bound allows {slack.flatten()[worst]:.3e}")


CASES = {
    "peaked": dict(kind="peaked", kwargs={}),
    "flat": dict(kind="flat", kwargs={}),
    # a soft-capped head with T ≠ 1, a bias, and several vocabulary chunks
    "capped": dict(kind="peaked", kwargs=dict(temperature=0.8, softcap=50.0), chunks=512, bias=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d).split(".")[-1])
def test_filtered_gradients_stay_within_the_bound_of_fp64(case, dtype):
    check_within_bound(CASES[case], dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_on_cuda_filtered_gradients_stay_within_the_bound_at_a_real_shape(case):
    """The compiled kernels (autotuned tiles, wgmma) at N 4096, H 2048, V 32000."""
    check_within_bound(CASES[case], torch.bfloat16, n=4096, h=2048, v=32000)


def check_within_bound(spec: dict, dtype, **shape):
    hidden, weight, targets, grad_out = filter_case(spec["kind"], dtype, **shape)
    kwargs = dict(spec["kwargs"])
    # the flat case's probabilities (≈ 1/1400) sit above bf16's 2⁻¹²: its ε is raised so tiles die
    eps = 2e-3 if spec["kind"] == "flat" else torch.finfo(dtype).eps / 32
    if spec.get("bias"):
        kwargs["bias"] = (torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(5)) * 0.5).to(
            dtype=dtype, device=DEVICE)
    truth = grads(hidden, weight, targets, grad_out, fn=linear_logprobs_ref, dtype=torch.float64, **kwargs)
    kwargs.update(backend="triton", chunk_size=spec.get("chunks"))
    exact = grads(hidden, weight, targets, grad_out, filter=False, **kwargs)
    with recording_tile_survival() as survival:
        filtered = grads(hidden, weight, targets, grad_out, filter=True, filter_eps=eps, **kwargs)
    assert 0.0 < survival.fraction < 1.0, f"the filter skipped {1 - survival.fraction:.0%} of the tiles"
    allowed_h, allowed_w = bound(hidden, weight, targets, grad_out, eps, kwargs.get("temperature", 1.0),
                                 kwargs.get("softcap"), kwargs.get("bias"))
    assert_within_bound("grad_hidden", filtered[0], exact[0], truth[0], allowed_h, dtype)
    assert_within_bound("grad_weight", filtered[1], exact[1], truth[1], allowed_w, dtype)
    if "bias" in kwargs:  # not filtered: the exact column sums, in the order's places
        assert_within_bound("grad_bias", filtered[2], exact[2], truth[2], torch.zeros_like(truth[2]), dtype)
    # and the filter did change something: the bound is not met by an untouched exact backward
    assert not torch.equal(filtered[1], exact[1])


def test_a_peaked_row_whose_target_dominates_loses_its_whole_tile():
    """A tile of rows that put p ≈ 1 on their target has no |∂logp/∂z| ≥ ε anywhere: nothing survives."""
    n, h, v = 128, 32, 256
    weight = torch.randn(v, h, dtype=torch.float64) * 0.01
    weight[0] = 3.0
    hidden = torch.full((n, h), 1.0, dtype=torch.float64)  # z_0 = 96, others ≈ 0: 1 − p_0 ≈ 1e-39
    targets = torch.zeros(n, dtype=torch.long)
    with recording_tile_survival() as survival:
        _, grad_w = grads(hidden.to(DEVICE, torch.bfloat16), weight.to(DEVICE, torch.bfloat16), targets.to(DEVICE),
                          torch.randn(n).to(DEVICE), backend="triton", filter=True)
    assert survival.fraction == 0.0
    assert grad_w.abs().max() == 0


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d).split(".")[-1])
def test_every_tile_alive_gives_the_exact_gradients_to_one_rounding(dtype):
    hidden, weight, targets, grad_out = filter_case("peaked", dtype)
    exact = grads(hidden, weight, targets, grad_out, backend="triton", filter=False)
    with recording_tile_survival() as survival:
        kept = grads(hidden, weight, targets, grad_out, backend="triton", filter=True, filter_eps=1e-30)
    assert survival.fraction == 1.0
    for got, want in zip(kept, exact):
        torch.testing.assert_close(got.float(), want.float(), rtol=torch.finfo(dtype).eps,
                                   atol=1e-6)


def test_the_default_is_the_exact_backward_and_fp32_is_never_filtered():
    hidden, weight, targets, grad_out = filter_case("peaked", torch.bfloat16)
    exact = grads(hidden, weight, targets, grad_out, backend="triton", filter=False)
    default = grads(hidden, weight, targets, grad_out, backend="triton")
    for got, want in zip(default, exact):
        assert torch.equal(got, want)
    with recording_tile_survival() as survival:
        grads(hidden.float(), weight.float(), targets, grad_out, backend="triton", filter=True, filter_eps=0.5)
        grads(hidden, weight, targets, grad_out, backend="chunked", filter=True, filter_eps=0.5)
    assert survival.counts == []  # neither ran the filtered backward


def test_bad_filter_eps_is_refused():
    hidden, weight, targets, _ = filter_case("flat", torch.bfloat16, n=8)
    with pytest.raises(ValueError, match="filter_eps must be > 0"):
        linear_logprobs(hidden, weight, targets, backend="triton", filter=True, filter_eps=0.0)


def test_every_tile_that_can_write_a_flag_lies_inside_one():
    """Each dlogits program's tile, and each step of the live-tile GEMMs, must divide the filter's tile."""
    tables = (tuning.LINEAR_DLOGITS_TILES, tuning.LIVE_DZ_T_X_TILES, tuning.LIVE_DZ_W_TILES)
    every = [t for table in tables for (_, kind), group in table.items() if kind == "16-bit" for t in group]
    for tiles in every + [INTERPRETER_TILES]:
        assert FILTER_TILE % tiles.block_n == 0 and FILTER_TILE % tiles.block_v == 0, tiles


def test_the_mean_logit_order_gathers_the_mass_into_fewer_tiles(monkeypatch):
    """100 ids scattered over the vocabulary hold nearly all of every row's mass: in id order they touch
    most column tiles, in mean-logit order one or two; the gradients are within the bound either way."""
    n, h, v = 128, 32, 3000
    gen = torch.Generator().manual_seed(3)
    popular = torch.randperm(v, generator=gen)[:100]
    direction = torch.randn(h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (1.0 / h**0.5)
    weight[popular] += 2.0 * direction / direction.norm()
    hidden = 4.0 * direction / direction.norm() + 0.3 * torch.randn(n, h, generator=gen)
    hidden, weight = hidden.to(DEVICE, torch.bfloat16), weight.to(DEVICE, torch.bfloat16)
    targets = popular[torch.randint(0, 100, (n,), generator=gen)].to(DEVICE)
    grad_out = torch.randn(n, generator=gen).to(DEVICE)
    order = op.mean_logit_order(hidden, weight, None)
    mean_logit = (hidden.double() @ weight.double().T).mean(0)
    assert set(order[:100].tolist()) == set(popular.tolist())  # the popular ids lead the order
    assert bool((mean_logit[order.long()].diff() <= 0.07).all())  # descending, to bf16's rounding near 10

    with recording_tile_survival() as sorted_survival:
        ordered = grads(hidden, weight, targets, grad_out, backend="triton", filter=True)
    identity = torch.arange(v, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(op, "mean_logit_order", lambda *args: identity)
    with recording_tile_survival() as id_survival:
        unordered = grads(hidden, weight, targets, grad_out, backend="triton", filter=True)
    assert sorted_survival.fraction <= 2 / 24 < 0.5 < id_survival.fraction
    exact = grads(hidden, weight, targets, grad_out, backend="triton", filter=False)
    truth = grads(hidden, weight, targets, grad_out, fn=linear_logprobs_ref, dtype=torch.float64)
    allowed = bound(hidden, weight, targets, grad_out, torch.finfo(torch.bfloat16).eps / 32)
    for got in (ordered, unordered):
        assert_within_bound("grad_hidden", got[0], exact[0], truth[0], allowed[0], torch.bfloat16)
        assert_within_bound("grad_weight", got[1], exact[1], truth[1], allowed[1], torch.bfloat16)
