"""Atomic training checkpoints, without pickle.

A checkpoint is a directory `checkpoints/step-000123/` holding
  policy/                 the policy in transformers format (safetensors) + tokenizer
  tensors.safetensors     every other tensor: anchor EMA state, optimizer moments, RNG states
  state.json              everything else: step, data position, scheduler, optimizer hyper-parameters

It is written into a temporary sibling directory, flushed, and renamed into
place in one `os.replace`; `checkpoints/latest` (a one-line file, replaced
atomically too) then names it. A run killed at any moment leaves either the
previous checkpoint or the new one, never a half-written one that resume
would pick up. Checkpoints are ordered by their step number (never by name:
`step-1000000` sorts before `step-999999` as text).

A checkpoint damaged after it was written (a truncated or emptied file, a
`state.json` without its keys, a DeepSpeed shard from another rank or run,
a flipped bit) is found before anything loads from it (`damage`): every
file's structure is checked, then its checksum against the `manifest.json`
written with the checkpoint (`fastbond.integrity`). Resuming from a damaged
latest checkpoint is refused with the previous complete one named
(`checkpoint.resume=previous` resumes from it and moves the damaged ones
aside, into `checkpoints/damaged/`). A missing or damaged `latest` pointer is
not an error: resume takes the newest complete checkpoint and says which.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastbond import atomic
from fastbond.errors import FastbondError
from fastbond.integrity import (  # noqa: F401  (safetensors_damage: re-exported)
    MANIFEST,
    has_manifest,
    manifest_damage,
    safetensors_damage,
    write_manifest,
    zero_shards_damage,
)

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
    final = checkpoints_dir / checkpoint_name(step)
    tmp = checkpoints_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        policy.save_pretrained(tmp / "policy", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "policy")
        tensors: dict[str, torch.Tensor] = {}
        skeleton = split_tensors(state, tensors)
        save_file(tensors, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "state": skeleton}))
    except BaseException:  # a full disk, a kill signal: leave no partial copy taking space
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish(tmp, final, keep)


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


_NAME = re.compile(r"step-(\d+)")


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint directory's name holds, or None if it is not one."""
    match = _NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The finished checkpoint directories, oldest step first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def publish(tmp: Path, final: Path, keep: int) -> Path:
    """A completely written temporary checkpoint directory becomes `final` and the latest one:
    its files' checksums recorded (manifest.json), flushed, renamed into place, `latest` moved to it,
    older ones beyond `keep` removed."""
    write_manifest(tmp)
    atomic.swap_in(tmp, final)  # re-saving the same step replaces it
    atomic.write_text(final.parent / "latest", final.name + "\n")
    _prune(final.parent, keep)
    return final


def _prune(checkpoints_dir: Path, keep: int) -> None:
    finished = list_checkpoints(checkpoints_dir)
    for old in finished[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoints_dir.glob(".tmp-step-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)


def _follow(pointer: Path) -> tuple[Path | None, str | None]:
    """(the checkpoint the pointer file names, None), or (None, why it leads nowhere: "is missing", …)."""
    if not pointer.is_file():
        return None, "is missing"
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        return None, "is damaged (it is not text)"
    except OSError as error:
        return None, f"cannot be read ({error.strerror or error})"
    if checkpoint_step(Path(name)) is None or "/" in name:
        shown = name if len(name) <= 40 else name[:40] + "…"
        return None, f"is damaged (it holds {shown!r}, not a checkpoint's name)"
    path = pointer.parent / name
    if not (path / "state.json").is_file():
        return None, f"names {name}, which is missing or incomplete"
    return path, None


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or None without a pointer. Not checked for damage: see
    `resume_checkpoint`, which also copes with a damaged pointer; here one that leads nowhere is one line."""
    pointer = checkpoints_dir / "latest"
    path, problem = _follow(pointer)
    if problem == "is missing":
        return None
    if problem is not None:
        raise FastbondError(f"checkpoint pointer {pointer} {problem}")
    return path


# --------------------------------------------------------------------------- #
# damage
# --------------------------------------------------------------------------- #


def _state_damage(path: Path) -> str | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return "is not readable JSON"
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not isinstance(meta.get("state"), dict):
        return "lacks its step or state"
    return None


def damage(checkpoint: Path, checksums: bool = True) -> str | None:
    """The first damaged file of a checkpoint, as "FILE is truncated (…)", or None if it reads.

    Structure first (cheap: headers, zip directories, which files are there), then, with `checksums`,
    every file against manifest.json (reads every byte; a checkpoint without a manifest is checked by
    its structure only).
    """
    state = checkpoint / "state.json"
    if not state.is_file():
        return "state.json is missing"
    problem = _state_damage(state)
    if problem:
        return f"state.json {problem}"
    if not (checkpoint / "policy" / "config.json").is_file():
        return "policy/config.json is missing"
    zero = checkpoint / "zero"
    if not zero.is_dir() and not (checkpoint / "tensors.safetensors").is_file():
        return "tensors.safetensors is missing"  # a one-process checkpoint's optimizer, anchor and RNG
    weights = sorted(checkpoint.rglob("*.safetensors"))
    if not any(p.parent == checkpoint / "policy" for p in weights):
        return "policy/ has no safetensors weights"
    for path in weights:
        problem = safetensors_damage(path)
        if problem:
            return f"{path.relative_to(checkpoint)} {problem}"
    if zero.is_dir():  # DeepSpeed's shards, pickled: checked as zip archives, never unpickled here
        world = json.loads(state.read_text())["state"].get("world_size")
        if not isinstance(world, int) or world < 1:
            return "state.json lacks the world size its zero/ shards were saved on"
        problem = zero_shards_damage(zero, world)
        if problem:
            return problem
    return manifest_damage(checkpoint) if checksums else None


def model_dir_damage(model_dir: Path) -> str | None:
    """The first damaged weights file of a transformers model directory, or None."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        problem = safetensors_damage(path)
        if problem:
            return f"{path} {problem}"
    return None


def _mode(mode) -> str:
    return "true" if mode is True else str(mode)


def _set_aside(checkpoints_dir: Path, kept: Path) -> str:
    """Checkpoints after `kept` moved into checkpoints/damaged/ (never deleted); `latest` names `kept`.
    Returns what was moved, as "step-…, step-… aside to DIR (not deleted)", or ""."""
    aside = checkpoints_dir / "damaged"
    moved = []
    for later in list_checkpoints(checkpoints_dir):
        if checkpoint_step(later) > checkpoint_step(kept):
            aside.mkdir(exist_ok=True)
            os.replace(later, aside / later.name)
            moved.append(later.name)
    atomic.write_text(checkpoints_dir / "latest", kept.name + "\n")
    return f"{', '.join(moved)} aside to {aside} (not deleted)" if moved else ""


def _say_if_unchecked(checkpoint: Path, say) -> Path:
    if not has_manifest(checkpoint):
        say(f"{checkpoint.name} has no {MANIFEST} (written by an earlier fastbond): checked by its structure "
            "only, not by checksums")
    return checkpoint


def _newest_complete(checkpoints_dir: Path, found: list[Path], why: str, say) -> Path:
    """With no usable `latest` pointer: the newest checkpoint that is not damaged, said in one line."""
    problems = {}
    for candidate in reversed(found):
        problems[candidate] = damage(candidate)
        if problems[candidate] is None:
            moved = _set_aside(checkpoints_dir, candidate)
            say(f"checkpoint pointer {why}: resuming from the newest complete checkpoint {candidate.name}"
                + (f"; moved {moved}" if moved else ""))
            return _say_if_unchecked(candidate, say)
    raise FastbondError(f"checkpoint pointer {why}, and no checkpoint in {checkpoints_dir} is complete (the newest, "
                        f"{found[-1].name}: {problems[found[-1]]}); start over with --force")


def resume_checkpoint(checkpoints_dir: Path, mode, say=print) -> Path:
    """The checkpoint to resume from: the latest (mode true) or the newest complete one before it
    (mode "previous"); refuses a damaged one with a one-line error that names the way out. Without
    a usable `latest` pointer (missing, unreadable, naming nothing) the newest complete checkpoint is
    taken, and the pointer rewritten to name it (the other ranks read it)."""
    pointer = checkpoints_dir / "latest"
    latest, pointer_problem = _follow(pointer)
    found = list_checkpoints(checkpoints_dir)
    if latest is None:
        if not found:
            told = "" if pointer_problem == "is missing" else f" (its pointer {pointer} {pointer_problem})"
            raise FastbondError(f"checkpoint.resume={_mode(mode)} but {checkpoints_dir} holds no checkpoint{told}")
        if mode != "previous":
            return _newest_complete(checkpoints_dir, found, f"{pointer} {pointer_problem}", say)
        latest = found[-1]
    older = [p for p in found if checkpoint_step(p) < checkpoint_step(latest)]
    if mode != "previous":
        problem = damage(latest)
        if problem is None:
            return _say_if_unchecked(latest, say)
        fallback = next((p for p in reversed(older) if damage(p) is None), None)
        way_out = (f"resume from the previous complete checkpoint {fallback.name} with checkpoint.resume=previous"
                   if fallback else "no earlier complete checkpoint exists: start over with --force")
        raise FastbondError(f"the latest checkpoint {latest} is damaged: {problem}; {way_out}")
    fallback = next((p for p in reversed(older) if damage(p) is None), None)
    if fallback is None:
        raise FastbondError(f"checkpoint.resume=previous: {checkpoints_dir} holds no complete checkpoint "
                            f"older than {latest.name}")
    moved = _set_aside(checkpoints_dir, fallback)
    say(f"resuming from {fallback.name}" + (f"; moved {moved}" if moved else ""))
    return _say_if_unchecked(fallback, say)


def checkpoint_shared(checkpoint: Path) -> dict:
    """The state every rank shares (data position, the run's config, the prompts' fingerprint),
    from state.json alone: what a resume is checked against before any tensor loads."""
    try:
        meta = json.loads((checkpoint / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    shared = meta.get("state", {}).get("shared", {})
    return shared if isinstance(shared, dict) else {}


def load_checkpoint(path: Path) -> tuple[int, dict[str, Any]]:
    """(step, state) of a checkpoint written by `save_checkpoint`; the policy is in `path / "policy"`."""
    problem = damage(path, checksums=False)  # resume_checkpoint has compared the checksums
    if problem:
        raise FastbondError(f"checkpoint {path} is damaged: {problem}")
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "tensors.safetensors"))
    except (OSError, ValueError) as error:
        raise FastbondError(f"cannot read checkpoint {path}: {error}") from None
    return int(meta["step"]), join_tensors(meta["state"], tensors)
