"""The exceptions that decide how a failure is shown.

`FastbondError`: a mistake a user can make (bad config, missing file,
malformed data, a reward of the wrong shape). The CLI prints it as a single
line and exits with status 2.

`UserCodeError`: the user's own code (a reward function, a model's forward)
raised. It keeps the original exception as its cause; the CLI prints the
whole traceback, since the bug is in code only the user can read.

`StepFailed`: a training step failed. It carries a note saying what was saved
and how to resume; its cause is the original error, shown by the rules above.

Anything else is a bug in fastbond and keeps its traceback.
"""


class FastbondError(Exception):
    """A user-facing error: bad config, missing file, malformed data, bad reward."""


class UserCodeError(Exception):
    """The user's code raised; the original exception is `__cause__`."""


class StepFailed(Exception):
    """Training stopped at a failed step; `note` says what was saved and how to resume."""

    def __init__(self, step: int, note: str):
        super().__init__(f"step {step} failed; {note}")
        self.step = step
        self.note = note
