"""The layering holds: no import cycle in src/, and the stage table says what stages write."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "hardprobe"


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(SRC).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (SRC / PKG).rglob("*.py")}


def _resolve(node: ast.ImportFrom, here: str, is_pkg: bool, known) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = here.split(".") if is_pkg else here.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    # `from pkg import sub` imports the submodule pkg.sub when there is one
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    return subs + ([base] if len(subs) < len(node.names) else [])


def import_graph() -> dict[str, set[str]]:
    """module -> the hardprobe modules it imports (top level and inside functions)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(node, name, path.name == "__init__.py", mods)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in mods and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None. A package's __init__ importing its own
    submodules is no cycle on its own; a submodule importing back into it is."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_src():
    assert find_cycle(import_graph()) is None


# Known debts, listed so that they can only shrink: a new entry fails the tests.
UPWARD_ALLOWED: set[tuple[str, str]] = set()
LONG_ALLOWED: set[str] = set()


def test_layers_point_down():
    """core, scoring, heads, backbones and data know no stage; report and rundir run none."""
    graph = import_graph()
    low = ("hardprobe.core", "hardprobe.scoring", "hardprobe.heads", "hardprobe.backbones",
           "hardprobe.data", "hardprobe.rundir", "hardprobe.report")
    for m, deps in graph.items():
        if m.startswith(low):
            up = sorted(d for d in deps if d.startswith(("hardprobe.stages", "hardprobe.pipeline",
                                                          "hardprobe.cli"))
                        and (m, d) not in UPWARD_ALLOWED)
            assert not up, f"{m} imports the stage layer: {up}"


def test_no_function_over_80_lines():
    long = []
    for path in (SRC / PKG).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                where = f"{path.relative_to(SRC)}:{node.name}"
                if n > 80 and where not in LONG_ALLOWED:
                    long.append(f"{where} ({n} lines)")
    assert not long, long


def test_tests_mirror_the_package_layout():
    """tests/<folder>/ holds the tests of src/hardprobe/<folder>/, so each folder of tests
    names a package, and no two test files share a name (pytest imports them by basename)."""
    tests = Path(__file__).resolve().parent
    folders = [d.name for d in tests.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))]
    assert folders and all((SRC / "hardprobe" / d).is_dir() for d in folders), folders
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
