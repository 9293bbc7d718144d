"""The import graph of ``src/nimbus`` has no cycle, so its modules can be read (and split) top-down.

Every module is parsed, not imported: each ``import`` and ``from … import`` counts, those inside
functions too (they run, only later). What sits under ``if TYPE_CHECKING:`` never runs and is left out.
``from package import name`` is an edge to ``package.name`` when that is a module, else to ``package``.
Importing a submodule runs its package's ``__init__`` first, but that is not an edge of the graph: a
package that re-exports its submodules would otherwise make a cycle with each of them.
"""

import ast
from pathlib import Path

import pytest

import nimbus

ROOT = Path(nimbus.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.AST):
    """Every import statement of ``tree`` that can run (so not those under ``if TYPE_CHECKING:``)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str) -> str | None:
    """``name`` or the nearest package above it that is a module of ours; None outside nimbus."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _statements(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def find_cycle(graph: dict[str, set[str]], start: str | None = None) -> list[str] | None:
    """One cycle of ``graph`` (through ``start`` when given) as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in [start] if start is not None else sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per knot of mutually importing modules, so a failure names every one at once."""
    cycles, seen = [], set()
    for node in sorted(graph):
        if node in seen:
            continue
        rest = {name: targets - seen for name, targets in graph.items() if name not in seen}
        cycle = find_cycle(rest, node)
        if cycle is not None:
            cycles.append(cycle)
            seen.update(cycle)
    return cycles


def test_the_graph_is_read_from_every_module():
    assert "nimbus.protocol" in MODULES and "nimbus.machines.base" in MODULES
    assert "nimbus.protocol" in imports_of("nimbus.machines.channel")


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b", "a"], ["c", "d", "c"]]


def test_no_import_cycle_in_src():
    graph = {module: imports_of(module) for module in MODULES}
    cycles = find_cycles(graph)
    if cycles:
        pytest.fail("import cycles:\n" + "\n".join(" → ".join(cycle) for cycle in cycles))


def test_the_agent_imports_nothing_of_the_host_but_the_protocol():
    for module in MODULES:
        if module.startswith("nimbus.agent"):
            outside = {m for m in imports_of(module) if not m.startswith("nimbus.agent")}
            assert outside <= {"nimbus", "nimbus.protocol"}, (module, outside)
