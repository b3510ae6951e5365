"""Prints the versions of what fastbond runs on, one line, before anything imports them.

    python tools/versions.py            # python 3.11.7 · torch 2.13.0+cpu · transformers 5.25.0 · …

CI prints this first for every environment it builds, so a log says which
release set a failure happened on. Versions come from the installed
distributions' metadata: nothing is imported, so a broken package still
shows its version instead of a traceback. `kernels` is the Hugging Face
package transformers (>= 5.25) imports at start-up; where it resolves from
is printed too, since a stray top-level `kernels/` in the working directory
would shadow it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

PACKAGES = ["torch", "transformers", "deepspeed", "peft", "triton", "kernels"]


def installed_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def kernels_origin() -> str:
    """Where `import kernels` resolves from the current directory, as `python -m …` launched there sees it."""
    sys.path.insert(0, os.getcwd())
    try:
        spec = importlib.util.find_spec("kernels")
    finally:
        sys.path.pop(0)
    if spec is None:
        return "nowhere"
    return spec.origin or f"a namespace package: {list(spec.submodule_search_locations or [])}"


def main() -> None:
    versions = [f"python {platform.python_version()}"] + [f"{name} {installed_version(name)}" for name in PACKAGES]
    print(" · ".join(versions))
    print(f"import kernels (from {os.getcwd()}) → {kernels_origin()}")


if __name__ == "__main__":
    main()
