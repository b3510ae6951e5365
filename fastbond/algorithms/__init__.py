"""The algorithms of `fastbond train`, one module each, chosen by `algorithm.name`.

    name            module      distils
    jbond           jbond.py    BoN_2 of an EMA anchor, Jeffreys divergence (SPEC §5); the default
    bond            bond.py     BoN_N(π_ref), Jeffreys divergence, Monte-Carlo quantiles (SPEC §6)
    iterative_bond  bond.py     BoN_n of an anchor hard-copied from the policy every K steps (SPEC §4)
    vbon            vbon.py     BoN_N(π_ref), backward KL only (vBoN)
    bonbon          bonbon.py   offline (best, worst) pairs of π_ref samples (BoNBoN)
    rloo            rloo.py     REINFORCE with a leave-one-out baseline (the paper's baseline)

`base.py` says what an algorithm implements (rollout, loss, after_step) and
what it may use (`Context`: sampling, scoring, log-probs). The objectives are
in `fastbond.losses` and the fused J-BOND op in `fastbond.kernels`.

To add an algorithm: a module with its `Algorithm` subclass, its config
section in `sections.py`, and a line in `ALGORITHMS` below. This file imports
no torch (the config reads the sections before any model loads); the
implementation is imported when `make_algorithm` first needs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from fastbond.algorithms.sections import (
    AlgorithmSection,
    BondSection,
    BoNBoNSection,
    IterativeBondSection,
    JBondSection,
    RlooSection,
    VBoNSection,
)


@dataclass(frozen=True)
class Registered:
    section: type[AlgorithmSection]  # its `algorithm:` config section
    implementation: str  # "module:Class" inside fastbond.algorithms


ALGORITHMS: dict[str, Registered] = {
    "jbond": Registered(JBondSection, "jbond:JBond"),
    "bond": Registered(BondSection, "bond:BondN"),
    "iterative_bond": Registered(IterativeBondSection, "bond:IterativeBond"),
    "vbon": Registered(VBoNSection, "vbon:VBoN"),
    "bonbon": Registered(BoNBoNSection, "bonbon:BoNBoN"),
    "rloo": Registered(RlooSection, "rloo:Rloo"),
}

DEFAULT_ALGORITHM = "jbond"


def algorithm_class(name: str) -> type:
    module, cls = ALGORITHMS[name].implementation.split(":")
    return getattr(importlib.import_module(f"fastbond.algorithms.{module}"), cls)


def make_algorithm(section: AlgorithmSection):
    """The `Algorithm` of a config section, configured by it."""
    return algorithm_class(section.name)(section)
