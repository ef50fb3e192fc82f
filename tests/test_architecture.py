"""The shape of the house (issue 12): imports run one way, from the CLI down to pure computation,
with no circle; ``bench/`` names no concrete plugin; plugins import only the public API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bench.api import list_datasets, list_heads

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# Layers, bottom (0) to top. A module may import modules of its own package or of a LOWER layer.
LAYERS: dict[str, int] = {
    "bench.core": 0,
    "bench.api": 1,
    "bench.eval": 2, "bench.models": 2, "bench.data": 2,
    "bench.config": 3, "bench.results": 3,
    "bench.engine": 4,
    "bench.report": 5,
    "bench.perf": 6,
    "bench.cluster": 6,
    "bench.cli": 7,
}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def package_of(module: str) -> str:
    """The layer a module belongs to (its entry in LAYERS)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} is in no layer of LAYERS: add its folder to the table")


def bench_imports(path: Path) -> set[str]:
    """Every ``bench.*`` module ``path`` imports, at module level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "bench":
            # ``from pkg import submodule`` depends on the submodule; ``from mod import name`` on mod
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(_module_files())
            out |= subs if len(subs) == len(node.names) else subs | {node.module}
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "bench")
    return out


def _module_files() -> dict[str, Path]:
    return {module_name(p): p for p in BENCH.rglob("*.py")}


MODULES = _module_files()


def edges() -> dict[str, set[str]]:
    return {m: {d for d in bench_imports(p) if d in MODULES and d != m} for m, p in MODULES.items()}


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        if module != "bench":
            package_of(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "bench"))
def test_imports_only_go_down(module: str) -> None:
    here = package_of(module)
    for dep in sorted(edges()[module]):
        if dep == "bench":
            continue
        there = package_of(dep)
        if there == here:
            continue
        assert LAYERS[there] < LAYERS[here], f"{module} (layer {LAYERS[here]}) imports {dep} (layer {LAYERS[there]}): imports must go down"


def test_no_import_circle() -> None:
    graph = edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def string_literals(path: Path) -> list[tuple[int, str]]:
    """String constants of a module, except docstrings (comments are not in the AST)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_bench_names_no_registered_head_or_dataset() -> None:
    """``bench/`` reads plugin metadata; it never names a concrete head or dataset in code."""
    names = set(list_heads()) | set(list_datasets())
    assert {"baseline", "csra", "shapes", "voc2007"} <= names  # the check is not vacuous
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for path in sorted(BENCH.rglob("*.py"))
        for line, text in string_literals(path)
        if text in names
    ]
    assert not found, "bench/ names concrete plugins:\n" + "\n".join(found)


def test_the_name_check_finds_a_planted_name(tmp_path: Path) -> None:
    planted = tmp_path / "x.py"
    planted.write_text('"""A docstring may say csra."""\nREF = "csra"  # this is code\n')
    assert [t for _, t in string_literals(planted)] == ["csra"]


@pytest.mark.parametrize("folder", ["heads", "datasets"])
def test_plugins_import_only_the_public_api(folder: str) -> None:
    for path in sorted((ROOT / folder).glob("*.py")):
        modules = {
            node.module
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bench"
        } | {a.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import) for a in node.names if a.name.startswith("bench")}
        assert modules <= {"bench.api"}, f"{path.relative_to(ROOT)} imports {sorted(modules)}; plugins import only `from bench.api import ...`"


#: the one module that imports plugin files by path (and so may touch the import machinery)
PLUGIN_LOADER = BENCH / "api" / "registry.py"


def import_machinery(path: Path) -> list[str]:
    """Uses of ``sys.modules`` and of ``importlib`` (other than ``importlib.metadata``, which reads
    an installed package's version) in a module, as ``line: what``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "modules" and isinstance(node.value, ast.Name) and node.value.id == "sys":
            found.append(f"{node.lineno}: sys.modules")
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] == "importlib" and a.name != "importlib.metadata"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "importlib" and node.level == 0:
            names = [a.name for a in node.names]
            if not (node.module == "importlib.metadata" or (node.module == "importlib" and names == ["metadata"])):
                found.append(f"{node.lineno}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            found.append(f"{node.lineno}: __import__")
    return found


def test_no_import_machinery_outside_the_plugin_loader() -> None:
    """Modules are imported by name; only the plugin loader imports files by path (issue 23)."""
    assert import_machinery(PLUGIN_LOADER), "the check is not vacuous: the plugin loader uses importlib"
    found = [f"{path.relative_to(ROOT)}:{hit}" for path in sorted(BENCH.rglob("*.py")) if path != PLUGIN_LOADER for hit in import_machinery(path)]
    assert not found, "sys.modules / importlib outside bench/api/registry.py:\n" + "\n".join(found)


def test_the_import_machinery_check_finds_planted_uses(tmp_path: Path) -> None:
    planted = tmp_path / "x.py"
    planted.write_text("import sys\nimport importlib\nimport importlib.metadata\nfrom importlib import util\nm = sys.modules[__name__]\n__import__('os')\n")
    assert sorted(import_machinery(planted)) == ["2: import importlib", "4: from importlib import util", "5: sys.modules", "6: __import__"]


def test_no_module_over_600_lines() -> None:
    """A module holds one idea; past ~600 lines it holds several (issue 23)."""
    long = {str(p.relative_to(ROOT)): n for p in sorted(BENCH.rglob("*.py")) if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"modules over 600 lines: {long}"
