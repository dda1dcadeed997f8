"""The house rules of rmib's layout (ARCHITECTURE.md), read from the source with `ast`.

- no import cycle among rmib's modules (module-level imports: what Python runs on import);
- infrastructure (everything outside `rmib.methods`, `rmib.tasks`, `rmib.cli` and the
  top-level application modules) never imports a method, the table or the CLI, not even
  inside a function;
- a method imports no other method (only `rmib.tasks` knows every method);
- no module over `MAX_LINES` lines, in `rmib/` and in `benchmarks/`;
- no import cycle among the benchmark modules, not even through an import inside a
  function (each benchmark is a module of its own; `benchmarks.run` registers them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rmib"
MAX_LINES = 550  # "about 500"

# Modules that may import every method: the table, the CLI, the demo, the
# application-level commands built on the table and the public re-exports of
# DESIGN.md (`rmib.grading`).
APPLICATION = (
    "rmib.tasks",
    "rmib.cli",
    "rmib.demo",
    "rmib.predict",
    "rmib.__main__",
    "rmib.grading",
)
# The one bridge: the lazy registration of custom Keras objects imports the table
# on Keras' first look-up of an rmib class (`load_model` may ask it to).
BRIDGES = ("rmib.registration",)
# Shared by the segmenters, inside rmib.methods but no method's own.
METHODS_SHARED = (
    "rmib.methods.segment_config",
    "rmib.methods.encoders",
    "rmib.methods.segment_data",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
BENCHMARK_MODULES = {_module_name(p): p for p in sorted((ROOT / "benchmarks").rglob("*.py"))}


def _imports(path: Path, nested: bool, modules=MODULES) -> set[str]:
    """The `modules` (rmib's) `path` imports (at module level, or anywhere if `nested`)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if nested else tree.body
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            found.update(submodules)
            if node.module in modules and len(submodules) < len(node.names):
                found.add(node.module)  # a name of the module itself, not a submodule
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    found.discard(_module_name(path))
    return found


def _method_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] == "methods" and module not in METHODS_SHARED:
        return parts[2]
    return None


def _is_application(module: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in APPLICATION)


def _cycles(graph: dict) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    graph = {m: _imports(p, nested=False) for m, p in MODULES.items()}
    assert _cycles(graph) == []


def test_no_import_cycle_among_the_benchmarks():
    graph = {m: _imports(p, True, BENCHMARK_MODULES) for m, p in BENCHMARK_MODULES.items()}
    assert "benchmarks.idrid_real" in graph["benchmarks.run"]  # the registry's imports are seen
    assert _cycles(graph) == []


def test_infrastructure_imports_no_method_table_or_cli():
    offences = []
    for module, path in MODULES.items():
        if _is_application(module) or module.startswith("rmib.methods") or module == "rmib":
            continue
        if module in BRIDGES:
            continue
        for target in _imports(path, nested=True):
            if target.startswith("rmib.methods") or _is_application(target):
                offences.append(f"{module} imports {target}")
    assert offences == []


def test_a_method_imports_no_other_method():
    offences = []
    for module, path in MODULES.items():
        own = _method_of(module)
        for target in _imports(path, nested=True):
            other = _method_of(target)
            if own is not None and other is not None and other != own:
                offences.append(f"{module} imports {target}")
            if own is not None and _is_application(target):
                offences.append(f"{module} imports {target}")
    assert offences == []


@pytest.mark.parametrize("module", sorted(MODULES | BENCHMARK_MODULES))
def test_module_size(module):
    lines = len((MODULES | BENCHMARK_MODULES)[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines (the house keeps modules near 500)"


def test_every_method_folder_is_in_the_table():
    from rmib import tasks

    folders = {p.name for p in (PACKAGE / "methods").iterdir() if (p / "__init__.py").is_file()}
    folder_of = {m.train.__module__.split(".")[2] for m in tasks.METHODS.values()}
    assert folders == folder_of
