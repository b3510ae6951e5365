"""The run directory: checked, claimed and locked before any model loads; written to with care.

A run directory holds one run: config.yaml, metrics.jsonl, checkpoints/,
policy/, eval.json, report.png (and tensorboard/, wandb/, warnings.log). `claim` makes sure that

* it can be a directory: created if absent, writable (a file in its place, a
  read-only file system or a missing permission is one line, not a
  traceback after the models have loaded);
* one process writes it at a time: an exclusive `flock` on `.lock`, held for
  the whole run; a second run in the same directory is refused, naming the
  holder's pid;
* a fresh run never silently mixes with an earlier one: a directory holding
  an earlier run (or any files that are not a run) is refused unless the
  user asked to start over (`checkpoint.overwrite=true`, `--force`), and even
  then only the run's own files are deleted, never anything else in it.

`disk_errors` turns a failed write (full disk, quota, read-only, I/O error)
into one line naming what was being written, the space left, and the last
complete checkpoint to resume from.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from fastbond.errors import FastbondError

MARKER = ".fastbond-run"
LOCK = ".lock"
# What a run writes; `--force` deletes these and nothing else.
RUN_FILES = ("config.yaml", "metrics.jsonl", "eval.json", "report.png", "warnings.log", MARKER)
RUN_DIRS = ("checkpoints", "policy", "tensorboard", "wandb")


class RunDirLock:
    """An exclusive lock on a run directory, released by `release` or when the process ends."""

    def __init__(self, handle):
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _create(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise FastbondError(f"run_dir {run_dir} is a file, not a directory: choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise FastbondError(f"run_dir {run_dir} cannot be written: {error.strerror or error} "
                            "(choose a directory you can write)") from None


def _lock(run_dir: Path) -> RunDirLock:
    handle = open(run_dir / LOCK, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FastbondError(f"run_dir {run_dir} is in use by {holder}; wait for that run to end "
                            "or choose another run_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"fastbond pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return RunDirLock(handle)


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run: its marker, or the files of a run written before markers existed."""
    return (run_dir / MARKER).is_file() or (
        (run_dir / "config.yaml").is_file() and ((run_dir / "metrics.jsonl").is_file()
                                                 or (run_dir / "checkpoints").is_dir()))


def describe_run(run_dir: Path) -> str:
    """What an earlier run left, for an error message: its newest checkpoint and metrics."""
    from fastbond.checkpoint import list_checkpoints

    found = []
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if checkpoints:
        found.append(f"checkpoints up to {checkpoints[-1].name}")
    if (run_dir / "metrics.jsonl").is_file():
        found.append("metrics.jsonl")
    if (run_dir / "policy").is_dir():
        found.append("a trained policy/")
    return ", ".join(found) or "an earlier run's config.yaml"


def _start_over(run_dir: Path) -> list[str]:
    """Delete the earlier run's own files (asked for); returns what was deleted."""
    deleted = []
    for name in RUN_DIRS:
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
            deleted.append(name + "/")
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            deleted.append(name)
    return deleted


def claim(run_dir: Path, resume: bool, overwrite: bool, say=print) -> RunDirLock:
    """Create, check and lock `run_dir` for a run (see the module docstring); returns the lock."""
    _create(run_dir)
    lock = _lock(run_dir)
    try:
        others = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
        if not resume and others:
            if not holds_run(run_dir):
                shown = ", ".join(others[:5]) + (", …" if len(others) > 5 else "")
                raise FastbondError(f"run_dir {run_dir} is not empty and holds no fastbond run ({shown}); "
                                    "choose a new or empty directory")
            if not overwrite:
                raise FastbondError(
                    f"run_dir {run_dir} already holds a run ({describe_run(run_dir)}); continue it with "
                    "checkpoint.resume=true, start over with --force (checkpoint.overwrite=true: deletes it), "
                    "or choose another run_dir")
            say(f"starting over in {run_dir}: deleted {', '.join(_start_over(run_dir))} (checkpoint.overwrite=true)")
        (run_dir / MARKER).write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    except BaseException:
        lock.release()
        raise
    return lock


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.0f} MiB free"
    except OSError:
        return "free space unknown"


# Errors of the medium rather than of the program: the run can be resumed once the cause is fixed.
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only", errno.EIO: "an I/O error"}


def medium_error(error: BaseException) -> str | None:
    """What went wrong with the storage, if `error` is such a failure. safetensors' writer reports
    the OS error inside its own exception type ("… os error 28 …"), so its text is read too."""
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        return DISK_ERRNOS[error.errno]
    text = str(error)
    for number, meaning in DISK_ERRNOS.items():
        if f"os error {number})" in text or f"code: {number}," in text:
            return meaning
    return None


@contextmanager
def disk_errors(what: str, run_dir: Path, last_checkpoint=lambda: None):
    """Inside: a failure of the storage becomes a one-line FastbondError with what to do."""
    try:
        yield
    except Exception as error:
        meaning = medium_error(error)
        if meaning is None:
            raise
        last = last_checkpoint()
        resume = (f"the last complete checkpoint is {last.name}: free space, then rerun with checkpoint.resume=true"
                  if last is not None else "no checkpoint was completed: free space, then start again")
        raise FastbondError(f"{meaning} while writing {what} in {run_dir} ({_free(run_dir)}); {resume}") from None
