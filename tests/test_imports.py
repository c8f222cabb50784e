"""The code's rooms stay one-way: store <- trainer <- service, and no module of a package imports itself in a circle
(lazy imports inside functions included, since they hide cycles rather than remove them)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("store", "trainer", "service")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = {f"{p.parent.name}.{p.stem}": p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")
               if p.stem != "__init__"}
    modules.update({f"service.routes.{p.stem}": p for p in (ROOT / "service" / "routes").glob("*.py")})
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_packages_import_one_way():
    allowed = {"store": {"store"}, "trainer": {"store", "trainer"}, "service": {"store", "trainer", "service"}}
    for module, deps in _graph().items():
        for dep in deps:
            assert dep.split(".")[0] in allowed[module.split(".")[0]], f"{module} imports {dep}"


def test_no_import_cycles():
    graph, state, stack = _graph(), {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep])
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
