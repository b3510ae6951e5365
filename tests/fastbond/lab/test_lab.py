"""The exact Best-of-N lab: BoN theory against literal sampling, and every
stochastic BOND loss against the exact gradient of the divergence it targets.

All in float64 and seeded. Expectations of stochastic gradients are exact: the
samples are enumerated and weighted by their probabilities, and each loss is
called with a batch of one (torch.func.vmap over the enumeration), so its
leave-one-out baseline is 0 and the gradient is the loss's own.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastbond.bon import (
    JBOND_PENALTY,
    bon_kl_bound,
    bond_reward,
    jbond_reward,
    kl_divergence,
)
from fastbond.lab.exact import SequenceLab, jeffreys_divergence, make_optimizer, train_jbond
from fastbond.lab.experiments import main as run_experiments
from fastbond.losses import bond_loss, jbond_loss, vbon_loss

TIES = [0, 3]  # distinct rewards, and rewards on 3 levels (most outcomes tied)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The lab's tensors are tiny: a second thread only adds hand-off cost, badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def tv_bound(probs: torch.Tensor, draws: int, delta: float = 1e-6) -> float:
    """A bound that the TV distance of `draws` empirical frequencies from `probs` exceeds w.p. < delta.

    E[TV] ≤ ½ Σ_y sqrt(p(1−p)/M) (Jensen on each |freq − p|), and TV moves by at
    most 1/M when one draw changes, so McDiarmid adds sqrt(log(1/δ) / (2M)).
    """
    expected = 0.5 * (probs * (1 - probs) / draws).sqrt().sum().item()
    return expected + math.sqrt(math.log(1 / delta) / (2 * draws))


def frequencies(samples: torch.Tensor, num_outcomes: int) -> torch.Tensor:
    return torch.bincount(samples.reshape(-1), minlength=num_outcomes).to(torch.float64) / samples.numel()


def grad(value: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(value, logits)[0]


# ------------------------------------------------------------ 1. Monte Carlo


@pytest.mark.parametrize("ties", TIES)
def test_bon_distribution_matches_literal_best_of_n_sampling(ties):
    lab = SequenceLab(vocab_size=4, length=2, ties=ties, seed=1)
    probs = lab.ref_probs()
    n, draws = 3, 100_000
    generator = torch.Generator().manual_seed(7)
    # The lab's own token-by-token sampler against its enumerated π(y) …
    plain = lab.sample(lab.ref_logits, (draws,), generator)
    bound = tv_bound(probs, draws)
    assert total_variation(frequencies(plain, lab.num_outcomes), probs) < bound
    # … then the literal procedure: N draws, keep the first of maximal reward.
    picks = lab.best_of(lab.sample(lab.ref_logits, (draws, n), generator))
    freq = frequencies(picks, lab.num_outcomes)
    exact = lab.bon(probs, n)
    bound = tv_bound(exact, draws)
    assert total_variation(freq, exact) < bound
    # The bound is tight enough to reject a neighbouring N, and π itself.
    assert total_variation(freq, lab.bon(probs, n + 1)) > bound
    assert total_variation(freq, probs) > bound


# ---------------------------------------------------------------- 2. closure


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("n, m", [(2, 3), (4, 2), (3, 5)])
def test_bon_closure(ties, n, m):
    lab = SequenceLab(vocab_size=4, length=3, ties=ties, seed=2)
    probs = lab.ref_probs()
    torch.testing.assert_close(lab.bon(lab.bon(probs, m), n), lab.bon(probs, n * m), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------- 3. KL bound


@pytest.mark.parametrize("ties", TIES)
def test_bon_kl_below_bound(ties):
    lab = SequenceLab(vocab_size=4, length=3, ties=ties, seed=3)
    probs = lab.ref_probs()
    for n in (1, 2, 4, 8, 16, 64):
        assert kl_divergence(lab.bon(probs, n), probs).item() <= bon_kl_bound(n) + 1e-12


def test_bon_kl_bound_tightens_as_support_grows():
    """Uniform π, distinct rewards: the discrete KL approaches the continuous value from below."""
    n = 8
    gaps = []
    for vocab_size, length in ((4, 2), (4, 3), (4, 4), (8, 3)):  # K = 16, 64, 256, 512
        lab = SequenceLab(vocab_size, length, ref_scale=0.0, seed=4)
        probs = lab.ref_probs()
        gaps.append(bon_kl_bound(n) - kl_divergence(lab.bon(probs, n), probs).item())
    assert all(gap > 0 for gap in gaps)
    assert all(b < a for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 0.02 * bon_kl_bound(n), gaps


# ------------------------------------------------------ 4. the J-BOND reward


@pytest.mark.parametrize("ties", TIES)
def test_jbond_reward_expectation_over_anchor_pairs(ties):
    lab = SequenceLab(vocab_size=4, length=2, ties=ties, seed=5)
    anchor = lab.probs(lab.random_logits(seed=6))
    k = lab.num_outcomes
    y, a1, a2 = (idx.reshape(-1) for idx in torch.meshgrid(torch.arange(k), torch.arange(k), torch.arange(k), indexing="ij"))
    r_j = jbond_reward(lab.rewards[y], lab.rewards[torch.stack([a1, a2], -1)])  # [K³]
    expected = (anchor[a1] * anchor[a2] * r_j).reshape(k, k * k).sum(-1)  # [K]
    _, p_le = lab.quantiles(anchor)
    torch.testing.assert_close(expected, JBOND_PENALTY * (1 - p_le) ** 2, rtol=1e-12, atol=1e-14)


def test_jbond_reward_equals_log_quantile_at_median():
    lab = SequenceLab(vocab_size=4, length=2, ref_scale=0.0, seed=5)  # uniform anchor, 16 distinct rewards
    anchor = lab.ref_probs()
    median = torch.argsort(lab.rewards)[7]  # 8 of 16 outcomes are ≤ it: p≤ = 1/2
    _, p_le = lab.quantiles(anchor)
    assert p_le[median].item() == pytest.approx(0.5, abs=1e-15)
    k = lab.num_outcomes
    a1, a2 = (idx.reshape(-1) for idx in torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij"))
    r_j = jbond_reward(lab.rewards[median].expand(k * k), lab.rewards[torch.stack([a1, a2], -1)])
    assert (anchor[a1] * anchor[a2] * r_j).sum().item() == pytest.approx(math.log(0.5), abs=1e-14)


# ------------------------------------- 5. exact expected gradients of the losses


def enumerate_expected_loss(loss_fn, weights: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """Σ_c w_c · loss(batch of one = combination c): the exact expectation of a batch-of-one loss.

    Each input is [C, ...]; `loss_fn` sees [1, ...] slices, so leave-one-out
    baselines are 0, as in a real batch of one.
    """
    losses = torch.func.vmap(lambda *xs: loss_fn(*(x.unsqueeze(0) for x in xs)))(*inputs)  # [C]
    return (weights * losses).sum()


@pytest.fixture
def small_lab():
    """K = 16 outcomes: J-BOND's K³ = 4096 (policy, anchor, anchor) triples stay cheap."""
    return SequenceLab(vocab_size=4, length=2, seed=8)


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("beta, gamma", [(0.0, 0.0), (1.0, 0.0), (0.3, 0.7)])
def test_jbond_loss_expected_gradient(ties, beta, gamma):
    lab = SequenceLab(vocab_size=4, length=2, ties=ties, seed=8)
    logits = lab.random_logits(seed=9).requires_grad_(True)
    anchor_logits = lab.random_logits(seed=10)
    k = lab.num_outcomes
    y, a1, a2 = (idx.reshape(-1) for idx in torch.meshgrid(torch.arange(k), torch.arange(k), torch.arange(k), indexing="ij"))
    anchors = torch.stack([a1, a2], -1)  # [C, 2]
    best = lab.best_of(anchors)  # the literal Best-of-2, first on a tie
    probs, anchor = lab.probs(logits), lab.probs(anchor_logits)
    weights = (probs[y] * anchor[a1] * anchor[a2]).detach()

    tok, anchor_tok = lab.token_logps(logits), lab.token_logps(anchor_logits).detach()
    mask = torch.ones(1, lab.length, dtype=torch.bool)

    def loss_fn(policy_logps, best_logps, anc_logps, reward, anchor_rewards):
        return jbond_loss(policy_logps, mask, best_logps, mask, anc_logps, reward, anchor_rewards, beta, gamma)[0]

    stochastic = grad(
        enumerate_expected_loss(loss_fn, weights, tok[y], tok[best], anchor_tok[y], lab.rewards[y], lab.rewards[anchors]),
        logits,
    )

    # Forward part: SFT on Best-of-2 of the anchor. Backward part: KL to the
    # anchor minus the anchor-expected r_J, r̄_J = −log 16·(1 − p≤)² (SPEC §5),
    # which is not exactly KL(π ‖ BoN_2(π_anc)). γ part: KL(π ‖ π_anc).
    _, p_le = lab.quantiles(anchor)
    mean_r_j = JBOND_PENALTY * (1 - p_le) ** 2
    anchor_kl = kl_divergence(probs, anchor)
    exact = (
        (1 - beta) * kl_divergence(lab.bon(anchor, 2), probs)
        + beta * (anchor_kl - (probs * mean_r_j).sum())
        + gamma * anchor_kl
    )
    torch.testing.assert_close(stochastic, grad(exact, logits), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bond_loss_expected_gradient_is_jeffreys(ties, beta):
    lab = SequenceLab(vocab_size=4, length=2, ties=ties, seed=11)
    n = 4
    logits = lab.random_logits(seed=12).requires_grad_(True)
    ref = lab.ref_probs()
    target = lab.bon(ref, n)
    k = lab.num_outcomes
    # The best of N reference samples is enumerated by its law BoN_N(π_ref),
    # which the Monte-Carlo test above checks against literal sampling.
    y, y_bon = (idx.reshape(-1) for idx in torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij"))
    probs = lab.probs(logits)
    weights = (probs[y] * target[y_bon]).detach()
    p_lt, p_le = lab.quantiles(ref)
    r_bond = bond_reward(p_lt, p_le, n, correction=True)  # exact, so π_BoN ∝ π_ref·exp((N−1)·r_BOND)

    tok, ref_tok = lab.token_logps(logits), lab.token_logps(lab.ref_logits)
    mask = torch.ones(1, lab.length, dtype=torch.bool)

    def loss_fn(policy_logps, best_logps, ref_logps, rewards):
        return bond_loss(policy_logps, mask, best_logps, mask, ref_logps, None, None, n=n, beta=beta, bond_rewards=rewards)[0]

    stochastic = grad(enumerate_expected_loss(loss_fn, weights, tok[y], tok[y_bon], ref_tok[y], r_bond[y]), logits)
    exact = jeffreys_divergence(probs, target, beta)
    torch.testing.assert_close(stochastic, grad(exact, logits), rtol=1e-9, atol=1e-12)


def test_vbon_loss_expected_gradient(small_lab):
    lab, n = small_lab, 8
    logits = lab.random_logits(seed=13).requires_grad_(True)
    ref = lab.ref_probs()
    probs = lab.probs(logits)
    log_cdf = lab.quantiles(ref)[1].log()  # exact log F(r(y)) under π_ref
    tok, ref_tok = lab.token_logps(logits), lab.token_logps(lab.ref_logits)
    mask = torch.ones(1, lab.length, dtype=torch.bool)
    y = torch.arange(lab.num_outcomes)

    def loss_fn(policy_logps, ref_logps, log_f):
        return vbon_loss(policy_logps, mask, ref_logps, None, None, n=n, log_cdf=log_f)[0]

    stochastic = grad(enumerate_expected_loss(loss_fn, probs.detach(), tok[y], ref_tok[y], log_cdf), logits)
    exact = kl_divergence(probs, ref) / (n - 1) - (probs * log_cdf).sum()
    torch.testing.assert_close(stochastic, grad(exact, logits), rtol=1e-9, atol=1e-12)


# ------------------------------------------- 6. the exact Jeffreys objective


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_exact_jeffreys_descent_reaches_bon(beta):
    """Full-batch Adam on J_β: every β drives both KLs to ~0, since the table of
    logits can represent π_BoN exactly (it has full support)."""
    lab = SequenceLab(vocab_size=4, length=3, seed=14)
    target = lab.bon(lab.ref_probs(), 4)
    logits = lab.ref_logits.clone().requires_grad_(True)
    opt = make_optimizer([logits], "adam", lr=0.1)
    with torch.no_grad():
        start = kl_divergence(lab.probs(logits), target).item(), kl_divergence(target, lab.probs(logits)).item()
    for _ in range(500):
        opt.zero_grad()
        jeffreys_divergence(lab.probs(logits), target, beta).backward()
        opt.step()
    with torch.no_grad():
        probs = lab.probs(logits)
        backward, forward = kl_divergence(probs, target).item(), kl_divergence(target, probs).item()
    assert min(start) > 0.3, start
    assert backward < 1e-3 and forward < 1e-3, (backward, forward)


# ---------------------------------------------- 7. stochastic J-BOND on the lab


def test_stochastic_jbond_beats_best_of_2():
    lab = SequenceLab(vocab_size=4, length=3, seed=15)
    ref = lab.ref_probs()
    bo2 = lab.expected_reward(lab.bon(ref, 2)).item()
    start = lab.expected_reward(ref).item()
    result = train_jbond(lab, steps=150, batch_size=16, beta=0.5, eta=0.05, lr=0.05, eval_every=10, seed=0)
    rewards = result.history["reward"]
    late = sum(rewards[-5:]) / 5
    # Margin: the policy must clear Best-of-2 by as much as Best-of-2 clears π_ref.
    assert late > bo2 + (bo2 - start), (start, bo2, rewards)


# ------------------------------------------------------------- 8. γ's sign


def test_gamma_term_descent_lowers_anchor_kl():
    """Descent on the γ term alone (loss(γ=1) − loss(γ=0), same samples) pulls π to π_anc.

    Algorithm 2's printed sign is the negated gradient: it pushes π away.
    """
    lab = SequenceLab(vocab_size=4, length=3, seed=16)
    anchor_logits = lab.random_logits(seed=17)
    kls = {}
    for sign, name in ((1.0, "spec"), (-1.0, "printed")):
        generator = torch.Generator().manual_seed(18)
        logits = lab.ref_logits.clone().requires_grad_(True)
        start = kl_divergence(lab.probs(logits), lab.probs(anchor_logits)).item()
        for _ in range(30):
            policy = lab.sample(logits, (64,), generator)
            anchors = lab.sample(anchor_logits, (64, 2), generator)
            tok, anchor_tok = lab.token_logps(logits), lab.token_logps(anchor_logits)
            mask = torch.ones(64, lab.length, dtype=torch.bool)
            args = (tok[policy], mask, tok[lab.best_of(anchors)], mask, anchor_tok[policy], lab.rewards[policy], lab.rewards[anchors])
            gamma_term = jbond_loss(*args, beta=0.5, gamma=1.0)[0] - jbond_loss(*args, beta=0.5, gamma=0.0)[0]
            with torch.no_grad():
                logits -= 0.3 * sign * grad(gamma_term, logits)
        kls[name] = (start, kl_divergence(lab.probs(logits), lab.probs(anchor_logits)).item())
    assert kls["spec"][1] < 0.6 * kls["spec"][0], kls
    assert kls["printed"][1] > 2.0 * kls["printed"][0], kls


# ----------------------------------------------------------- experiment smoke


def test_lab_experiments_quick(tmp_path):
    assert run_experiments(["--quick", "--out", str(tmp_path), "--steps", "60"]) == 0
    for name in ("fig2_jeffreys.png", "fig4_iterative.png", "results.json", "results.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"config", "bon_reference", "fig2", "fig4", "claims", "elapsed_s"} <= results.keys()
    assert set(results["fig2"]["runs"]) == {"beta=0", "beta=0.5", "beta=1", "beta=1 exact p"}
    assert set(results["fig4"]["runs"]) == {"BOND N=4", "BOND N=8", "BOND N=16", "iterative n=2", "iterative n=4"}
    history = results["fig2"]["runs"]["beta=0.5"]
    assert {"step", "reward", "log_quantile", "kl_ref", "kl_backward", "kl_forward"} <= history.keys()
    assert history["step"][-1] == 60
    assert len(results["claims"]) == 6
    for claim in results["claims"]:
        assert {"claim", "measured", "matched", "rule"} <= claim.keys()
    assert "| paper claim |" in (tmp_path / "results.md").read_text()
