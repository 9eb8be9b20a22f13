"""The package's import graph, read from the source without importing it: no cycle anywhere, and no
module imports another's private names (issue #21).

Every import counts, at module level and inside functions or `if TYPE_CHECKING:`: an import
deferred to dodge a cycle still ties the two modules together, and one deferred because its
dependency is slow to import must not close a cycle either. `from X import Y` is an edge to the
module X.Y when that is one of ours, else to X; a package's `__init__` is not implied by importing
one of its modules (Python runs it, but it re-exports only, so it cannot close a cycle of its own).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = "ithaca"
NOT_MODULES = {"tests", ".venv", "build"}  # top-level folders of the checkout that are not the package


@dataclass(frozen=True)
class Edge:
    importer: str
    target: str
    name: str
    """The imported name as written (`Y` of `from X import Y`, the dotted module of `import X`)."""
    where: str
    """file:line of the import statement, for the failure message."""


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `root` outside NOT_MODULES and dot-folders."""
    modules = {}
    for file in sorted(root.rglob("*.py")):
        parts = file.relative_to(root).parts
        if parts[0] in NOT_MODULES or any(p.startswith(".") for p in parts[:-1]):
            continue
        names = [package, *parts[:-1]] + ([] if parts[-1] == "__init__.py" else [parts[-1].removesuffix(".py")])
        modules[".".join(names)] = file
    return modules


def import_edges(root: Path, package: str) -> list[Edge]:
    """Every import, anywhere in a module, of one of our own modules."""
    modules = module_files(root, package)
    edges = []
    for importer, file in modules.items():
        is_package = file.name == "__init__.py"
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            where = f"{file.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _ours(alias.name, modules)
                    if target is not None:
                        edges.append(Edge(importer, target, alias.name, where))
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(node, importer, is_package)
                for alias in node.names:
                    target = f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else _ours(source, modules)
                    if target is not None:
                        edges.append(Edge(importer, target, alias.name, where))
    return edges


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module a `from ... import` reads from, relative imports resolved against `importer`."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _ours(dotted: str, modules: dict[str, Path]) -> str | None:
    """`dotted` itself if it is one of our modules, else its longest prefix that is (`import a.b.f`
    with f a function cannot happen, but `from a.b import f` falls back to a.b here)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (its edges, in order) per strongly connected component that has one (Tarjan)."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        graph.setdefault(e.importer, [])
        graph.setdefault(e.target, [])
        if e.importer != e.target:  # a module naming itself (e.g. its own re-export) is no cycle of two
            graph[e.importer].append(e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(start: str) -> None:  # iterative: a deep package must not hit the recursion limit
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, out = work[-1]
            edge = next(out, None)
            if edge is not None:
                if edge.target not in index:
                    index[edge.target] = low[edge.target] = len(index)
                    stack.append(edge.target)
                    on_stack.add(edge.target)
                    work.append((edge.target, iter(graph[edge.target])))
                elif edge.target in on_stack:
                    low[node] = min(low[node], index[edge.target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, list[Edge]], component: set[str]) -> list[Edge]:
    """The shortest cycle through the component's first module (breadth-first, inside the component)."""
    start = min(component)
    came_by: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph[node]:
                if edge.target not in component or edge.target in came_by:
                    continue
                came_by[edge.target] = edge
                if edge.target == start:
                    cycle = [edge]
                    while cycle[0].importer != start:
                        cycle.insert(0, came_by[cycle[0].importer])
                    return cycle
                following.append(edge.target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its strongly connected component {sorted(component)}")


def describe(cycle: list[Edge]) -> str:
    return " -> ".join([cycle[0].importer, *(f"{e.target} ({e.where})" for e in cycle)])


def private_imports(edges: list[Edge]) -> list[Edge]:
    """`from ithaca.x import _name`: a name x keeps to itself (a private module or dunder is not one)."""
    return [e for e in edges if e.name.startswith("_") and not e.name.startswith("__")
            and not e.target.endswith(f".{e.name}")]


def test_the_package_has_no_import_cycle():
    cycles = find_cycles(import_edges(ROOT, PACKAGE))
    assert not cycles, "import cycles (importer -> imported (file:line of the import)):\n" + "\n".join(
        describe(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    found = private_imports(import_edges(ROOT, PACKAGE))
    assert not found, "private names imported from another module:\n" + "\n".join(
        f"{e.where}: {e.importer} imports {e.name} from {e.target}" for e in found)


def test_the_walk_sees_imports_inside_functions_and_relative_ones():
    edges = {(e.importer, e.target) for e in import_edges(ROOT, PACKAGE)}
    assert ("ithaca.launcher.tracking.tracker", "ithaca.launcher.tracking.push") in edges  # inside a method
    assert ("ithaca.launcher", "ithaca.launcher.config.schema") in edges
    assert len({importer for importer, _ in edges}) > 50  # every room of the package, not one folder


@pytest.fixture
def toy(tmp_path) -> Path:
    """A package `toy`: a -> b at module level, b -> c inside a function, c -> a by a relative import."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "sub" / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text("from toy.sub import b\n")
    (tmp_path / "sub" / "b.py").write_text("def f():\n    import toy.sub.c\n")
    (tmp_path / "sub" / "c.py").write_text("from ..a import _hidden\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("import toy.a\n")  # not a module of the package
    return tmp_path


def test_a_cycle_through_a_function_level_and_a_relative_import_is_named(toy):
    (cycle,) = find_cycles(import_edges(toy, "toy"))
    assert describe(cycle) == "toy.a -> toy.sub.b (a.py:1) -> toy.sub.c (sub/b.py:2) -> toy.a (sub/c.py:1)"
    (private,) = private_imports(import_edges(toy, "toy"))
    assert (private.importer, private.name, private.target) == ("toy.sub.c", "_hidden", "toy.a")
