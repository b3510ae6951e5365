"""Whether the files of a checkpoint are the ones that were written: their structure, and their checksums.

Two kinds of check, both without loading (or unpickling) anything:

* **structure**, cheap, from headers and directories alone:
  - a safetensors file's header must parse and its tensors' byte ranges end
    exactly where the file does (every truncation is found);
  - a torch file (DeepSpeed's `zero/*.pt`, pickled) is a zip archive: its
    central directory must be present (it sits at the end, so a truncation
    removes it), and it must hold `<name>/data.pkl` under the archive name
    torch gives it, which is the file's own name (a shard copied over from
    another rank carries that rank's name inside);
  - DeepSpeed's shards as a set (`zero_shards_damage`): one per rank of the
    world size the checkpoint was saved on, none from a rank beyond it, and
    every rank's tensors of the same sizes (ZeRO pads partitions to equal
    sizes, so a shard from a run on another number of ranks differs).
* **checksums**: `manifest.json`, written into the checkpoint before it is
  renamed into place, records every file's size and SHA-256; on resume each
  file is read again and compared, so a bit flipped inside tensor data, or
  a file of the same name and size from another run, is found too. Files are
  hashed in parallel threads (hashlib releases the GIL on large reads).
  SHA-256 rather than a faster CRC: the manifest can be checked by hand
  with `sha256sum`, and its cost is measured in docs/reliability.md.

A checkpoint written before manifests existed has none: it is checked by its
structure only (`resume_checkpoint` says so in a line).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastbond import atomic

MANIFEST = "manifest.json"
HASH = "sha256"
READ_BYTES = 8 * 2**20  # large reads: hashing, not system calls, sets the pace
THREADS = max(1, min(8, os.cpu_count() or 1))


# --------------------------------------------------------------------------- #
# structure
# --------------------------------------------------------------------------- #


def safetensors_damage(path: Path) -> str | None:
    """Why a safetensors file is unreadable (empty, truncated, a bad header), or None.

    Reads the header only: its tensors' byte ranges must end exactly at the
    file's end. That finds every truncation; a flipped bit inside the data
    is the manifest's to find.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return "is empty" if size == 0 else "is truncated (no header)"
            length = int.from_bytes(head, "little")
            if 8 + length > size:
                return f"is truncated ({size} bytes, its header alone claims {8 + length})"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        return f"cannot be read ({error})"
    if not isinstance(header, dict):
        return "has a malformed header"
    try:
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError):
        return "has a malformed header"
    if 8 + length + end != size:
        return f"is truncated ({size} bytes, its header says {8 + length + end})"
    return None


def _torch_zip(path: Path) -> tuple[zipfile.ZipFile | None, str | None]:
    """(the open archive, None) or (None, why it is not a whole torch file)."""
    try:
        if path.stat().st_size == 0:
            return None, "is empty"
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        return None, "is truncated or not a torch file (no zip central directory at its end)"
    except (ValueError, EOFError, OverflowError, NotImplementedError) as error:  # a garbled directory
        return None, f"has a damaged zip directory ({error})"
    except OSError as error:
        return None, f"cannot be read ({error.strerror or error})"
    names = archive.namelist()
    if f"{path.stem}/data.pkl" not in names:
        inside = sorted({name.split("/")[0] for name in names})
        archive.close()
        return None, (f"holds {', '.join(inside[:2]) or 'nothing'}, not {path.stem}: "
                      "a file from another rank or another run")
    return archive, None


def torch_file_damage(path: Path) -> str | None:
    """Why a file written by `torch.save` is not whole, from its zip directory alone (nothing unpickled)."""
    archive, problem = _torch_zip(path)
    if archive is not None:
        archive.close()
    return problem


# DeepSpeed's names: zero_pp_rank_{r}_mp_rank_00_{optim,model}_states.pt (bf16_ in front under bf16 ZeRO-1),
# and mp_rank_00_model_states.pt written by rank 0 alone under ZeRO 0-2.
_SHARD = re.compile(r"(?P<kind>(?:bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_\d+_(?:optim|model)_states)\.pt")


def _tensor_sizes(path: Path) -> list[int]:
    with zipfile.ZipFile(path) as archive:
        return sorted(info.file_size for info in archive.infolist() if f"{path.stem}/data/" in info.filename)


def zero_shards_damage(zero_dir: Path, world: int) -> str | None:
    """The first of DeepSpeed's shards in `zero_dir` that is not whole, missing, or not this checkpoint's,
    as "zero/FILE why", or None. `world`: the number of ranks the checkpoint was saved on."""
    shards = sorted(zero_dir.glob("*.pt"))
    if not shards:
        return "zero/ holds no DeepSpeed shard"
    for path in shards:
        problem = torch_file_damage(path)
        if problem:
            return f"zero/{path.name} {problem}"
    kinds: dict[str, dict[int, Path]] = {}  # a shard's name with its rank blanked → rank → file
    for path in shards:
        match = _SHARD.fullmatch(path.name)
        if match is None:
            continue
        rank = int(match.group("rank"))
        if rank >= world:
            return f"zero/{path.name} is from a run on more ranks (this checkpoint was saved on {world})"
        kind = path.name[: match.start("rank")] + "{rank}" + path.name[match.end("rank"):]
        kinds.setdefault(kind, {})[rank] = path
    for kind, by_rank in sorted(kinds.items()):
        for rank in range(world):
            if rank not in by_rank:
                return f"zero/{kind.format(rank=rank)} is missing (this checkpoint was saved on {world} ranks)"
        first = _tensor_sizes(by_rank[0])
        for rank in range(1, world):
            if _tensor_sizes(by_rank[rank]) != first:
                return (f"zero/{by_rank[rank].name} does not match rank 0's shard (other tensor sizes: "
                        "a file from a run on another number of ranks, or another model)")
    return None


# --------------------------------------------------------------------------- #
# checksums
# --------------------------------------------------------------------------- #


def file_digest(path: Path, algorithm: str = HASH) -> str:
    digest = hashlib.new(algorithm)
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            read = handle.readinto(buffer)
            if not read:
                break
            digest.update(view[:read])
    return digest.hexdigest()


def _listed_files(root: Path) -> list[Path]:
    """The files a manifest covers: every regular file under `root` but the manifest and hidden files."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def write_manifest(root: Path) -> Path:
    """`root/manifest.json`: every file's size and checksum (call it on the finished temporary checkpoint,
    before it is renamed into place)."""
    files = _listed_files(root)
    with ThreadPoolExecutor(THREADS) as pool:
        digests = list(pool.map(file_digest, files))
    entries = {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, HASH: d} for p, d in zip(files, digests)}
    path = root / MANIFEST
    atomic.write_text(path, json.dumps({"format": 1, "hash": HASH, "files": entries}, indent=1) + "\n")
    return path


def has_manifest(root: Path) -> bool:
    return (root / MANIFEST).is_file()


def manifest_damage(root: Path) -> str | None:
    """The first file of `root` that differs from its manifest (missing, another size, another checksum,
    not listed), as "FILE why", or None; None too when there is no manifest (see `has_manifest`)."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        entries = {str(name): (int(entry["bytes"]), str(entry[manifest["hash"]]))
                   for name, entry in manifest["files"].items()}
        algorithm = manifest["hash"]
        hashlib.new(algorithm)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is not a readable manifest"
    if any(Path(name).is_absolute() or ".." in Path(name).parts for name in entries):
        return f"{MANIFEST} names a file outside the checkpoint"
    for name, (size, _) in sorted(entries.items()):
        file = root / name
        if not file.is_file():
            return f"{name} is missing (listed in {MANIFEST})"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {MANIFEST} says {size}"
    for file in _listed_files(root):
        if file.relative_to(root).as_posix() not in entries:
            return f"{file.relative_to(root).as_posix()} is not in {MANIFEST} (added after the checkpoint was written)"
    names = sorted(entries)
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            found = list(pool.map(lambda name: file_digest(root / name, algorithm), names))
    except OSError as error:
        return f"a file cannot be read ({error.strerror or error})"
    for name, digest in zip(names, found):
        if digest != entries[name][1]:
            return (f"{name} does not match its {algorithm} in {MANIFEST}: its bytes changed after it was written "
                    "(a flipped bit, or a file from another run)")
    return None
