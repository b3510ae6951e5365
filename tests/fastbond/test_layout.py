"""The import rules that keep the code changeable (docs/architecture.md), checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_only_the_deepspeed_engine_imports_deepspeed():
    allowed = {ROOT / "fastbond/engines/deepspeed/engine.py", ROOT / "fastbond/engines/deepspeed/zero.py"}
    offenders = [str(path.relative_to(ROOT)) for path in sources("fastbond")
                 if path not in allowed and any(m.split(".")[0] == "deepspeed" for m in imported_modules(path))]
    assert offenders == []


def test_kernels_import_no_trainer_module():
    """The fused ops and their oracles depend on the theory (bon.py) and on each other only."""
    offenders = {}
    for path in sources("fastbond/kernels"):
        bad = [m for m in imported_modules(path)
               if m.startswith("fastbond") and not (m.startswith("fastbond.kernels") or m == "fastbond.bon")]
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_the_training_loop_does_not_branch_on_distribution():
    """No name in train.py's code speaks of DeepSpeed or distribution, and nothing compares the
    world size: what differs between one process and K ranks is the engine's business."""
    tree = ast.parse((ROOT / "fastbond/train.py").read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not [n for n in names if "deepspeed" in n.lower() or "distributed" in n.lower()]
    compared = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Compare)
                and any(isinstance(side, ast.Attribute) and side.attr == "world"
                        for side in [node.left, *node.comparators])]
    assert compared == []


def test_reading_a_config_imports_no_torch():
    """A config mistake is reported before torch loads (seconds on a cold machine)."""
    code = ("import sys; from fastbond.config import load_config; load_config(None, ['algorithm.name=rloo']); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "False", done.stderr
