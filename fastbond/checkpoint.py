"""Atomic training checkpoints, without pickle.

A checkpoint is a directory `checkpoints/step-000123/` holding
  policy/                 the policy in transformers format (safetensors) + tokenizer
  tensors.safetensors     every other tensor: anchor EMA state, optimizer moments, RNG states
  state.json              everything else: step, data position, scheduler, optimizer hyper-parameters

It is written into a temporary sibling directory, flushed, and renamed into
place in one `os.replace`; `checkpoints/latest` (a one-line file, replaced
atomically too) then names it. A run killed at any moment leaves either the
previous checkpoint or the new one, never a half-written one that resume
would pick up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastbond.errors import FastbondError

TENSOR_KEY = "__tensor__"
TUPLE_KEY = "__tuple__"


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-able copy of `obj` with each tensor moved into `tensors` under its path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {TENSOR_KEY: path}
    if isinstance(obj, dict):
        return {str(k): split_tensors(v, tensors, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {TUPLE_KEY: [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `split_tensors`. Dict keys that were ints come back as ints
    (torch optimizers key their state by parameter index)."""
    if isinstance(obj, dict):
        if set(obj) == {TENSOR_KEY}:
            return tensors[obj[TENSOR_KEY]]
        if set(obj) == {TUPLE_KEY}:
            return tuple(join_tensors(v, tensors) for v in obj[TUPLE_KEY])
        return {(int(k) if k.lstrip("-").isdigit() else k): join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    policy,
    tokenizer,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write `state` (tensors anywhere inside) and the policy atomically; returns the directory."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{step:06d}"
    tmp = checkpoints_dir / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    policy.save_pretrained(tmp / "policy", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "policy")
    tensors: dict[str, torch.Tensor] = {}
    skeleton = split_tensors(state, tensors)
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "state": skeleton}))
    return publish(tmp, final, keep)


def publish(tmp: Path, final: Path, keep: int) -> Path:
    """A completely written temporary checkpoint directory becomes `final` and the latest one:
    flushed, renamed into place, `latest` moved to it, older ones beyond `keep` removed."""
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step: swap the old one out first
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(final.parent / "latest", final.name + "\n")
    _prune(final.parent, keep)
    return final


def _prune(checkpoints_dir: Path, keep: int) -> None:
    finished = sorted(p for p in checkpoints_dir.glob("step-*") if p.is_dir())
    for old in finished[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoints_dir.glob(".tmp-step-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    pointer = checkpoints_dir / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints_dir / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FastbondError(f"checkpoint pointer {pointer} names {path.name}, which is missing or incomplete")
    return path


def load_checkpoint(path: Path) -> tuple[int, dict[str, Any]]:
    """(step, state) of a checkpoint written by `save_checkpoint`; the policy is in `path / "policy"`."""
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "tensors.safetensors"))
    except (OSError, ValueError) as error:
        raise FastbondError(f"cannot read checkpoint {path}: {error}") from None
    return int(meta["step"]), join_tensors(meta["state"], tensors)
