"""What installs and imports: no folder of the repository shadows the PyPI package `kernels`,
and the tools behind install.sh's known-good versions read and write what they say.

transformers (>= 5.25) imports Hugging Face's `kernels` at start-up. Every launch
of fastbond from a checkout puts some folder of the repository first on sys.path:
the root (`python -m pytest`, `python -m fastbond`, `deepspeed --module fastbond`),
or a test folder (pytest's rootdir-relative imports put `tests/`, `tests/kernels`, …
there). A regular package or a module named `kernels` in any of them would be
imported instead of Hugging Face's, and transformers would fail to import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


constraints = _tool("constraints")


NOT_LAUNCHED_FROM = {"fastbond", "build", "dist"}  # the package itself; setuptools' build output


def launch_folders() -> list[Path]:
    """Every folder of the repository a launch may put first on sys.path: the root and each folder of
    tests, benchmarks, tools or examples."""
    folders = {ROOT}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if not any(part.startswith(".") or part.endswith(".egg-info") for part in relative.parts) \
                and relative.parts[0] not in NOT_LAUNCHED_FROM:
            folders.add(path.parent)
    return sorted(folders)


def test_no_folder_a_launch_puts_on_sys_path_holds_a_kernels_package_or_module():
    shadows = [str((folder / name).relative_to(ROOT)) for folder in launch_folders()
               for name in ("kernels/__init__.py", "kernels.py") if (folder / name).exists()]
    assert shadows == [], f"these would shadow Hugging Face's `kernels` when their folder is on sys.path: {shadows}"
    assert (ROOT / "fastbond" / "kernels" / "__init__.py").is_file()


@pytest.mark.smoke
def test_kernels_resolves_to_the_installed_distribution_from_every_launch_folder():
    """With every such folder first on sys.path, from the root, `import kernels` is Hugging Face's
    and transformers' model code imports."""
    try:
        distribution = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers < 5.25 does not need it; "
                    "the test extra installs it)")
    expected = Path(distribution.locate_file("kernels/__init__.py")).resolve()
    folders = [str(folder) for folder in launch_folders()]
    code = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); import kernels; "
            "import transformers.modeling_utils; print(kernels.__file__)")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(folders)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip().splitlines()[-1]).resolve() == expected


@pytest.mark.smoke
def test_the_test_session_itself_imports_huggingfaces_kernels():
    """pytest's own sys.path (rootdir, tests/, tests/kernels, …) does not shadow it either."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed")
    import kernels

    assert kernels.__file__ is not None and ROOT not in Path(kernels.__file__).resolve().parents


def test_the_fused_ops_import_as_fastbond_kernels():
    import fastbond.kernels

    assert Path(fastbond.kernels.__file__).resolve() == ROOT / "fastbond" / "kernels" / "__init__.py"


# ---------------------------------------------------------------------------
# constraints.txt and tools/constraints.py


def test_constraints_file_pins_every_line_and_leaves_torch_to_install_sh():
    pins = constraints.read(ROOT / "constraints.txt")
    assert {"transformers", "safetensors", "pytest", "deepspeed", "peft"} <= set(pins)
    assert "torch" not in pins and "fastbond" not in pins
    assert not [name for name in pins if name.startswith(("nvidia-", "cuda-"))]


def test_written_constraints_read_back_and_check_against_the_environment(tmp_path):
    path = tmp_path / "constraints.txt"
    assert constraints.main(["--file", str(path)]) == 0
    assert constraints.read(path) == constraints.installed()
    assert constraints.main(["--check", "--file", str(path)]) == 0
    text = path.read_text().replace(f"pytest=={importlib.metadata.version('pytest')}", "pytest==0.0.1")
    path.write_text(text)
    assert constraints.main(["--check", "--file", str(path)]) == 1


def test_differences_name_each_kind_of_mismatch():
    lines = constraints.differences({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "9", "d": "4"})
    assert lines == ["b==2 is pinned but 9 is installed", "c==3 is pinned but not installed",
                     "d 4 is installed but not pinned"]


def test_a_hand_written_line_that_is_not_a_pin_is_refused(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text("transformers>=5\n")
    with pytest.raises(SystemExit, match=r"constraints.txt:1: not a `name==version` pin"):
        constraints.read(path)


def test_names_are_compared_as_pep_503_names(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text("# comment\nPyYAML==6.0\nhf_xet==1.0\n")
    assert constraints.read(path) == {"pyyaml": "6.0", "hf-xet": "1.0"}


def test_versions_line_names_every_package_ci_prints():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "versions.py")], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    for name in ["python", "torch", "transformers", "deepspeed", "peft", "triton", "kernels"]:
        assert f"{name} " in first, first
    assert f"torch {importlib.metadata.version('torch')}" in first
