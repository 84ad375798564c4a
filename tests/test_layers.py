"""The house rules of imports, read from the source (ast), not from a running interpreter.

- No module of ``core`` imports ``app``, ``worker`` or ``store`` (the science is the
  bottom floor; the interfaces sit on top of it).
- The modules of ``core`` form no import cycle. Every import counts, also those inside
  functions or under ``TYPE_CHECKING``: a lazy import hides a circle, it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "core"
UPPER = ("app", "worker", "store")


def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: str = "core") -> list[tuple[str, int]]:
    """Absolute names of the modules ``path`` (in ``package``) imports, with line numbers.

    ``from X import y`` gives X and also X.y (y may be a submodule).
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            found.extend((f"{module}.{alias.name}", node.lineno) for alias in node.names)
    return found


def _core_graph() -> dict[str, set[str]]:
    """Module -> the core modules it imports (a name inside a module counts as the module)."""
    paths = {_module_name(p): p for p in CORE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for module, _ in _imports(path, package):
            parts = module.split(".")
            # the longest prefix that is a core module: core.kernel.Foo -> core.kernel
            for end in range(len(parts), 0, -1):
                prefix = ".".join(parts[:end])
                if prefix in paths:
                    targets.add(prefix)
                    break
        # a module's own package (core/__init__) is imported by Python first anyway
        targets -= {name, "core"}
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_core_imports_nothing_from_the_upper_floors():
    offending = [
        f"{path.relative_to(CORE.parent)}:{line} imports {module}"
        for path in sorted(CORE.rglob("*.py"))
        for module, line in _imports(path)
        if module.split(".")[0] in UPPER
    ]
    # relative imports resolve inside core, so they cannot reach the upper floors
    assert offending == []


def test_core_modules_form_no_import_cycle():
    graph = _core_graph()
    assert len(graph) >= 15 and graph["core.subtract"] >= {"core.kernel", "core.convolve"}
    assert _cycles(graph) == []


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path):
    # The checker itself must be able to fail: a made-up graph with a circle, and a file
    # importing the service, are both caught.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from store import Settings\n    import app.cli\n")
    assert [m for m, _ in _imports(bad)] == ["store", "store.Settings", "app.cli"]
