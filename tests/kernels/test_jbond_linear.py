"""jbond_linear_loss: the fused-linear J-BOND loss against a padded fp64 oracle.

Ground truth is written here, independently of the module: full fp64 logits →
log_softmax → gather → one padded row per sequence (a Python loop over the
sequence ids) → `fastbond.losses.jbond_loss`, differentiated by autograd. The
fused op must match its loss, every metric and the gradients w.r.t. both sets
of hidden states, the LM head and its bias, under the flash-attention rule
|kernel − truth| ≤ 2·|torch − truth| + atol, with `torch` the same oracle run
as a model would in the inputs' dtype (F.linear in that dtype, fp32 softmax).

Shapes are odd (B = 5 sequences of lengths 1…9, H = 48, V = 1031), tokens
are packed in shuffled order, some have p(target) ≈ 1, and the upstream
gradient is not 1. The Triton backend runs through the CPU interpreter
(tests/conftest.py). The no-wasted-pass claim of the module docstring is
checked by counting matmul flops and linear_logprobs passes.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fastbond.bon import jbond_reward
from fastbond.kernels._backend import triton_available, triton_interpreted
from fastbond.kernels.jbond_linear import jbond_linear_loss, jbond_linear_loss_ref
from fastbond.kernels.jbond_loss import jbond_loss_ref as jbond_loss_reference
from fastbond.kernels.sequences import leave_one_out_baseline

lin = importlib.import_module("fastbond.kernels.linear_logprobs")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON_OK = triton_available() and (CUDA or triton_interpreted())
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton on CUDA or TRITON_INTERPRET=1")
BACKENDS = ["chunked", pytest.param("triton", marks=needs_triton)]
EPS32 = 2.0**-24
UPSTREAM = -2.5
POLICY_LENGTHS = (3, 1, 9, 6, 1)
BEST_LENGTHS = (5, 2, 1, 8, 4)
HEAD = dict(temperature=0.8, softcap=30.0)  # Gemma-2's cap, T ≠ 1


# ----------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------


def make_case(policy_lengths=POLICY_LENGTHS, best_lengths=BEST_LENGTHS, h=48, v=1031, dtype=torch.float32,
              bias=True, shuffle=True, dominant=3, seed=0, device=DEVICE):
    """Packed J-BOND inputs; `dominant` tokens per set with p(target) ≈ 1; rewards in {0, 1, 2} (ties)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(policy_lengths)
    weight = torch.randn(v, h, generator=gen) * (2.0 / h**0.5)  # logits of std ≈ 2

    def token_set(lengths):
        seq_ids = torch.arange(batch).repeat_interleave(torch.tensor(lengths, dtype=torch.int64))
        if shuffle:
            seq_ids = seq_ids[torch.randperm(seq_ids.shape[0], generator=gen)]
        n = seq_ids.shape[0]
        hidden = torch.randn(n, h, generator=gen)
        targets = torch.randint(0, v, (n,), generator=gen)
        rows = torch.randperm(n, generator=gen)[:dominant]
        w_t = weight[targets[rows]]
        hidden[rows] = 30.0 * w_t / w_t.square().sum(1, keepdim=True)  # h·w_target = 30 ≫ other logits
        return hidden, targets, seq_ids, rows

    policy_hidden, policy_targets, policy_ids, policy_dominant = token_set(policy_lengths)
    best_hidden, best_targets, best_ids, _ = token_set(best_lengths)
    to = dict(dtype=dtype, device=device)
    return dict(
        policy_hidden=policy_hidden.to(**to),
        policy_targets=policy_targets.to(device),
        policy_seq_ids=policy_ids.to(device),
        best_hidden=best_hidden.to(**to),
        best_targets=best_targets.to(device),
        best_seq_ids=best_ids.to(device),
        weight=weight.to(**to),
        bias=(torch.randn(v, generator=gen) * 0.5).to(**to) if bias else None,
        anchor_token_logps=(-torch.rand(policy_ids.shape[0], generator=gen) * 8.0).to(device),
        rewards=torch.randint(0, 3, (batch,), generator=gen).float().to(device),
        anchor_rewards=torch.randint(0, 3, (batch, 2), generator=gen).float().to(device),
        policy_dominant=policy_dominant.to(device),
    )


DIFFERENTIABLE = ("policy_hidden", "best_hidden", "weight", "bias")
ARGS = ("policy_hidden", "policy_targets", "policy_seq_ids", "best_hidden", "best_targets", "best_seq_ids",
        "weight", "anchor_token_logps", "rewards", "anchor_rewards")  # jbond_linear_loss's positional order


def positional(case, leaves=None):
    """jbond_linear_loss's positional arguments from a case, differentiable ones from `leaves` if given."""
    leaves = leaves or {}
    return [leaves.get(k, case[k]) for k in ARGS]


def _leaves(case, dtype=None):
    return {k: case[k].detach().to(dtype or case[k].dtype).clone().requires_grad_()
            for k in DIFFERENTIABLE if case[k] is not None}


def _padded(values, seq_ids, batch):
    """[N] → [B, T] rows in packed order, by a plain loop: independent of the module's scatter."""
    rows = [values[(seq_ids == b).nonzero().squeeze(1)] for b in range(batch)]
    lengths = torch.tensor([r.shape[0] for r in rows])
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True) if lengths.max() > 0 else \
        values.new_zeros((batch, 0))
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    return padded, mask.to(values.device)


def _token_logps(hidden, weight, bias, targets, lowp, head):
    """fp64 (or the model's own low-precision) logits → log_softmax → gather; and the token entropy."""
    if lowp:
        logits = F.linear(hidden, weight, bias).float()
    else:
        logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    if head.get("softcap") is not None:
        logits = head["softcap"] * torch.tanh(logits / head["softcap"])
    logprobs = torch.log_softmax(logits / head.get("temperature", 1.0), dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs.gather(1, targets[:, None]).squeeze(1), entropy


def oracle(case, beta, gamma, *, lowp=False, upstream=UPSTREAM, head=HEAD):
    """(loss, metrics, grads, token log-probs) of the padded composition, fp64 or in the inputs' dtype."""
    leaves = _leaves(case, dtype=None if lowp else torch.float64)
    batch = case["rewards"].shape[0]
    bias = leaves.get("bias")
    policy_logp, policy_ent = _token_logps(leaves["policy_hidden"], leaves["weight"], bias, case["policy_targets"],
                                           lowp, head)
    best_logp, _ = _token_logps(leaves["best_hidden"], leaves["weight"], bias, case["best_targets"], lowp, head)
    policy_rows, policy_mask = _padded(policy_logp, case["policy_seq_ids"], batch)
    best_rows, best_mask = _padded(best_logp, case["best_seq_ids"], batch)
    anchor_rows, _ = _padded(case["anchor_token_logps"].to(policy_logp.dtype), case["policy_seq_ids"], batch)
    loss, metrics = jbond_loss_reference(policy_rows, policy_mask, best_rows, best_mask, anchor_rows,
                                         case["rewards"], case["anchor_rewards"], beta=beta, gamma=gamma)
    metrics["policy_entropy"] = policy_ent.detach().mean()
    (loss * upstream).backward()
    grads = {k: t.grad if t.grad is not None else torch.zeros_like(t) for k, t in leaves.items()}  # N_b = 0
    return loss.detach(), metrics, grads, (policy_logp.detach(), best_logp.detach())


def fused(case, beta, gamma, *, upstream=UPSTREAM, head=HEAD, **kwargs):
    leaves = _leaves(case)
    loss, metrics = jbond_linear_loss(*positional(case, leaves), beta=beta, gamma=gamma, bias=leaves.get("bias"),
                                      return_entropy=True, **head, **kwargs)
    (loss * upstream).backward()
    return loss.detach(), metrics, {k: t.grad for k, t in leaves.items()}


def _magnitude(token_logps, case) -> float:
    """Largest Σ|log-prob| of a sequence: what fp32 sums and their cancellations work at."""
    batch = case["rewards"].shape[0]
    total = torch.zeros(batch, dtype=torch.float64, device=case["rewards"].device)
    pairs = ((token_logps[0], case["policy_seq_ids"]), (token_logps[1], case["best_seq_ids"]),
             (case["anchor_token_logps"], case["policy_seq_ids"]))
    for values, ids in pairs:
        total.index_add_(0, ids, values.double().abs())
    return max(float(total.max()), 1.0)


QUADRATIC = {"loss", "backward_term"}  # products of two sequence sums


def assert_matches(got, torch_ref, truth, dtype, case):
    """|got − truth| ≤ 2·|torch_ref − truth| + atol, per quantity.

    atol of the scalars: a few fp32 roundings of the largest sequence sum m
    (of m² for those that multiply two sums) — summing in another order moves
    them by that much; the fused op's log-probs are fp32 whatever the input
    dtype, so the same atol holds in 16-bit. Gradients: relative to their max.
    """
    loss, metrics, grads = got
    ref_loss, ref_metrics, ref_grads = torch_ref
    true_loss, true_metrics, true_grads, token_logps = truth
    m = _magnitude(token_logps, case)
    lowp = dtype != torch.float32

    def check(name, value, reference, true, atol):
        if value.numel() == 0:
            return
        err = (value.double() - true.double()).abs().max().item()
        ref_err = (reference.double() - true.double()).abs().max().item()
        assert err <= 2 * ref_err + atol, f"{name}: error {err:.3g} vs torch's {ref_err:.3g} (+{atol:.3g})"

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert list(metrics) == list(true_metrics)
    scalar_tol = 8 * EPS32 * m
    check("loss", loss, ref_loss, true_loss, scalar_tol * m)
    for name in true_metrics:
        assert metrics[name].dim() == 0 and not metrics[name].requires_grad, name
        check(name, metrics[name], ref_metrics[name], true_metrics[name], scalar_tol * (m if name in QUADRATIC else 1))
    assert set(grads) == set(true_grads)
    for name, grad in grads.items():
        assert grad.dtype == dtype and grad.shape == true_grads[name].shape, name
        scale = true_grads[name].abs().max().item() if grad.numel() else 0.0
        check(f"grad {name}", grad, ref_grads[name], true_grads[name], (1e-3 if lowp else 2e-6) * scale + 1e-7)


def compare(case, backend, beta, gamma, dtype=torch.float32, head=HEAD, upstream=UPSTREAM, **kwargs):
    truth = oracle(case, beta, gamma, head=head, upstream=upstream)
    torch_ref = oracle(case, beta, gamma, lowp=True, head=head, upstream=upstream)[:3]
    got = fused(case, beta, gamma, backend=backend, head=head, upstream=upstream, **kwargs)
    assert_matches(got, torch_ref, truth, dtype, case)
    return got, truth


# ----------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.7])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_padded_fp64_oracle(backend, beta, gamma):
    case = make_case()
    # the case is what it claims: dominant tokens with p(target) ≈ 1
    truth = oracle(case, beta, gamma)
    assert truth[3][0][case["policy_dominant"]].min() > -1e-3
    (loss, metrics, grads), _ = compare(case, backend, beta, gamma, chunk_size=256)  # ragged chunks: 1031 = 4·256 + 7
    assert torch.isfinite(loss)
    if beta == 1.0:  # no forward term: the better-anchor tokens get no gradient
        assert grads["best_hidden"].abs().max() == 0
    else:
        assert grads["best_hidden"].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_inputs(backend, dtype):
    case = make_case(dtype=dtype, seed=1)
    compare(case, backend, 0.5, 0.7, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_head_contiguous_sequences(backend):
    """No bias, no cap, T = 1, sequences packed back to back (the usual layout)."""
    case = make_case(bias=False, shuffle=False, seed=2)
    compare(case, backend, 0.5, 0.7, head={}, upstream=1.0)


def test_reference_backend_and_auto():
    case = make_case()
    truth = oracle(case, 0.5, 0.7)
    torch_ref = oracle(case, 0.5, 0.7, lowp=True)[:3]
    assert_matches(fused(case, 0.5, 0.7, backend="reference"), torch_ref, truth, torch.float32, case)
    if not CUDA:  # auto is chunked off CUDA: the very same numbers
        auto, chunked = fused(case, 0.5, 0.7), fused(case, 0.5, 0.7, backend="chunked")
        assert torch.equal(auto[0], chunked[0])
        for name in auto[2]:
            assert torch.equal(auto[2][name], chunked[2][name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequences_of_different_lengths_are_summed_apart(backend):
    """ℓ, ℓ₂ per sequence equal the sum of that sequence's token log-probs, whatever the packing.

    Lengths 0 (an empty better-anchor sample), 1 and 11; int32 ids; the same
    tokens packed in two orders give the same loss, and gradients that follow
    their tokens.
    """
    case = make_case(policy_lengths=(1, 11, 4, 2), best_lengths=(3, 0, 1, 7), shuffle=False, bias=False, seed=3)
    batch = 4
    _, metrics, grads = fused(case, 0.5, 0.7, backend=backend)
    kw = dict(**HEAD, backend=backend)
    token_policy = lin.linear_logprobs(case["policy_hidden"], case["weight"], case["policy_targets"], **kw)
    token_best = lin.linear_logprobs(case["best_hidden"], case["weight"], case["best_targets"], **kw)
    ell = torch.stack([token_policy[case["policy_seq_ids"] == b].sum() for b in range(batch)])
    ell2 = torch.stack([token_best[case["best_seq_ids"] == b].sum() for b in range(batch)])
    anchor = torch.stack([case["anchor_token_logps"][case["policy_seq_ids"] == b].sum() for b in range(batch)])
    assert ell2[1] == 0  # the empty sample
    torch.testing.assert_close(metrics["policy_logp"], ell.mean(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(metrics["best_anchor_logp"], ell2.mean(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(metrics["kl_anchor"], (ell - anchor).mean(), rtol=1e-6, atol=1e-5)

    perm_p = torch.randperm(case["policy_seq_ids"].shape[0], device=DEVICE)
    perm_b = torch.randperm(case["best_seq_ids"].shape[0], device=DEVICE)
    shuffled = dict(case)
    for key in ("policy_hidden", "policy_targets", "anchor_token_logps"):
        shuffled[key] = case[key][perm_p]
    for key in ("best_hidden", "best_targets"):
        shuffled[key] = case[key][perm_b]
    shuffled["policy_seq_ids"] = case["policy_seq_ids"][perm_p].int()
    shuffled["best_seq_ids"] = case["best_seq_ids"][perm_b].int()
    loss2, _, grads2 = fused(shuffled, 0.5, 0.7, backend=backend)

    def close(got, want):  # another packing is another fp32 summation order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())

    close(loss2, fused(case, 0.5, 0.7, backend=backend)[0])
    close(grads2["policy_hidden"], grads["policy_hidden"][perm_p])
    close(grads2["best_hidden"], grads["best_hidden"][perm_b])
    close(grads2["weight"], grads["weight"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_one_and_empty_best_set(backend):
    """B = 1 (baseline 0) with no better-anchor tokens at all (N_b = 0)."""
    case = make_case(policy_lengths=(6,), best_lengths=(0,), seed=4)
    compare(case, backend, 0.5, 0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_gives_hidden_grads_only(backend):
    case = make_case(bias=False, seed=5)
    policy_hidden = case["policy_hidden"].clone().requires_grad_()
    best_hidden = case["best_hidden"].clone().requires_grad_()
    leaves = dict(policy_hidden=policy_hidden, best_hidden=best_hidden)
    loss, _ = jbond_linear_loss(*positional(case, leaves), beta=0.5, gamma=0.7, backend=backend, **HEAD)
    (loss * UPSTREAM).backward()
    _, _, true_grads, _ = oracle(case, 0.5, 0.7)
    for name, grad in (("policy_hidden", policy_hidden.grad), ("best_hidden", best_hidden.grad)):
        torch.testing.assert_close(grad.double(), true_grads[name], rtol=1e-5,
                                   atol=1e-5 * true_grads[name].abs().max().item())
    assert case["weight"].grad is None


# ----------------------------------------------------------------------------
# no wasted pass: one linear_logprobs forward, one backward, the GEMMs of linear_logprobs alone
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pass_each_way_with_closed_form_token_weights(backend, monkeypatch):
    """linear_logprobs runs once forward on N_p + N_b tokens and once backward, with grad_output
    w = g·(−β·A + γ·(ℓ − a))/B on policy tokens and −g·(1−β)/B on better-anchor tokens."""
    calls = {"forward": [], "backward": []}
    forward, backward = lin._FORWARD[backend], lin._BACKWARD[backend]

    def counted_forward(hidden, *args):
        calls["forward"].append(hidden.shape[0])
        return forward(hidden, *args)

    def counted_backward(hidden, weight, bias, targets, valid, lse, g, *args):
        calls["backward"].append(g.detach().clone())
        return backward(hidden, weight, bias, targets, valid, lse, g, *args)

    monkeypatch.setitem(lin._FORWARD, backend, counted_forward)
    monkeypatch.setitem(lin._BACKWARD, backend, counted_backward)
    case = make_case(seed=6)
    n_policy, n_best = case["policy_targets"].shape[0], case["best_targets"].shape[0]
    beta, gamma, batch = 0.5, 0.7, case["rewards"].shape[0]
    fused(case, beta, gamma, backend=backend)
    assert calls["forward"] == [n_policy + n_best]
    assert len(calls["backward"]) == 1

    # the closed form, from the fp64 oracle's sequence sums
    _, _, _, (policy_logp, _) = oracle(case, beta, gamma)
    ids = case["policy_seq_ids"]
    ell = torch.zeros(batch, dtype=torch.float64, device=DEVICE).index_add_(0, ids, policy_logp)
    anchor = torch.zeros_like(ell).index_add_(0, ids, case["anchor_token_logps"].double())
    returns = jbond_reward(case["rewards"], case["anchor_rewards"]).double() - (ell - anchor)
    advantages = returns - leave_one_out_baseline(returns)
    w_policy = UPSTREAM * (-beta * advantages + gamma * (ell - anchor)) / batch  # [B]
    expected = torch.cat([w_policy[ids], torch.full((n_best,), -UPSTREAM * (1 - beta) / batch, device=DEVICE,
                                                    dtype=torch.float64)])
    g = calls["backward"][0]
    torch.testing.assert_close(g.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # several sequences, several distinct weights: not a uniform grad_output
    assert torch.unique(g[:n_policy]).numel() > 1

    calls["forward"].clear(), calls["backward"].clear()
    with torch.no_grad():
        fused_no_grad = jbond_linear_loss(*positional(case), bias=case["bias"], backend=backend, **HEAD)
    assert fused_no_grad[0].grad_fn is None
    assert calls == {"forward": [n_policy + n_best], "backward": []}


def _share(case, sequences):
    """The case restricted to `sequences` (a rank's share of the batch), ids renumbered from 0."""
    index = torch.tensor(sequences, device=DEVICE)
    renumber = torch.full((case["rewards"].shape[0],), -1, dtype=torch.int64, device=DEVICE)
    renumber[index] = torch.arange(len(sequences), device=DEVICE)
    share = dict(case, rewards=case["rewards"][index], anchor_rewards=case["anchor_rewards"][index])
    for prefix in ("policy", "best"):
        keep = renumber[case[f"{prefix}_seq_ids"]] >= 0
        share[f"{prefix}_hidden"] = case[f"{prefix}_hidden"][keep]
        share[f"{prefix}_targets"] = case[f"{prefix}_targets"][keep]
        share[f"{prefix}_seq_ids"] = renumber[case[f"{prefix}_seq_ids"][keep]]
        if prefix == "policy":
            share["anchor_token_logps"] = case["anchor_token_logps"][keep]
    return share


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_batch_sum_over_two_shares_equals_the_whole_batch(backend):
    """Two shares (as on 2 ranks), each summing its returns with the other's through `batch_sum`:
    the share-weighted losses and head gradients are the whole batch's (the gradient average
    over ranks); without `batch_sum` each share's baseline is its own and the gradient differs."""
    case = make_case(seed=4)
    batch, beta, gamma = case["rewards"].shape[0], 0.5, 0.7
    whole_loss, _, whole_grads = fused(case, beta, gamma, backend=backend)
    _, _, _, (policy_logp, _) = oracle(case, beta, gamma)
    ids = case["policy_seq_ids"]
    ell = torch.zeros(batch, dtype=torch.float64, device=DEVICE).index_add_(0, ids, policy_logp)
    anchor = torch.zeros_like(ell).index_add_(0, ids, case["anchor_token_logps"].double())
    returns = jbond_reward(case["rewards"], case["anchor_rewards"]).double() - (ell - anchor)
    shares = [[0, 3], [1, 2, 4]]
    local = [torch.stack([returns[s].sum(), torch.tensor(float(len(s)), dtype=torch.float64, device=DEVICE)])
             for s in shares]
    whole = sum(local)

    def run_shares(with_batch_sum: bool):
        total_loss, weight_grad = 0.0, 0.0
        for sequences, own in zip(shares, local):
            share = _share(case, sequences)
            leaves = _leaves(share)
            extra = dict(batch_sum=lambda mine, other=whole - own: mine + other.to(mine)) if with_batch_sum else {}
            loss, _ = jbond_linear_loss(*positional(share, leaves), beta=beta, gamma=gamma, bias=leaves["bias"],
                                        backend=backend, **HEAD, **extra)
            scale = len(sequences) / batch
            (loss * UPSTREAM * scale).backward()
            total_loss = total_loss + loss.detach() * scale
            weight_grad = weight_grad + leaves["weight"].grad
        return total_loss, weight_grad

    total_loss, weight_grad = run_shares(True)
    torch.testing.assert_close(total_loss, whole_loss, rtol=1e-5, atol=1e-5)
    scale = whole_grads["weight"].abs().max().item()
    torch.testing.assert_close(weight_grad, whole_grads["weight"], rtol=1e-4, atol=1e-5 * scale)
    _, own_baseline_grad = run_shares(False)
    assert not torch.allclose(own_baseline_grad, whole_grads["weight"], rtol=1e-3, atol=1e-3 * scale)


def test_gemm_flops_are_those_of_linear_logprobs_alone():
    """Counted on the chunked backend (every GEMM is a torch matmul there):
    with grad 8·N·H·V = linear_logprobs fwd+bwd alone; frozen head 6·N·H·V; no grad 2·N·H·V."""
    case = make_case(device="cpu", seed=7)
    n = case["policy_targets"].shape[0] + case["best_targets"].shape[0]
    v, h = case["weight"].shape
    nhv = n * h * v

    def flops(fn):
        with MatmulFlops() as counter:
            fn()
        return counter.flops

    def train_step(frozen_head=False):
        leaves = _leaves(case)
        if frozen_head:
            leaves["weight"] = case["weight"]
            leaves["bias"] = case["bias"]
        loss, _ = jbond_linear_loss(*positional(case, leaves), bias=leaves["bias"], backend="chunked", chunk_size=300,
                                    **HEAD)
        (loss * UPSTREAM).backward()

    def logprobs_alone():
        leaves = _leaves(case)
        hidden = torch.cat([leaves["policy_hidden"], leaves["best_hidden"]])
        targets = torch.cat([case["policy_targets"], case["best_targets"]])
        logp = lin.linear_logprobs(hidden, leaves["weight"], targets, bias=leaves["bias"], backend="chunked",
                                   chunk_size=300, **HEAD)
        (logp * torch.randn(n)).sum().backward()

    def no_grad():
        with torch.no_grad():
            jbond_linear_loss(*positional(case), bias=case["bias"], backend="chunked", chunk_size=300, **HEAD)

    assert flops(logprobs_alone) == 8 * nhv
    assert flops(train_step) == 8 * nhv
    assert flops(lambda: train_step(frozen_head=True)) == 6 * nhv
    assert flops(no_grad) == 2 * nhv


# ----------------------------------------------------------------------------
# memory: no [N, V] tensor
# ----------------------------------------------------------------------------


class MatmulFlops(TorchDispatchMode):
    """2·m·k·n for every matmul that reaches ATen, in-place ones included (addmm_, the fp32 grad_h accumulator)."""

    MATMULS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.addmm.default: (1, 2),
               torch.ops.aten.addmm_.default: (1, 2), torch.ops.aten.mm.out: (0, 1), torch.ops.aten.addmm.out: (1, 2)}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.MATMULS:
            i, j = self.MATMULS[func]
            (m, k), n = args[i].shape, args[j].shape[1]
            self.flops += 2 * m * k * n
        elif func.name().startswith(("aten::bmm", "aten::baddbmm", "aten::matmul", "aten::addmv", "aten::mv",
                                     "aten::dot", "aten::linear")):
            raise AssertionError(f"uncounted matmul {func}")
        return func(*args, **(kwargs or {}))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor, in bytes, any op produces (views included)."""

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
    lengths = (40, 1, 70, 17)
    case = make_case(policy_lengths=lengths, best_lengths=lengths[::-1], h=16, v=1031, device="cpu", seed=8)
    n, h, v, chunk = 2 * sum(lengths), 16, 1031, 128
    leaves = _leaves(case)
    with LargestTensor() as mode:
        loss, _ = jbond_linear_loss(*positional(case, leaves), bias=leaves["bias"], backend=backend,
                                    chunk_size=chunk, return_entropy=True, **HEAD)
        loss.backward()
    logits_bytes = n * v * 4  # fp32 [N, V]
    if backend == "reference":
        assert mode.largest >= logits_bytes // 2  # per set: the oracle does see the logits
    else:
        assert mode.largest < logits_bytes // 4, f"{backend}: a {mode.largest}-byte tensor (logits: {logits_bytes})"
        assert mode.largest <= 4 * max(n * chunk, v * h, n * h)


# ----------------------------------------------------------------------------
# errors a caller can make
# ----------------------------------------------------------------------------


def _bad_inputs():
    case = make_case(policy_lengths=(2, 1, 3), best_lengths=(1, 2, 2), h=8, v=11, dominant=0, device="cpu")
    c = {k: case[k] for k in ARGS}
    return c, [
        (ValueError, r"policy_seq_ids must lie in \[0, B\) with B = len\(rewards\) = 2",
         dict(rewards=c["rewards"][:2], anchor_rewards=c["anchor_rewards"][:2])),
        (ValueError, r"best_seq_ids must lie in \[0, B\)", dict(best_seq_ids=c["best_seq_ids"] - 1)),
        (ValueError, r"anchor_rewards must be \[B, 2\] = \[3, 2\]", dict(anchor_rewards=c["anchor_rewards"][:2])),
        (ValueError, r"anchor_rewards must be \[B, 2\]", dict(anchor_rewards=c["rewards"])),
        (ValueError, "rewards must be a non-empty 1-D tensor", dict(rewards=c["anchor_rewards"])),
        (ValueError, "rewards must be a non-empty 1-D tensor", dict(rewards=c["rewards"][:0])),
        (ValueError, r"anchor_token_logps must have shape \[N_p\] = \(6,\)", dict(anchor_token_logps=c["rewards"])),
        (ValueError, r"policy_targets must have shape \[N\] = \(6,\)", dict(policy_targets=c["best_targets"][:4])),
        (ValueError, r"best_seq_ids must have shape \[N\] = \(5,\)", dict(best_seq_ids=c["policy_seq_ids"])),
        (TypeError, "policy_seq_ids must be int64", dict(policy_seq_ids=c["policy_seq_ids"].float())),
        (ValueError, r"best_hidden must be \[N, H\] with H = 8", dict(best_hidden=c["best_hidden"][:, :7])),
        (ValueError, r"weight must be a 2-D tensor", dict(weight=c["weight"][0])),
        (TypeError, "must share a dtype", dict(best_hidden=c["best_hidden"].half())),
        (TypeError, "anchor_token_logps must be floating point", dict(anchor_token_logps=c["policy_targets"])),
        (ValueError, r"policy_targets must lie in \[0, 11\) \(packed tokens: nothing is ignored\)",
         dict(policy_targets=c["policy_targets"].masked_fill(c["policy_seq_ids"] == 0, -100))),
        (ValueError, r"best_targets must lie in \[0, 11\)", dict(best_targets=c["best_targets"] + 11)),
        (ValueError, "beta must lie in", dict(beta=1.5)),
        (ValueError, "gamma must be >= 0", dict(gamma=-0.1)),
        (ValueError, "unknown backend", dict(backend="cuda")),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs()[1])))
def test_bad_inputs_raise_clear_errors(index):
    good, cases = _bad_inputs()
    exc, message, override = cases[index]
    args = dict(good, **override)
    tensors = [args.pop(k) for k in ARGS]
    with pytest.raises(exc, match=message):
        jbond_linear_loss(*tensors, backend=args.pop("backend", "chunked"), **args)


def test_reference_function_is_importable_and_agrees_with_the_oracle():
    case = make_case(seed=9)
    wide = {k: case[k].double() for k in ("policy_hidden", "best_hidden", "weight")}
    loss, metrics = jbond_linear_loss_ref(
        *positional(case, wide), beta=0.3, gamma=0.2, bias=case["bias"].double(), return_entropy=True, **HEAD)
    true_loss, true_metrics, _, _ = oracle(case, 0.3, 0.2)
    torch.testing.assert_close(loss, true_loss, rtol=1e-12, atol=1e-9)
    for name in true_metrics:
        torch.testing.assert_close(metrics[name].double(), true_metrics[name].double(), rtol=1e-12, atol=1e-9)


# ----------------------------------------------------------------------------
# CUDA, real-ish shapes
# ----------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_bf16_real_shape_and_reproducible():
    """B = 32 sequences of 64…256 tokens, Gemma-like H, a 32k vocabulary, bf16; bitwise reproducible."""
    gen = torch.Generator().manual_seed(10)
    policy_lengths = tuple(torch.randint(64, 257, (32,), generator=gen).tolist())
    best_lengths = tuple(torch.randint(64, 257, (32,), generator=gen).tolist())
    case = make_case(policy_lengths, best_lengths, h=2048, v=32000, dtype=torch.bfloat16, dominant=64, seed=10)
    assert not torch.backends.cuda.matmul.allow_tf32
    got = fused(case, 0.5, 0.7, backend="triton")
    truth_fp32 = oracle(dict(case, **{k: case[k].float() for k in ("policy_hidden", "best_hidden", "weight", "bias")}),
                        0.5, 0.7, lowp=True)
    torch_ref = oracle(case, 0.5, 0.7, lowp=True)[:3]
    # fp32 logits are the truth here (fp64 [N, V] at this size is needlessly slow)
    truth = (truth_fp32[0].double(), {k: v.double() for k, v in truth_fp32[1].items()},
             {k: v.double() for k, v in truth_fp32[2].items()}, truth_fp32[3])
    assert_matches(got, torch_ref, truth, torch.bfloat16, case)
    again = fused(case, 0.5, 0.7, backend="triton")
    assert torch.equal(again[0], got[0])
    for name in got[2]:
        assert torch.equal(again[2][name], got[2][name]), name


@needs_triton
def test_the_gradient_filter_reaches_linear_logprobs():
    """jbond_linear_loss(filter=...) is the LM-head backward's filter: on, its tiles are counted; off, exact."""
    case = make_case(dtype=torch.bfloat16)
    with lin.recording_tile_survival() as survival:
        _, _, exact = fused(case, 0.5, 0.1, backend="triton", filter=False)
    assert survival.counts == []
    with lin.recording_tile_survival() as survival:
        _, _, filtered = fused(case, 0.5, 0.1, backend="triton", filter=True)
    assert survival.counts
    # every tile holds a target here (V = 1031), so nothing is skipped and the gradients agree closely
    assert survival.fraction == 1.0
    for name, grad in exact.items():
        torch.testing.assert_close(filtered[name].float(), grad.float(), rtol=2**-7, atol=1e-5)
