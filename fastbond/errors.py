"""The one exception type for mistakes a user can make.

The CLI prints a `FastbondError` as a single line and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class FastbondError(Exception):
    """A user-facing error: bad config, missing file, malformed data, bad reward."""
