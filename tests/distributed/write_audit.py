"""`fastbond` with a record of every file each rank writes: the two-node test's witness.

    torchrun --nnodes 2 --node_rank N ... tests/distributed/write_audit.py train CONFIG...

Runs `fastbond.cli.main` after installing a Python audit hook that appends one
JSON line per write under $FASTBOND_AUDIT_ROOT to
$FASTBOND_AUDIT_DIR/rank<RANK>.jsonl: {"rank", "node", "event", "path"}. A
write is a file opened for writing, a rename (its destination and its
source), a directory made or removed, a file removed or truncated. Python's
audit events do not see files that C code opens itself, so torch.save
(DeepSpeed's checkpoint files) and safetensors' save_file / save_model (every
safetensors file fastbond and transformers write) are wrapped to record their
target first, and a tokenizer's save_pretrained the files it returns
(tokenizer.json is written by the Rust tokenizers library). The test then
checks that every file the run left has a recorded writer, which is how a
writer missed here would show ($FASTBOND_TEST_NODE: the node, as the test
numbers them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# run as a script: this folder is sys.path[0]; the repository root instead, as `python -m fastbond` has it
sys.path[0] = str(Path(__file__).resolve().parents[2])

ROOT = os.path.realpath(os.environ["FASTBOND_AUDIT_ROOT"])
RANK = os.environ.get("RANK", "?")
NODE = os.environ.get("FASTBOND_TEST_NODE", "?")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# event name → which arguments are paths written
PATH_EVENTS = {"os.rename": (0, 1), "os.mkdir": (0,), "os.remove": (0,), "os.rmdir": (0,), "shutil.rmtree": (0,),
               "os.truncate": (0,), "os.link": (1,), "os.symlink": (1,), "fastbond.audit.write": (0,)}

os.makedirs(os.environ["FASTBOND_AUDIT_DIR"], exist_ok=True)
_log = open(os.path.join(os.environ["FASTBOND_AUDIT_DIR"], f"rank{RANK}.jsonl"), "a", encoding="utf-8")


def _inside(path) -> str | None:
    """`path` made absolute if it lies under the audited root, else None (file descriptors too)."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        return None
    full = os.path.realpath(os.path.abspath(path))
    return full if full == ROOT or full.startswith(ROOT + os.sep) else None


def _writes(event: str, args: tuple) -> list:
    if event == "open":
        path, mode, flags = args
        if isinstance(mode, str):
            writing = any(c in mode for c in "wax+")
        else:
            writing = isinstance(flags, int) and bool(flags & WRITE_FLAGS)
        return [path] if writing else []
    if event not in PATH_EVENTS:
        return []
    # with dir_fd the name is relative to a directory we cannot see here: shutil.rmtree's own
    # unlinks, recorded once as its "shutil.rmtree" event
    if event in ("os.remove", "os.rmdir", "os.mkdir") and args[-1] not in (None, -1):
        return []
    return [args[i] for i in PATH_EVENTS[event]]


def _hook(event: str, args: tuple) -> None:
    if event != "open" and event not in PATH_EVENTS:
        return
    for path in _writes(event, args):
        full = _inside(path)
        if full is not None:
            _log.write(json.dumps({"rank": RANK, "node": NODE, "event": event, "path": full}) + "\n")
            _log.flush()


def _recording(save, path_arg: int, path_kw: str):
    def recorded(*args, **kwargs):
        target = args[path_arg] if len(args) > path_arg else kwargs.get(path_kw)
        sys.audit("fastbond.audit.write", target)
        return save(*args, **kwargs)

    recorded.__wrapped__ = save
    return recorded


def _recording_returned(save):
    def recorded(*args, **kwargs):
        saved = save(*args, **kwargs)
        for path in saved or ():
            sys.audit("fastbond.audit.write", path)
        return saved

    recorded.__wrapped__ = save
    return recorded


def install() -> None:
    """The hook, and the C writers wrapped before anything imports them by name."""
    import safetensors.torch
    import torch
    from transformers import tokenization_utils_base, tokenization_utils_tokenizers

    torch.save = _recording(torch.save, 1, "f")
    safetensors.torch.save_file = _recording(safetensors.torch.save_file, 1, "filename")
    safetensors.torch.save_model = _recording(safetensors.torch.save_model, 1, "filename")
    for cls in (tokenization_utils_base.PreTrainedTokenizerBase, tokenization_utils_tokenizers.TokenizersBackend):
        cls.save_pretrained = _recording_returned(vars(cls)["save_pretrained"])
    sys.addaudithook(_hook)


if __name__ == "__main__":
    install()
    from fastbond.cli import main

    sys.exit(main(sys.argv[1:]))
