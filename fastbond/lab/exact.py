"""The exact Best-of-N lab: a policy small enough that every quantity is exact.

A policy here is autoregressive over sequences of `length` tokens from a
vocabulary of `vocab_size` symbols, with one row of logits per prefix (the
empty prefix, then every prefix of length 1, 2, …, length−1). The
K = vocab_size^length outcomes can all be enumerated, so π(y), π_BoN(y)
(SPEC §1), both KL directions, expected rewards and the Jeffreys objective
(SPEC §3) are computed exactly in float64, while the trainers below draw real
samples and feed them to the stochastic losses of `fastbond.losses` — the same
code path a language model takes, with masks of ones.

One context ("prompt") is enough: every batch dimension below is a batch of
samples for that context. The table-of-logits parametrization can express
every distribution with full support, so π_BoN of any full-support policy is
reachable and a distillation objective can in principle be driven to 0.

Trainers:
    train_jbond  J-BOND (SPEC §5, Algorithm 2): 1 policy + 2 anchor samples per
                 prompt, EMA anchor of the logits.
    train_bond   BOND-N against BoN_N(π_ref) (SPEC §6), or iterative BOND
                 (SPEC §4) with BoN_n of an anchor replaced by the policy every
                 `anchor_period` steps.
Each returns a `TrainResult` whose `history` holds exact metrics (`evaluate`)
every `eval_every` steps; `on_record(step, metrics)` is called with each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastbond.bon import (
    best_of_n_index,
    bon_distribution,
    bond_reward,
    kl_divergence,
    reward_quantiles,
)
from fastbond.losses import bond_loss, jbond_loss

__all__ = [
    "SequenceLab",
    "TrainResult",
    "jeffreys_divergence",
    "make_optimizer",
    "jbond_batch_loss",
    "bond_batch_loss",
    "train_jbond",
    "train_bond",
]

DTYPE = torch.float64


class SequenceLab:
    """All length-`length` sequences over `vocab_size` tokens, a fixed reward on them, and π_ref.

    Outcomes are indexed lexicographically, first token most significant, so an
    outcome's index is its token sequence read as a base-`vocab_size` number.

    Args:
        vocab_size: V, 2 or more (the lab is meant for 4-8).
        length:     L, 1 or more (the lab is meant for 2-4).
        ties:       0 for distinct rewards; m ≥ 2 draws each reward from m
                    integer levels, so many outcomes share a reward.
        ref_scale:  standard deviation of π_ref's logits (0 gives a uniform π_ref).
        seed:       seeds the reward and π_ref.
    Attributes:
        outcomes:     [K, L] tokens of every outcome.
        prefix_index: [K, L] row of the logits table that emits token t of each outcome.
        rewards:      [K] float64.
        ref_logits:   [P, V] float64 logits of π_ref, P = Σ_{t<L} V^t prefixes.
    """

    def __init__(self, vocab_size: int = 4, length: int = 3, ties: int = 0, ref_scale: float = 1.0, seed: int = 0):
        if vocab_size < 2 or length < 1:
            raise ValueError(f"need vocab_size >= 2 and length >= 1, got {vocab_size} and {length}")
        if ties == 1 or ties < 0:
            raise ValueError(f"ties must be 0 (distinct rewards) or a number of levels >= 2, got {ties}")
        self.vocab_size = vocab_size
        self.length = length
        self.num_outcomes = vocab_size**length
        # Offset of the prefixes of length t in the logits table: Σ_{s<t} V^s.
        self._offsets = [sum(vocab_size**s for s in range(t)) for t in range(length + 1)]
        self.num_prefixes = self._offsets[length]

        codes = torch.arange(self.num_outcomes)
        powers = vocab_size ** torch.arange(length - 1, -1, -1)
        self.outcomes = (codes.unsqueeze(1) // powers) % vocab_size  # [K, L]
        prefix_codes = codes.unsqueeze(1) // (powers * vocab_size)  # [K, L]: code of y[:t]
        self.prefix_index = torch.tensor(self._offsets[:length]) + prefix_codes  # [K, L]

        generator = torch.Generator().manual_seed(seed)
        if ties:
            self.rewards = torch.randint(0, ties, (self.num_outcomes,), generator=generator).to(DTYPE)
        else:
            # Gaussian draws are distinct with probability 1; a repeat would
            # silently turn the distinct-reward formulas into the tie case.
            self.rewards = torch.randn(self.num_outcomes, generator=generator, dtype=DTYPE)
            if self.rewards.unique().numel() != self.num_outcomes:
                raise RuntimeError("drew two equal rewards; use another seed")
        self.ref_logits = ref_scale * torch.randn(self.num_prefixes, vocab_size, generator=generator, dtype=DTYPE)

    # ----------------------------------------------------------- exact quantities

    def random_logits(self, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
        """[P, V] Gaussian logits: another full-support policy on the same outcomes."""
        generator = torch.Generator().manual_seed(seed)
        return scale * torch.randn(self.num_prefixes, self.vocab_size, generator=generator, dtype=DTYPE)

    def token_logps(self, logits: torch.Tensor) -> torch.Tensor:
        """[K, L] log π(y_t | y_<t) of every outcome, differentiable in `logits` [P, V].

        Rows of this tensor are what a language model would hand to the losses:
        per-token log-probs of a response, all L positions unmasked.
        """
        return torch.log_softmax(logits, dim=-1)[self.prefix_index, self.outcomes]

    def logp(self, logits: torch.Tensor) -> torch.Tensor:
        """[K] log π(y) = Σ_t log π(y_t | y_<t)."""
        return self.token_logps(logits).sum(-1)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[K] π(y); sums to 1 up to rounding because the tree factorization is normalized."""
        return self.logp(logits).exp()

    def ref_probs(self) -> torch.Tensor:
        """[K] π_ref(y)."""
        return self.probs(self.ref_logits)

    def quantiles(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p<, p≤) [K] of every outcome's reward under the distribution `probs` (SPEC §1)."""
        return reward_quantiles(probs, self.rewards)

    def bon(self, probs: torch.Tensor, n: int) -> torch.Tensor:
        """[K] BoN_n(probs), exact with ties (SPEC §1)."""
        return bon_distribution(probs, self.rewards, n)

    def expected_reward(self, probs: torch.Tensor) -> torch.Tensor:
        """E_{y~probs}[r(y)], a scalar."""
        return (probs * self.rewards).sum(-1)

    # ------------------------------------------------------------------ sampling

    def sample(self, logits: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Outcome indices [*shape] drawn token by token from the policy with `logits` [P, V].

        Autoregressive on purpose: the tests then check the enumerated π(y)
        against the literal generation procedure, not against itself. Each
        token is drawn by inverting the conditional CDF at a uniform.
        """
        count = math.prod(shape)
        cdf = torch.softmax(logits.detach().to(DTYPE), dim=-1).cumsum(-1)  # [P, V]
        uniforms = torch.rand(self.length, count, 1, generator=generator, dtype=DTYPE)
        code = torch.zeros(count, dtype=torch.long)
        for t in range(self.length):
            rows = cdf[self._offsets[t] + code]  # [count, V]
            # #{j: cdf_j ≤ u} is token j with probability cdf_j − cdf_{j−1}; the
            # clamp guards a last cdf entry rounded just below 1.
            token = (rows <= uniforms[t]).sum(-1).clamp_(max=self.vocab_size - 1)
            code = code * self.vocab_size + token
        return code.reshape(shape)

    def best_of(self, samples: torch.Tensor) -> torch.Tensor:
        """[...] the Best-of-n pick of samples [..., n]: the first of maximal reward (SPEC §1)."""
        pick = best_of_n_index(self.rewards[samples])
        return samples.gather(-1, pick.unsqueeze(-1)).squeeze(-1)

    # ---------------------------------------------------------------- evaluation

    def evaluate(
        self,
        logits: torch.Tensor,
        anchor_logits: torch.Tensor | None = None,
        target_n: int | None = None,
    ) -> dict[str, float]:
        """Exact metrics of the policy with `logits` (SPEC §7, without sampling noise).

        reward        E_π[r]
        log_quantile  E_π[log p≤], p≤ the quantile under π_ref (the BOND reward)
        kl_ref        KL(π ‖ π_ref)
        kl_anchor     KL(π ‖ π_anc)                    (with `anchor_logits`)
        kl_backward   KL(π ‖ BoN_N(π_ref)), N=target_n  (with `target_n`)
        kl_forward    KL(BoN_N(π_ref) ‖ π)              (with `target_n`)
        """
        with torch.no_grad():
            probs = self.probs(logits)
            ref = self.ref_probs()
            _, p_le = self.quantiles(ref)
            out = {
                "reward": self.expected_reward(probs).item(),
                "log_quantile": (probs * p_le.log()).sum().item(),
                "kl_ref": kl_divergence(probs, ref).item(),
            }
            if anchor_logits is not None:
                out["kl_anchor"] = kl_divergence(probs, self.probs(anchor_logits)).item()
            if target_n is not None:
                target = self.bon(ref, target_n)
                out["kl_backward"] = kl_divergence(probs, target).item()
                out["kl_forward"] = kl_divergence(target, probs).item()
        return out


def jeffreys_divergence(probs: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """J_β(π ‖ π_BoN) = (1−β)·KL(π_BoN ‖ π) + β·KL(π ‖ π_BoN) (SPEC §3), differentiable in both."""
    return (1.0 - beta) * kl_divergence(target, probs) + beta * kl_divergence(probs, target)


# ---------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """Final policy and anchor logits [P, V], and exact metrics recorded every `eval_every` steps."""

    logits: torch.Tensor
    anchor_logits: torch.Tensor
    history: dict[str, list[float]] = field(default_factory=dict)

    on_record: Callable[[int, dict[str, float]], None] | None = None

    def record(self, step: int, metrics: dict[str, float]) -> None:
        self.history.setdefault("step", []).append(step)
        for key, value in metrics.items():
            self.history.setdefault(key, []).append(value)
        if self.on_record is not None:
            self.on_record(step, metrics)


def make_optimizer(params: list[torch.Tensor], name: str, lr: float) -> torch.optim.Optimizer:
    """Adam (the paper's choice) or plain SGD on the logits table."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: use 'adam' or 'sgd'")


def _ones_mask(batch: int, length: int) -> torch.Tensor:
    return torch.ones(batch, length, dtype=torch.bool)


def jbond_batch_loss(
    lab: SequenceLab,
    logits: torch.Tensor,
    anchor_logits: torch.Tensor,
    batch_size: int,
    beta: float,
    gamma: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One J-BOND batch (SPEC §5 steps 1-6): sample, score, and return `jbond_loss`."""
    policy = lab.sample(logits, (batch_size,), generator)  # [B]
    anchors = lab.sample(anchor_logits, (batch_size, 2), generator)  # [B, 2]
    best_anchor = lab.best_of(anchors)  # [B], first on a tie
    token_logps = lab.token_logps(logits)  # [K, L], with grad
    anchor_token_logps = lab.token_logps(anchor_logits).detach()
    mask = _ones_mask(batch_size, lab.length)
    return jbond_loss(
        token_logps[policy],
        mask,
        token_logps[best_anchor],
        mask,
        anchor_token_logps[policy],
        lab.rewards[policy],
        lab.rewards[anchors],
        beta=beta,
        gamma=gamma,
    )


def bond_batch_loss(
    lab: SequenceLab,
    logits: torch.Tensor,
    base_logits: torch.Tensor,
    n: int,
    k: int,
    batch_size: int,
    beta: float,
    generator: torch.Generator | None = None,
    exact_quantiles: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One BOND batch against BoN_n(base) (SPEC §3, §6): the base is π_ref, or the anchor.

    Forward KL: SFT on the best of n base samples. Backward KL: REINFORCE with
    log p̂≤ from k base samples (self-smoothed), or with the exact r_BOND
    (correction included) when `exact_quantiles`.
    """
    policy = lab.sample(logits, (batch_size,), generator)  # [B]
    # n samples for the best-of-n, then k more for the quantiles: one call, independent draws.
    base_samples = lab.sample(base_logits, (batch_size, n + (0 if exact_quantiles else k)), generator)
    best_base = lab.best_of(base_samples[:, :n])  # [B]
    token_logps = lab.token_logps(logits)  # [K, L], with grad
    base_token_logps = lab.token_logps(base_logits).detach()
    mask = _ones_mask(batch_size, lab.length)
    if exact_quantiles:
        p_lt, p_le = lab.quantiles(lab.probs(base_logits).detach())
        exact = bond_reward(p_lt, p_le, n, correction=True)[policy]
        rewards, ref_rewards = None, None
    else:
        exact = None
        rewards = lab.rewards[policy]
        ref_rewards = lab.rewards[base_samples[:, n:]]  # [B, k]
    return bond_loss(
        token_logps[policy],
        mask,
        token_logps[best_base],
        mask,
        base_token_logps[policy],
        rewards,
        ref_rewards,
        n=n,
        beta=beta,
        bond_rewards=exact,
    )


def train_jbond(
    lab: SequenceLab,
    steps: int,
    batch_size: int = 16,
    beta: float = 0.5,
    gamma: float = 0.0,
    eta: float = 0.05,
    lr: float = 0.05,
    optimizer: str = "adam",
    eval_every: int = 10,
    target_n: int | None = None,
    seed: int = 0,
    on_record: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """J-BOND (SPEC §5, Algorithm 2) on the lab: policy and anchor start at π_ref.

    After each optimizer step the anchor's logits move by EMA,
    θ_anc ← (1−η)·θ_anc + η·θ (step 8), in float64 so that no update rounds away.
    """
    generator = torch.Generator().manual_seed(seed)
    logits = lab.ref_logits.clone().requires_grad_(True)
    anchor_logits = lab.ref_logits.clone()
    opt = make_optimizer([logits], optimizer, lr)
    result = TrainResult(logits, anchor_logits, on_record=on_record)
    result.record(0, lab.evaluate(logits, anchor_logits, target_n))
    for step in range(1, steps + 1):
        loss, _ = jbond_batch_loss(lab, logits, anchor_logits, batch_size, beta, gamma, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            anchor_logits.lerp_(logits, eta)
        if step % eval_every == 0 or step == steps:
            result.record(step, lab.evaluate(logits, anchor_logits, target_n))
    return result


def train_bond(
    lab: SequenceLab,
    steps: int,
    n: int = 8,
    k: int = 16,
    batch_size: int = 16,
    beta: float = 0.5,
    anchor_period: int = 0,
    lr: float = 0.05,
    optimizer: str = "adam",
    eval_every: int = 10,
    target_n: int | None = None,
    exact_quantiles: bool = False,
    seed: int = 0,
    on_record: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """BOND-N (anchor_period = 0: the base is π_ref throughout) or iterative BOND.

    Iterative BOND (SPEC §4, Algorithm 1): the base is an anchor, initially
    π_ref, set to the current policy every `anchor_period` steps; by closure M
    rounds aim at BoN_{n^M}(π_ref). The optimizer state is kept across anchor
    updates, as a trainer on a language model would.
    """
    generator = torch.Generator().manual_seed(seed)
    logits = lab.ref_logits.clone().requires_grad_(True)
    anchor_logits = lab.ref_logits.clone()
    opt = make_optimizer([logits], optimizer, lr)
    tracked_anchor = anchor_logits if anchor_period else None  # BOND-N's anchor is π_ref: kl_anchor = kl_ref
    result = TrainResult(logits, anchor_logits, on_record=on_record)
    result.record(0, lab.evaluate(logits, tracked_anchor, target_n))
    for step in range(1, steps + 1):
        loss, _ = bond_batch_loss(lab, logits, anchor_logits, n, k, batch_size, beta, generator, exact_quantiles)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if anchor_period and step % anchor_period == 0:
            anchor_logits.copy_(logits.detach())
        if step % eval_every == 0 or step == steps:
            result.record(step, lab.evaluate(logits, tracked_anchor, target_n))
    return result
