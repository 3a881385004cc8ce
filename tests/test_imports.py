"""The package's shape: no import circle between leanmoe's modules, no arrow from the kernels up to
the model, and `import leanmoe` loads no Triton (its import costs seconds)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import leanmoe

ROOT = Path(leanmoe.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """leanmoe modules `path` imports: at module level outside TYPE_CHECKING, or anywhere at all."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("leanmoe")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("leanmoe"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from leanmoe.x import y` may name a module
    return found


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in _imports(p, top_level_only) if m in modules and m != name}
            for name, p in modules.items()}


def test_no_import_circle():
    # every import counts: module level, function-local (lazy) and TYPE_CHECKING-only alike
    graph = _graph(top_level_only=False)
    # a package's __init__ re-exporting its modules is not a dependency of those modules on it
    graph = {m: {d for d in deps if not (graph.get(d) is not None and m.startswith(d + "."))}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_kernels_never_import_the_model_or_anything_above():
    above = ("leanmoe.model", "leanmoe.train", "leanmoe.infer", "leanmoe.parallel", "leanmoe.data")
    for m, deps in _graph(top_level_only=False).items():
        if m.startswith("leanmoe.kernels"):
            bad = sorted(d for d in deps if d.startswith(above))
            assert not bad, f"{m} imports {bad}"


def test_the_model_knows_nothing_of_ranks_training_or_serving():
    above = ("leanmoe.train", "leanmoe.infer", "leanmoe.parallel")
    for m, deps in _graph(top_level_only=False).items():
        if m.startswith("leanmoe.model"):
            bad = sorted(d for d in deps if d.startswith(above))
            assert not bad, f"{m} imports {bad}"


def test_no_module_above_500_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 520}
    assert not long, long


def test_import_leanmoe_loads_no_triton():
    code = ("import sys, leanmoe, leanmoe.train, leanmoe.infer, leanmoe.parallel, leanmoe.cli; "
            "assert 'triton' not in sys.modules, 'triton was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
