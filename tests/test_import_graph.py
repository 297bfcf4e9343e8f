"""The library's import graph: no circles, and no arrow from ``mspec`` up to the entry points,
the dataset builders or the benchmarks (``docs/architecture.md``).

Every import counts, including the ones deferred into function bodies: a deferred import that
closes a circle still couples the two modules. ``from package import submodule`` is an arrow to
the submodule, not to the package's ``__init__``.
"""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
UPPER_FLOORS = ("data_pipelines", "experiments", "benchmarks", "examples", "tests")
MODULE_PATH = re.compile(rf"(?:{'|'.join(UPPER_FLOORS)})(?:\.\w+)+(?::\w+)?")


def _library_modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in (ROOT / "mspec").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(path: pathlib.Path, modules) -> list[str]:
    """Every module ``path`` imports (absolute names; submodules resolved)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the library uses absolute imports"
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.append(full if full in modules else node.module)
    return out


def _graph():
    modules = _library_modules()
    edges = {name: sorted({t for t in _imports(path, modules) if t in modules and t != name})
             for name, path in modules.items()}
    return modules, edges


def _find_cycle(edges) -> list[str] | None:
    state = {}  # 1: on the stack, 2: done

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_library_import_graph_has_no_cycles():
    _, edges = _graph()
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_never_imports_upward():
    modules = _library_modules()
    upward = [
        f"{name} imports {target}"
        for name, path in modules.items()
        for target in _imports(path, modules)
        if target.split(".")[0] in UPPER_FLOORS
    ]
    assert not upward, upward
    # Nor by name through importlib: a module path written as a string is an import too.
    named = [
        f"{name}: {const.value!r}"
        for name, path in modules.items()
        for const in ast.walk(ast.parse(path.read_text()))
        if isinstance(const, ast.Constant) and isinstance(const.value, str)
        and MODULE_PATH.fullmatch(const.value)
    ]
    assert not named, named


def test_cycle_finder_finds_a_cycle():
    """The checker itself: a planted circle is reported, a tree is not."""
    assert _find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None
