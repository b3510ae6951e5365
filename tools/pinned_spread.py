"""Measures how far the pinned metrics move with the CPU's float path: the basis of their tolerance.

    python tools/pinned_spread.py          # ~1 minute on 2 cores

tests/fastbond/algorithms/test_pinned_metrics.py pins every algorithm's metrics
for 3 steps on the stored π_ref. Another CPU sums floats in another order:
other vector widths in ATen's kernels (ATEN_CPU_CAPABILITY), in MKL's GEMMs
(MKL_ENABLE_INSTRUCTIONS, MKL_CBWR) and in oneDNN's (ONEDNN_MAX_CPU_ISA). This
runs the pinned configurations once under each float path this CPU can take,
in a fresh process each, and prints the largest spread: relative, over values
of magnitude ≥ 1e-3, and absolute, over the values near zero (a KL of a policy
equal to π_ref is 0 up to rounding). The test's tolerances are a few times these.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOAT_PATHS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "scalar": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
}
RUN_ONE = """
import json, os, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from fastbond.embedded import build_embedded_reference
build_embedded_reference(weights=sys.argv[3])
import test_pinned_metrics as pinned
records = {name: pinned.run_metrics(Path(tempfile.mkdtemp()), name) for name in pinned.SECTIONS}
Path(sys.argv[1]).write_text(json.dumps(records))
"""


def run(float_path: dict, out: Path) -> dict:
    from fastbond.embedded import VERSION

    weights = ROOT / "tests" / "fastbond" / "data" / f"embedded-{VERSION}-seed0.safetensors"
    env = dict(os.environ, FASTBOND_CACHE=tempfile.mkdtemp(), **float_path)
    subprocess.run([sys.executable, "-c", RUN_ONE, str(out), str(ROOT / "tests" / "fastbond" / "algorithms"),
                    str(weights)], env=env, check=True, capture_output=True, cwd=ROOT)
    return json.loads(out.read_text())


def spreads(runs: list[dict]) -> tuple[tuple, tuple, list[str]]:
    """(largest relative spread, largest absolute spread near zero, exact values that differ)."""
    relative, absolute, exact = (0.0, ""), (0.0, ""), []
    first = runs[0]
    for name, records in first.items():
        for step, record in enumerate(records):
            for key, value in record.items():
                values = [run[name][step][key] for run in runs]
                where = f"{name} step {step + 1} {key}"
                if value is None or isinstance(value, int) or key == "step":
                    exact += [where] if len(set(map(str, values))) > 1 else []
                    continue
                spread = max(values) - min(values)
                if abs(value) >= 1e-3:
                    relative = max(relative, (spread / abs(value), where))
                else:
                    absolute = max(absolute, (spread, where))
    return relative, absolute, exact


def main() -> None:
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, float_path in FLOAT_PATHS.items():
            runs.append(run(float_path, Path(scratch) / f"{label}.json"))
            print(f"ran {label}: {float_path or 'this CPU as it is'}", flush=True)
    (relative, where_relative), (absolute, where_absolute), exact = spreads(runs)
    print(f"largest relative spread (|value| >= 1e-3): {relative:.2e} ({where_relative})")
    print(f"largest absolute spread (|value| < 1e-3):  {absolute:.2e} ({where_absolute})")
    print(f"integer or missing values that differ: {exact or 'none'}")


if __name__ == "__main__":
    main()
