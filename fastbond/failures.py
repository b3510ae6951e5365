"""A step's failure in the user's code, agreed on by every rank.

Under DeepSpeed every rank runs the rollout on its share of a batch, and the
rollout is full of collectives: ZeRO-3 gathers the policy to sample from it,
a sharded reference or reward model's forward is one. When the user's reward
function or judge fails on one rank only, that rank must not leave the
rollout, or the others would wait for it in their next collective. So inside
`held()` such a failure is kept, not raised: the call returns a placeholder
of the right shape (NaN rewards, ties), the rollout goes on through the same
collectives as on every other rank, and after it the ranks learn whether any
of them failed (`Engine.first_failure`: one all-reduce of a flag; the text of
a failure travels only when there is one). Then all of them stop together
(`RolloutFailed`): they restore the step's start, save the last completed
step (a collective every rank now joins), and exit with the same status,
the main rank showing the failing rank's message (`fastbond.train`).

In one process the same happens with one rank: the rest of the rollout runs
on placeholders before the error is shown.

Kept: what the user's scorer can do wrong (`UserCodeError`: it raised;
`FastbondError`: it returned the wrong shape, a judge's NaN, …), raised by
`RewardFunction` and `PairwiseJudge` (`keeper()`). Anything else raised in a
step (a model's forward, fastbond's own bug) propagates at once, as before;
docs/deepspeed.md says what becomes of the other ranks then.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from fastbond.errors import FastbondError

MISTAKE_STATUS = 2  # a user's mistake (FastbondError): one line, as the CLI exits on one
USER_CODE_STATUS = 1  # the user's code raised: its traceback


@dataclass(frozen=True)
class Failure:
    """One rank's failure as text, so that it can travel to the rank that shows it."""

    rank: int
    mistake: bool  # a FastbondError: shown as its one line; otherwise with its traceback
    message: str  # str(error)
    trace: str  # the formatted traceback, its causes included; "" for a mistake

    @staticmethod
    def of(error: BaseException, rank: int) -> "Failure":
        mistake = isinstance(error, FastbondError)
        trace = "" if mistake else "".join(traceback.format_exception(error))
        return Failure(rank, mistake, str(error), trace)

    @property
    def status(self) -> int:
        """The exit status of every rank."""
        return MISTAKE_STATUS if self.mistake else USER_CODE_STATUS


class Hold:
    """The first failure of user code inside one `held()` block."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def keep(self, error: Exception) -> None:
        if self.error is None:  # a later failure is most likely the same bug again
            self.error = error

    def failure(self, rank: int) -> Failure | None:
        return None if self.error is None else Failure.of(self.error, rank)


_current: ContextVar[Hold | None] = ContextVar("fastbond_failure_hold", default=None)


@contextmanager
def held() -> Iterator[Hold]:
    """Inside: the user's scorer failing is kept in the yielded `Hold`, not raised."""
    hold = Hold()
    token = _current.set(hold)
    try:
        yield hold
    finally:
        _current.reset(token)


def keeper() -> Hold | None:
    """The hold to keep a failure of user code in, or None (outside `held()`: raise it)."""
    return _current.get()


class RolloutFailed(Exception):
    """Raised on every rank once the ranks agreed that the rollout failed on one of them.

    `failure`: the lowest failing rank's; `error`: this rank's own, or None when it did not fail."""

    def __init__(self, failure: Failure, error: Exception | None):
        super().__init__(failure.message)
        self.failure = failure
        self.error = error
