"""A role of a run (the policy, the anchor, π_ref) as the code that runs it sees it.

A role is a module, or, where roles share one module (LoRA: adapters on one
frozen base), an object whose `active()` switches the shared module to that
role for the duration and yields it. Sampling and log-probs enter a role
through `as_module`, so neither needs to know how the roles are held.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def as_module(role) -> Iterator[nn.Module]:
    """The module to run for `role`: itself, or the shared module switched to it."""
    active = getattr(role, "active", None)
    if active is None:
        yield role
    else:
        with active() as module:
            yield module
