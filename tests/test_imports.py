"""The package's dependency graph is the one its imports show (issue 22): no import cycle among its modules, and an
import inside a function says why it is there (an optional dependency, a slow import, a cycle it avoids)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cifar_transfer"


def _package_imports(node: ast.AST, module: str) -> set[str]:
    """The package's modules an import node names (relative or absolute)."""
    if isinstance(node, ast.ImportFrom) and node.level == 1:
        return {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cifar_transfer."):
        return {node.module.split(".")[1]}
    if isinstance(node, ast.Import):
        return {a.name.split(".")[1] for a in node.names if a.name.startswith("cifar_transfer.")}
    return set()


def module_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level (what importing it runs)."""
    names = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps = set().union(*(_package_imports(n, path.stem) for n in tree.body))
        graph[path.stem] = (deps & names) - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    assert find_cycle(module_graph()) is None, " -> ".join(find_cycle(module_graph()))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_import_inside_a_function_says_why():
    """A comment on the import's line or the line above it, or on an earlier import of the same function."""
    silent = []
    for path in sorted(PACKAGE.glob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and not (
                    isinstance(fn, ast.If) and "__main__" in ast.unparse(fn.test)):
                continue
            said = False
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                around = lines[node.lineno - 2:node.end_lineno]
                said = said or any("#" in line for line in around)
                if not said:
                    silent.append(f"{path.name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not silent, "imports inside functions without a reason:\n" + "\n".join(silent)
