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


# --------------------------------------------------------------------------- #
# seams, not branches: no import circle; vLLM and LoRA branched on in their own modules


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """fastbond module → the fastbond modules it imports anywhere (function-local imports included: an
    import kept inside a function to dodge a circle is still a circle)."""
    modules = {module_name(path): path for path in sources("fastbond")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(resolve(alias.name) for alias in node.names if alias.name.startswith("fastbond"))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fastbond"):
                deps.update(resolve(f"{node.module}.{alias.name}") or resolve(node.module) for alias in node.names)
        graph[name] = deps - {None, name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def branches_on(*words: str) -> dict[str, int]:
    """Module path → how many `if` / conditional / comprehension tests mention one of `words`."""
    found = {}
    for path in sources("fastbond"):
        tests = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.If, ast.IfExp, ast.While)):
                tests.append(node.test)
            elif isinstance(node, ast.comprehension):
                tests.extend(node.ifs)
        count = sum(any(word in ast.unparse(test).lower() for word in words) for test in tests)
        if count:
            found[str(path.relative_to(ROOT))] = count
    return found


def test_only_the_vllm_sampler_branches_on_vllm():
    """How responses are drawn is the sampler's business (`fastbond.rollout.backends` picks one); the
    config's own checks of its keys are the config's."""
    allowed = {"fastbond/rollout/vllm_sampler.py", "fastbond/rollout/backends.py", "fastbond/config/schema.py"}
    assert set(branches_on("vllm")) <= allowed, branches_on("vllm")


# LoRA is a policy form (`fastbond.lora.LoraForm`): engines, samplers, the evaluation, `fastbond merge` and
# the planner call the form (or a table keyed by its name) and never ask which it is. Only lora.py, the
# config's checks of its keys, the registry that picks the form and LoRA's own plan rows branch on it.
LORA_MODULES = {"fastbond/lora.py", "fastbond/config/schema.py", "fastbond/models/registry.py",
                "fastbond/plan/lora.py"}


# One test outside them, not a branch of behaviour: the full form refuses, in one line, to judge a directory
# that holds a LoRA adapter (`is_adapter_dir`, defined once in models/loading.py for both forms).
LORA_REFUSALS = {"fastbond/models/full.py": 1}


def test_only_the_lora_form_branches_on_lora():
    found = {path: n for path, n in branches_on("lora", "adapter").items() if path not in LORA_MODULES}
    assert found == LORA_REFUSALS


def test_engines_hold_the_policy_through_its_form_alone():
    """No engine imports the LoRA module: what it holds, it holds through `PolicyForm` and its placer."""
    def imports_lora(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "fastbond":
                if any(alias.name == "lora" for alias in node.names):
                    return True
        return "fastbond.lora" in imported_modules(path)

    assert [str(path.relative_to(ROOT)) for path in sources("fastbond/engines") if imports_lora(path)] == []
