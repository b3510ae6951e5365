"""constraints.txt: the exact versions of an environment the whole suite passed on, for install.sh.

    python tools/constraints.py            # write constraints.txt from the running environment
    python tools/constraints.py --check    # exit 1 unless the running environment is constraints.txt

`bash install.sh` installs under these constraints, so a user gets the set
CI last passed with today and next month; `bash install.sh --latest` takes
the newest releases instead. The file is written by this tool only, from an
environment made by `bash install.sh --latest test` whose full suite passed
(the README's "Updating the known-good versions" says how), and CI runs
`--check` in the environment it builds from the file: a hand edit, or a pin
that no longer installs what it says, fails there.

Left out: fastbond itself; torch and the packages its build brings
(nvidia-*, cuda-*), which install.sh chooses by machine (the CPU build where
no GPU is present, TORCH_VERSION); and the tools of the virtual environment
itself (pip, setuptools, wheel). triton stays: on a CPU machine nothing else
fixes it. install.sh drops that one line where torch is a CUDA build, since
such a torch pins its own triton.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
LEFT_OUT = {"fastbond", "torch", "pip", "setuptools", "wheel"}
LEFT_OUT_PREFIXES = ("nvidia-", "cuda-")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def normalized(name: str) -> str:
    """PEP 503: case and runs of -_. do not matter in a distribution's name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(name: str) -> bool:
    return name not in LEFT_OUT and not name.startswith(LEFT_OUT_PREFIXES)


def installed() -> dict[str, str]:
    """{normalized name: version} of the running environment's distributions, the left-out ones excepted."""
    versions = {}
    for dist in importlib.metadata.distributions():
        name = normalized(dist.metadata["Name"] or "")
        if name and pinned(name):
            versions[name] = dist.version
    return versions


def read(path: Path = CONSTRAINTS) -> dict[str, str]:
    """{normalized name: version} of a constraints file; a line that is not `name==version` is an error."""
    versions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        if match is None:
            raise SystemExit(f"{path.name}:{number}: not a `name==version` pin: {line!r}")
        versions[normalized(match[1])] = match[2]
    return versions


def render(versions: dict[str, str]) -> str:
    torch = _version_or_none("torch")
    header = [
        "# The versions the whole suite last passed with: `bash install.sh` installs under them.",
        "# Written by tools/constraints.py; do not edit by hand (the README's \"Updating the known-good",
        "# versions\" says how to move them). CI checks that an install from this file reproduces it.",
        f"# Resolved on {datetime.date.today().isoformat()}: Python {platform.python_version()},"
        f" {platform.system()} {platform.machine()}, torch {torch} (torch itself is install.sh's choice).",
    ]
    return "\n".join(header + [f"{name}=={version}" for name, version in sorted(versions.items())]) + "\n"


def _version_or_none(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def differences(wanted: dict[str, str], found: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(wanted.keys() | found.keys()):
        if name not in found:
            lines.append(f"{name}=={wanted[name]} is pinned but not installed")
        elif name not in wanted:
            lines.append(f"{name} {found[name]} is installed but not pinned")
        elif wanted[name] != found[name]:
            lines.append(f"{name}=={wanted[name]} is pinned but {found[name]} is installed")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare the running environment with constraints.txt instead of writing it")
    parser.add_argument("--file", type=Path, default=CONSTRAINTS, help="the constraints file (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.check:
        args.file.write_text(render(installed()), encoding="utf-8")
        print(f"wrote {args.file} ({len(installed())} pins)")
        return 0
    if not args.file.is_file():
        print(f"{args.file}: no such file; `python tools/constraints.py` writes it", file=sys.stderr)
        return 1
    found = differences(read(args.file), installed())
    if found:
        print(f"this environment is not {args.file.name}:", *found, sep="\n  ", file=sys.stderr)
        return 1
    print(f"this environment is exactly {args.file.name} ({len(read(args.file))} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
