"""Fused J-BOND loss head against `fastbond.losses.jbond_loss`: value, metrics and gradients.

The Triton kernels run through the interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1): batches and lengths stay small, odd, and padded with −inf
and NaN that must not leak into the loss or the gradients.
"""

from __future__ import annotations

import pytest
import torch

from fastbond.kernels._backend import triton_available, triton_interpreted
from fastbond.kernels.jbond_loss import METRIC_NAMES, jbond_loss, jbond_objective, jbond_returns
from fastbond.kernels.jbond_loss import jbond_loss_ref as jbond_loss_reference
from fastbond.kernels.sequences import sequence_logps

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON_OK = triton_available() and (CUDA or triton_interpreted())
BACKENDS = ["chunked", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="no triton"))]


def make_batch(batch, t_policy=37, t_best=53, dtype=torch.float32, device=DEVICE, generator=None, confident=False):
    """Padded J-BOND inputs; padded positions hold −inf (policy) and NaN (best anchor)."""
    g = generator or torch.Generator().manual_seed(batch * 1000 + t_policy)

    def logps(shape):
        x = -torch.rand(shape, generator=g) * 4.0
        if confident:  # some tokens with probability near 1: log-probs near 0
            x = torch.where(torch.rand(shape, generator=g) < 0.3, -1e-4 * torch.rand(shape, generator=g), x)
        return x

    def mask(shape):
        lengths = torch.randint(0, shape[1] + 1, (shape[0],), generator=g)
        lengths[0] = shape[1]  # at least one full row
        start = torch.randint(0, 3, (shape[0],), generator=g)  # a prompt part before the response
        cols = torch.arange(shape[1])
        return (cols >= start[:, None]) & (cols < lengths[:, None])

    policy_mask = mask((batch, t_policy))
    best_mask = mask((batch, t_best))
    policy = logps((batch, t_policy)).masked_fill(~policy_mask, float("-inf"))
    best = logps((batch, t_best)).masked_fill(~best_mask, float("nan"))
    anchor = logps((batch, t_policy)).masked_fill(~policy_mask, float("nan"))
    # Integer-valued rewards from a small set: ties with one or both anchor samples are common.
    rewards = torch.randint(0, 3, (batch,), generator=g).float()
    anchor_rewards = torch.randint(0, 3, (batch, 2), generator=g).float()
    to = dict(device=device)
    return dict(
        policy_logps=policy.to(dtype).to(**to).requires_grad_(),
        policy_mask=policy_mask.to(**to),
        best_anchor_logps=best.to(dtype).to(**to).requires_grad_(),
        best_anchor_mask=best_mask.to(**to),
        anchor_logps=anchor.to(dtype).to(**to),
        rewards=rewards.to(**to),
        anchor_rewards=anchor_rewards.to(**to),
    )


def run(inputs, backend, beta, gamma, upstream=3.7):
    """Loss, metrics and the gradients of upstream·loss w.r.t. both differentiable inputs."""
    inputs = {k: (v.detach().requires_grad_() if v.requires_grad else v) for k, v in inputs.items()}
    if backend == "reference":
        loss, metrics = jbond_loss_reference(**inputs, beta=beta, gamma=gamma)
    else:
        loss, metrics = jbond_loss(**inputs, beta=beta, gamma=gamma, backend=backend)
    grads = torch.autograd.grad(loss * upstream, [inputs["policy_logps"], inputs["best_anchor_logps"]])
    return loss.detach(), metrics, grads


def truth(inputs, beta, gamma, upstream=3.7):
    """The reference in float64 on the same (already rounded) inputs: the ground truth."""
    wide = {k: (v.detach().double() if v.is_floating_point() and "logps" in k else v) for k, v in inputs.items()}
    wide["policy_logps"].requires_grad_()
    wide["best_anchor_logps"].requires_grad_()
    return run(wide, "reference", beta, gamma, upstream)


def _scale(inputs) -> float:
    """Largest masked Σ|log-prob| of a row: the magnitude fp32 sums (and their cancellations) work at."""
    total = 0.0
    for logps, mask in (("policy_logps", "policy_mask"), ("anchor_logps", "policy_mask"),
                        ("best_anchor_logps", "best_anchor_mask")):
        x = torch.where(inputs[mask].bool(), inputs[logps].detach().double().abs(), 0.0)
        total = max(total, float(x.sum(-1).max()) if x.numel() else 0.0)
    return max(total, 1.0)


def _row_sum_sensitivity(inputs, beta, gamma, ulps=1.0, draws=8) -> torch.Tensor:
    """[1 + len(METRIC_NAMES)]: how far the loss and each metric move when every sequence sum
    carries a few fp32 roundings of its own Σ|log-prob| (3× the RMS over seeded draws).

    The loss multiplies sequence sums (γ·(ℓ − a)·ℓ, A·ℓ), so a rounding of ℓ that moves
    it by u·Σ|x| moves a row's loss by about that times |ℓ|: at T = 2048 one rounding of
    each sum moves the batch loss by ~1e-2. Any fp32 summation order pays that; the
    reference can land closer by luck, which the 2× rule alone would demand.
    """
    sums, scales = [], []
    for logps, mask in (("policy_logps", "policy_mask"), ("best_anchor_logps", "best_anchor_mask"),
                        ("anchor_logps", "policy_mask")):
        keep = inputs[mask].bool()
        x = inputs[logps].detach().double()
        sums.append(torch.where(keep, x, 0.0).sum(-1))
        scales.append(torch.where(keep, x.abs(), 0.0).sum(-1))
    rewards, anchor_rewards = inputs["rewards"].double(), inputs["anchor_rewards"].double()

    def objective(seqs):
        loss, metrics = jbond_objective(*seqs, rewards, anchor_rewards, beta, gamma)[:2]
        return torch.cat([loss.reshape(1), metrics])

    base = objective(sums)
    g = torch.Generator(device=sums[0].device).manual_seed(0)
    moves = []
    for _ in range(draws):
        moved = [s + ulps * 2.0**-24 * scale * torch.randn(s.shape, generator=g, dtype=s.dtype, device=s.device)
                 for s, scale in zip(sums, scales)]
        moves.append(objective(moved) - base)
    return 3 * torch.stack(moves).pow(2).mean(0).sqrt().cpu()


def assert_matches(got, want, exact, dtype, inputs, upstream=3.7, beta=0.5, gamma=0.7):
    """Flash-attention's rule: |kernel − fp64 truth| ≤ 2·|PyTorch reference − fp64 truth| + atol, per quantity.

    atol is a few fp32 roundings of the largest row sum: advantages are differences of
    sequence sums, and summing in another order moves them by that much. The loss and
    the metrics, which multiply sums, get at least what those roundings do to them
    (`_row_sum_sensitivity`).
    """
    loss, metrics, (grad_policy, grad_best) = got
    ref_loss, ref_metrics, (ref_grad_policy, ref_grad_best) = want
    true_loss, true_metrics, (true_grad_policy, true_grad_best) = exact
    batch = grad_policy.shape[0]
    atol = 16 * 2.0**-24 * _scale(inputs)
    grad_atol = atol * abs(upstream) / batch + 1e-7
    sensitivity = dict(zip(("loss", *METRIC_NAMES), _row_sum_sensitivity(inputs, beta, gamma).tolist()))

    def check(name, value, reference, true, tol):
        assert value.dtype == reference.dtype, f"{name}: {value.dtype} vs {reference.dtype}"
        err = (value.double() - true.double()).abs().max().item() if value.numel() else 0.0
        ref_err = (reference.double() - true.double()).abs().max().item() if value.numel() else 0.0
        assert err <= 2 * ref_err + tol, f"{name}: error {err:.3g} vs reference's {ref_err:.3g} (+{tol:.3g})"

    check("loss", loss, ref_loss, true_loss, max(atol, sensitivity["loss"]))
    assert list(metrics) == list(ref_metrics)
    for name in ref_metrics:
        check(name, metrics[name], ref_metrics[name], true_metrics[name], max(atol, sensitivity[name]))
    assert grad_policy.dtype == dtype and grad_best.dtype == dtype
    check("grad policy_logps", grad_policy, ref_grad_policy, true_grad_policy, grad_atol)
    check("grad best_anchor_logps", grad_best, ref_grad_best, true_grad_best, grad_atol)


def compare(inputs, backend, beta, gamma, upstream=3.7, dtype=torch.float32, reference_inputs=None):
    reference_inputs = inputs if reference_inputs is None else reference_inputs
    got = run(inputs, backend, beta, gamma, upstream)
    want = run(reference_inputs, "reference", beta, gamma, upstream)
    assert_matches(got, want, truth(reference_inputs, beta, gamma, upstream), dtype, reference_inputs, upstream,
                   beta, gamma)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 2, 7])
@pytest.mark.parametrize("gamma", [0.0, 0.7])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_reference(backend, dtype, batch, gamma, beta):
    inputs = make_batch(batch, dtype=dtype)
    loss, _, (grad_policy, grad_best) = compare(inputs, backend, beta, gamma, dtype=dtype)
    # Nothing from the −inf / NaN padding leaks, and padded positions get no gradient.
    assert torch.isfinite(loss)
    assert torch.isfinite(grad_policy).all() and torch.isfinite(grad_best).all()
    assert (grad_policy[~inputs["policy_mask"]] == 0).all()
    assert (grad_best[~inputs["best_anchor_mask"]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_metric_names_are_the_references(backend):
    _, metrics = jbond_loss(**make_batch(2), backend=backend)
    _, ref_metrics = jbond_loss_reference(**make_batch(2))
    assert list(metrics) == list(ref_metrics)
    assert set(METRIC_NAMES) | {"loss"} == set(ref_metrics)
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_larger_batch_and_confident_tokens(backend):
    """B = 37 walks the kernel's finish loop over several blocks; tokens with p ≈ 1 included."""
    inputs = make_batch(37, t_policy=70, t_best=33, confident=True)
    compare(inputs, backend, 0.5, 0.7, upstream=-0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rewards_tied(backend):
    inputs = make_batch(5)
    inputs["rewards"] = torch.ones(5, device=DEVICE)
    inputs["anchor_rewards"] = torch.ones(5, 2, device=DEVICE)  # a tie is not "worse than both"
    got = compare(inputs, backend, 0.5, 0.0)
    assert got[1]["frac_worse_than_both"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.uint8])
def test_masks_as_numbers(backend, mask_dtype):
    inputs = make_batch(3)
    numeric = dict(inputs, policy_mask=inputs["policy_mask"].to(mask_dtype),
                   best_anchor_mask=inputs["best_anchor_mask"].to(mask_dtype))
    compare(numeric, backend, 0.5, 0.7, reference_inputs=inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reward_dtype", [torch.int64, torch.bfloat16, torch.float64])
def test_reward_dtypes(backend, reward_dtype):
    """Rewards are compared in their own dtype, and r_J is −log 16 as the reference rounds it."""
    inputs = make_batch(6)
    inputs["rewards"] = inputs["rewards"].to(reward_dtype)
    inputs["anchor_rewards"] = inputs["anchor_rewards"].to(reward_dtype)
    compare(inputs, backend, 0.5, 0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """Slices of wider tensors (a response window of the full sequence)."""
    wide = make_batch(4, t_policy=50, t_best=60)
    inputs = {k: v.detach() for k, v in wide.items()}
    for key in ("policy_logps", "policy_mask", "anchor_logps"):
        inputs[key] = inputs[key][:, 5:42]
    for key in ("best_anchor_logps", "best_anchor_mask"):
        inputs[key] = inputs[key][:, 3:56]
    inputs["anchor_rewards"] = torch.stack([wide["anchor_rewards"][:, 1], wide["anchor_rewards"][:, 0]], dim=0).t()
    inputs["policy_logps"].requires_grad_()
    inputs["best_anchor_logps"].requires_grad_()
    assert not inputs["anchor_rewards"].is_contiguous()
    compare(inputs, backend, 0.3, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_policy_requires_grad(backend):
    inputs = make_batch(3)
    inputs["best_anchor_logps"] = inputs["best_anchor_logps"].detach()
    inputs["anchor_logps"] = inputs["anchor_logps"].requires_grad_()  # detached inside, like the reference
    loss, _ = jbond_loss(**inputs, backend=backend)
    loss.backward()
    ref = {k: (v.detach().requires_grad_() if k == "policy_logps" else v) for k, v in inputs.items()}
    ref_loss, _ = jbond_loss_reference(**ref)
    ref_loss.backward()
    torch.testing.assert_close(inputs["policy_logps"].grad, ref["policy_logps"].grad, rtol=1e-5, atol=1e-6)
    assert inputs["anchor_logps"].grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs(backend):
    """fp64 log-probs keep fp64 arithmetic (triton hands them to the chunked path)."""
    inputs = make_batch(4, dtype=torch.float64)
    got, want = run(inputs, backend, 0.5, 0.7), run(inputs, "reference", 0.5, 0.7)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[2][0], want[2][0], rtol=1e-12, atol=1e-12)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-12, atol=1e-12, check_dtype=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_inputs(backend):
    inputs = make_batch(3, dtype=torch.float16)
    compare(inputs, backend, 0.5, 0.7, dtype=torch.float16)


def test_auto_backend_on_cpu_is_chunked():
    inputs = make_batch(2, device="cpu")
    compare(inputs, "auto", 0.5, 0.7)


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(beta=1.5), "beta"),
        (dict(gamma=-0.1), "gamma"),
        (dict(rewards=torch.zeros(3)), "rewards"),
        (dict(anchor_rewards=torch.zeros(2, 3)), r"\[2, 2\]|anchor_rewards"),
        (dict(policy_mask=torch.ones(2, 5, dtype=torch.bool)), "differ in shape"),
        (dict(anchor_logps=torch.zeros(2, 4)), "differ in shape"),
    ],
)
def test_validation(backend, change, message):
    if backend == "triton" and not TRITON_OK:
        pytest.skip("no triton")
    args = dict(
        policy_logps=torch.zeros(2, 7), policy_mask=torch.ones(2, 7, dtype=torch.bool),
        best_anchor_logps=torch.zeros(2, 5), best_anchor_mask=torch.ones(2, 5, dtype=torch.bool),
        anchor_logps=torch.zeros(2, 7), rewards=torch.zeros(2), anchor_rewards=torch.zeros(2, 2),
    )
    change = dict(change)  # the parameter dict is shared between backends
    beta, gamma = change.pop("beta", 0.5), change.pop("gamma", 0.0)
    args.update(change)
    args = {k: v.to(DEVICE) for k, v in args.items()}
    with pytest.raises(ValueError, match=message):
        if backend == "reference":
            jbond_loss_reference(**args, beta=beta, gamma=gamma)
        else:
            jbond_loss(**args, beta=beta, gamma=gamma, backend=backend)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch, length", [(128, 512), (512, 2048), (300, 4001)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_real_sizes(batch, length, dtype):
    inputs = make_batch(batch, t_policy=length, t_best=length - 17, dtype=dtype)
    loss, _, (grad_policy, _) = compare(inputs, "triton", 0.5, 0.7, dtype=dtype)
    # The finish step runs in one program in a fixed order: bitwise reproducible.
    again = run(inputs, "triton", 0.5, 0.7)
    assert torch.equal(again[0], loss) and torch.equal(again[2][0], grad_policy)


def share_sums(inputs, shares):
    """For each share, a `batch_sum` adding the other shares' [Σ R, count]: what an
    all-reduce over ranks holding these shares returns."""
    returns = jbond_returns(sequence_logps(inputs["policy_logps"], inputs["policy_mask"]),
                            sequence_logps(inputs["anchor_logps"], inputs["policy_mask"]),
                            inputs["rewards"], inputs["anchor_rewards"]).double()
    local = [torch.stack([returns[rows].sum(), torch.tensor(float(rows.stop - rows.start), dtype=torch.float64)])
             for rows in shares]
    whole = sum(local)
    return [lambda mine, own=own: mine + (whole - own) for own in local]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("beta,gamma", [(0.5, 0.0), (1.0, 0.7)])
def test_batch_baseline_over_two_shares_equals_the_whole_batch(backend, beta, gamma):
    """A batch split in two shares (as over 2 ranks), each summing its returns with the other's
    through `batch_sum`: the size-weighted losses and the gradients (scaled by share / batch, the
    gradient average over ranks of equal shares) are the whole batch's."""
    inputs = make_batch(7)
    whole, _, (grad_policy, grad_best) = run(inputs, backend, beta, gamma)
    shares = (slice(0, 3), slice(3, 7))
    losses, policy_grads, best_grads = [], [], []
    for rows, batch_sum in zip(shares, share_sums(inputs, shares)):
        share = {k: (v.detach()[rows].requires_grad_() if v.requires_grad else v[rows]) for k, v in inputs.items()}
        kwargs = dict(beta=beta, gamma=gamma, batch_sum=batch_sum)
        if backend == "reference":
            loss, _ = jbond_loss_reference(**share, **kwargs)
        else:
            loss, _ = jbond_loss(**share, **kwargs, backend=backend)
        size = rows.stop - rows.start
        grads = torch.autograd.grad(loss * 3.7 * size / 7, [share["policy_logps"], share["best_anchor_logps"]])
        losses.append(loss.detach() * size / 7)
        policy_grads.append(grads[0])
        best_grads.append(grads[1])
    torch.testing.assert_close(sum(losses), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(policy_grads), grad_policy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(best_grads), grad_best, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_a_share_without_batch_sum_takes_its_own_baseline(backend):
    """Without `batch_sum` each share's baseline is its own rows': different gradients."""
    inputs = make_batch(7)
    _, _, (grad_policy, _) = run(inputs, backend, 1.0, 0.0)
    rows = slice(0, 3)
    share = {k: (v.detach()[rows].requires_grad_() if v.requires_grad else v[rows]) for k, v in inputs.items()}
    loss, _ = jbond_loss(**share, beta=1.0, gamma=0.0, backend=backend)
    own = torch.autograd.grad(loss * 3.7 * 3 / 7, [share["policy_logps"]])[0]
    assert not torch.allclose(own, grad_policy[rows], rtol=1e-4, atol=1e-6)
