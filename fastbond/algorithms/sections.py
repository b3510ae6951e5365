"""The `algorithm:` section of a run, one dataclass per algorithm, chosen by `algorithm.name`.

Each key means one thing, for the algorithm whose section holds it (BOND-N's
`n` is the N of BoN_N(π_ref); BoNBoN's is how many π_ref samples its pairs are
picked from). A key the chosen algorithm does not use is an error naming it,
not a setting silently ignored. No torch here: sections are read and checked
before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fastbond.checks import at_least, in_unit_interval, require


@dataclass
class AlgorithmSection:
    """The keys every algorithm has; subclasses add their own and check them."""

    name: str
    # Whether the run keeps an anchor model (EMA or hard copy of the policy).
    needs_anchor: ClassVar[bool] = False
    # Whether it can run on a pairwise judge's comparisons alone (reward.kind=pairwise), with no scalar reward.
    runs_on_comparisons: ClassVar[bool] = False

    def check(self) -> None:
        """Ranges of this section's values; raises FastbondError naming the key."""


@dataclass
class JBondSection(AlgorithmSection):
    """J-BOND (SPEC §5): 1 policy + 2 anchor samples per prompt, EMA anchor."""

    name: str = "jbond"
    beta: float = 0.5  # Jeffreys weight: 0 forward KL only, 1 backward KL only
    gamma: float = 0.0  # weight of the extra KL(π ‖ π_anc) term
    eta: float = 0.02  # anchor EMA rate: θ_anc ← (1−η) θ_anc + η θ after every step
    needs_anchor: ClassVar[bool] = True
    runs_on_comparisons: ClassVar[bool] = True  # 3 comparisons a prompt decide a step (docs/judges.md)

    def check(self) -> None:
        in_unit_interval("algorithm.beta", self.beta)
        at_least("algorithm.gamma", self.gamma, 0)
        in_unit_interval("algorithm.eta", self.eta)


@dataclass
class BondSection(AlgorithmSection):
    """BOND-N (SPEC §6): Jeffreys divergence to BoN_N(π_ref), Monte-Carlo quantiles."""

    name: str = "bond"
    beta: float = 0.5  # Jeffreys weight
    n: int = 8  # N of the target BoN_N(π_ref)
    mc_samples: int = 16  # k π_ref samples per prompt for the quantile p̂≤

    def check(self) -> None:
        in_unit_interval("algorithm.beta", self.beta)
        at_least("algorithm.n", self.n, 2)
        at_least("algorithm.mc_samples", self.mc_samples, 1)


@dataclass
class IterativeBondSection(AlgorithmSection):
    """Iterative BOND (SPEC §4): BOND-n against an anchor hard-copied from the policy every K steps."""

    name: str = "iterative_bond"
    beta: float = 0.5  # Jeffreys weight
    n: int = 8  # n of BoN_n(π_anc) distilled each round
    mc_samples: int = 16  # k anchor samples per prompt for the quantile p̂≤
    anchor_period: int = 50  # K: steps between anchor ← policy
    needs_anchor: ClassVar[bool] = True

    def check(self) -> None:
        in_unit_interval("algorithm.beta", self.beta)
        at_least("algorithm.n", self.n, 2)
        at_least("algorithm.mc_samples", self.mc_samples, 1)
        at_least("algorithm.anchor_period", self.anchor_period, 1)


@dataclass
class VBoNSection(AlgorithmSection):
    """vBoN (Amini et al.): backward KL to BoN_N(π_ref) through π_ref's reward CDF."""

    name: str = "vbon"
    n: int = 8  # N of the target BoN_N(π_ref)
    mc_samples: int = 16  # k π_ref samples per prompt for the CDF F

    def check(self) -> None:
        at_least("algorithm.n", self.n, 2)
        at_least("algorithm.mc_samples", self.mc_samples, 1)


@dataclass
class BoNBoNSection(AlgorithmSection):
    """BoNBoN (Gui et al.), offline: best and worst of n π_ref samples per prompt."""

    name: str = "bonbon"
    n: int = 8  # π_ref samples per prompt the (best, worst) pair is picked from
    alpha: float = 0.005  # weight of the SFT term on the best sample

    def check(self) -> None:
        at_least("algorithm.n", self.n, 2)
        in_unit_interval("algorithm.alpha", self.alpha)


@dataclass
class RlooSection(AlgorithmSection):
    """REINFORCE with a leave-one-out baseline (the BOND paper's RLHF baseline)."""

    name: str = "rloo"
    # 0.4: on the embedded world, 80 steps end at KL ≈ 1.8 nats, where the J-BOND default ends (≈ 1.9);
    # 0.1 and below reward-hack there (KL 17 to 136 nats). `fastbond frontier` shows the sweep.
    beta_rl: float = 0.4  # KL(π ‖ π_ref) penalty β_RL in the return
    samples_per_prompt: int = 2  # policy samples per prompt; each one's baseline is the others' mean

    def check(self) -> None:
        at_least("algorithm.beta_rl", self.beta_rl, 0)
        require(self.samples_per_prompt >= 2,
                f"config key 'algorithm.samples_per_prompt' must be >= 2 (the baseline needs another sample), "
                f"got {self.samples_per_prompt}")
