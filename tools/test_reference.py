"""Writes the weights of the tests' π_ref: tests/fastbond/data/embedded-<version>-seed0.safetensors.

    python tools/test_reference.py

The tests build the embedded world from these weights instead of pretraining
it on the machine at hand (tests/fastbond/conftest.py), so what they pin —
tests/fastbond/algorithms/pinned_metrics.json above all — does not depend on
the order in which a CPU's vector units sum floats. Run this when the
embedded π_ref changes (a new `fastbond.embedded.VERSION`), then re-pin:

    FASTBOND_REPIN=1 python -m pytest tests/fastbond/algorithms/test_pinned_metrics.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastbond.embedded import VERSION, build_embedded_reference  # noqa: E402

TARGET = ROOT / "tests" / "fastbond" / "data" / f"embedded-{VERSION}-seed0.safetensors"


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        built = build_embedded_reference(cache, seed=0)
        TARGET.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built / "model.safetensors", TARGET)
    print(f"wrote {TARGET.relative_to(ROOT)} ({TARGET.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
