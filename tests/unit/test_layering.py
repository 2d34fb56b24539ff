"""The package's layers keep their walls (DESIGN.md sections 2 and 5): no import circle among layerexit modules, the
models layer never imports the engine (models sit below it), and the engine never imports datasets (it sees token
ids). Every import counts: top-level, inside functions, and under ``if TYPE_CHECKING`` (read from each module's
AST, so nothing is imported to check)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "layerexit"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path) -> set[str]:
    """The layerexit modules ``name`` imports anywhere in its source (``from pkg import mod`` counts as ``mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in MODULES else module)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_walk_sees_the_package() -> None:
    assert "layerexit.engine.decode" in GRAPH and "layerexit.engine.loop" in GRAPH["layerexit.engine.decode"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the detector works


def test_no_import_circle() -> None:
    found = cycles(GRAPH)
    detail = [f"{' <-> '.join(c)}: " + "; ".join(f"{m} imports {sorted(GRAPH[m] & set(c))}" for m in c)
              for c in found]
    assert not found, "import circles:\n" + "\n".join(detail)


def _crossing(source: str, target: str) -> list[str]:
    return sorted(f"{m} imports {d}" for m, deps in GRAPH.items() if m.startswith(source)
                  for d in deps if d.startswith(target))


def test_models_never_import_the_engine() -> None:
    assert not _crossing("layerexit.models", "layerexit.engine"), "models sit below the engine"


def test_the_engine_never_imports_datasets() -> None:
    assert not _crossing("layerexit.engine", "layerexit.data"), "the engine takes token ids, not datasets"
