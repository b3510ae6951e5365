"""Warnings of the libraries underneath (torch, transformers, DeepSpeed, …) kept in the run's log, off the terminal.

While a run holds its directory, on the main rank, every Python warning
(`warnings.warn`: torch's and transformers' UserWarnings, FutureWarnings, …)
and every WARNING-or-worse record of the libraries' loggers goes to
`RUN_DIR/warnings.log` (appended, each with its time, category and source
line) instead of stderr. So they neither split a one-line error into two or
three lines nor break the progress bar, and nothing is lost: the file holds
them all. The run's own lines (progress, notes, errors) are unaffected; the
libraries' INFO lines (DeepSpeed's) stay where they were. The file is created
at the first warning only.

Left as they were: warnings from before the run directory is claimed (a
config is checked before torch is imported, so there are few), those of the
other ranks under DeepSpeed (they write nothing into the run directory; their
stderr keeps them), and text printed by native code (the `tokenizers` fork
notice, which only TOKENIZERS_PARALLELISM silences).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

LIBRARIES = ("torch", "transformers", "DeepSpeed", "deepspeed", "datasets", "huggingface_hub", "peft", "accelerate",
             "safetensors", "tokenizers", "triton", "vllm", "urllib3", "filelock", "fsspec")
FILE_NAME = "warnings.log"


class _BelowWarning(logging.Filter):
    """Keeps a library's own terminal handler for its INFO lines; its warnings go to the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class _LazyFile(logging.Handler):
    """Appends to a file created at its first record."""

    def __init__(self, path: Path):
        super().__init__(logging.WARNING)
        self.path = path
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))

    def write(self, text: str) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:  # a log must never stop the run (a full disk shows up at the next checkpoint)
            self.handleError(record)


def _library_loggers() -> list[logging.Logger]:
    """Each library's top logger, and those of its children that exist already (some have handlers)."""
    names = set(LIBRARIES) | {name for name in logging.Logger.manager.loggerDict
                              if any(name.startswith(library + ".") for library in LIBRARIES)}
    return [logging.getLogger(name) for name in sorted(names)]


class LibraryLog:
    """Library warnings routed to `path` until `close` (see the module docstring)."""

    def __init__(self, path: Path):
        self.handler = _LazyFile(Path(path))
        self.filter = _BelowWarning()
        self._showwarning = warnings.showwarning
        self._loggers: list[tuple[logging.Logger, bool]] = []
        self._filtered: list[logging.Handler] = []
        warnings.showwarning = self._show
        for logger in _library_loggers():
            for handler in logger.handlers:
                handler.addFilter(self.filter)
                self._filtered.append(handler)
            # a library's top logger, or one that keeps its records from it (torch.distributed does)
            if logger.name in LIBRARIES or not logger.propagate:
                logger.addHandler(self.handler)
                self._loggers.append((logger, logger.propagate))
                logger.propagate = False  # the root logger's last-resort handler would print it to stderr

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if file is not None:  # asked for a particular stream: not ours to move
            self._showwarning(message, category, filename, lineno, file, line)
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        text = warnings.formatwarning(message, category, filename, lineno, line)
        try:
            self.handler.write(f"{stamp} {text.rstrip()}")
        except OSError:
            pass

    def close(self) -> None:
        """Everything back as it was."""
        if warnings.showwarning == self._show:
            warnings.showwarning = self._showwarning
        for logger, propagate in self._loggers:
            logger.removeHandler(self.handler)
            logger.propagate = propagate
        for handler in self._filtered:
            handler.removeFilter(self.filter)
        self._loggers, self._filtered = [], []


def library_log(run_dir: Path) -> LibraryLog:
    return LibraryLog(Path(run_dir) / FILE_NAME)
