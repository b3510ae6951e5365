"""Writing files so that a reader, or a run that resumes, sees the old version or the new one, never a part.

Every file fastbond writes into a run directory goes through here: a
temporary sibling is written and flushed, then renamed into place in one
`os.replace` (atomic on POSIX within one file system). A write that fails —
a full disk, a kill — leaves the previous version and no temporary behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_tree(root: Path) -> None:
    """Flush every file under `root` to disk (before a rename makes it visible)."""
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


@contextmanager
def written_file(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; when the block ends without an error it is flushed and
    replaces `path`, and when it raises it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """`path` holds `text`, replaced in one rename."""
    with written_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def swap_in(tmp: Path, path: Path) -> None:
    """The completely written directory `tmp` becomes `path` (flushed first; an old `path` is removed)."""
    fsync_tree(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


@contextmanager
def replaced_directory(path: Path) -> Iterator[Path]:
    """A new temporary sibling of `path` to fill; when the block ends without an error it replaces
    `path`, and when it raises it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, path)


def save_pretrained(model, tokenizer, path: Path, state_dict: dict | None = None) -> Path:
    """`model` (and its tokenizer) in transformers format, safetensors, replacing `path` in one rename.
    `state_dict`: the tensors to write instead of the model's own (a merged LoRA policy)."""
    with replaced_directory(Path(path)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)
