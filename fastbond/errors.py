"""The exceptions that decide how a failure is shown.

`FastbondError`: a mistake a user can make (bad config, missing file,
malformed data, a reward of the wrong shape). The CLI prints it as a single
line and exits with status 2.

`UserCodeError`: the user's own code (a reward function, a model's forward)
raised. It keeps the original exception as its cause; the CLI prints the
whole traceback, since the bug is in code only the user can read.

`StepFailed`: a training step failed. It carries a note saying what was saved
and how to resume; its cause is the original error, shown by the rules above
(or, when the step failed on another rank, that rank's traceback as text).

`ShownByMainRank`: under DeepSpeed, a step failed and the main rank shows
why; this rank exits with the same status and shows nothing.

Anything else is a bug in fastbond and keeps its traceback.
"""


class FastbondError(Exception):
    """A user-facing error: bad config, missing file, malformed data, bad reward."""


class UserCodeError(Exception):
    """The user's code raised; the original exception is `__cause__`."""


class StepFailed(Exception):
    """Training stopped at a failed step; `note` says what was saved and how to resume.

    `trace`: the traceback to show, as text, when it is not this exception's cause's (it came from
    rank `rank`, which is named in the message)."""

    def __init__(self, step: int, note: str, trace: str = "", rank: int | None = None):
        where = "" if rank is None else f" on rank {rank}"
        super().__init__(f"step {step} failed{where}; {note}")
        self.step = step
        self.note = note
        self.trace = trace
        self.where = where


class ShownByMainRank(Exception):
    """A step failed on some rank, every rank stops, and the main rank shows why: this one exits with
    `status` and says nothing (one message, not one per rank)."""

    def __init__(self, status: int):
        super().__init__(f"stopped with the other ranks (status {status}); the main rank shows why")
        self.status = status
