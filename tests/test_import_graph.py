"""medsae's packages import each other without cycles, counting imports inside functions too.

Every module under ``medsae/`` is parsed with :mod:`ast`; each ``import`` / ``from ... import``
statement anywhere in it (module level, function bodies, ``try`` blocks) adds an edge from the
module's unit to the imported unit. A unit is a subpackage (``medsae.sae``, ``medsae.interp``, ...)
or a top-level module (``medsae.plan``, ``medsae.spec``, ...). Imports under
``if TYPE_CHECKING:`` are left out: they never run, so they cannot form an import cycle, and they
are how a signature names a type from a package that must not be imported at run time.

``medsae.cli`` may import anything; nothing may import it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import medsae

ROOT = Path(medsae.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """``medsae.sae.models`` -> ``medsae.sae``; ``medsae.plan`` -> ``medsae.plan``; ``medsae`` stays."""
    return ".".join(module.split(".")[:2])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """(imported medsae module, line) for every executed import statement in ``tree``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if _exists(candidate) else base), node.lineno
        stack.extend(ast.iter_child_nodes(node))


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def import_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit -> ["file:line", ...] for every cross-unit import of a medsae module."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        source = _unit(module)
        graph.setdefault(source, {})
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for imported, line in _imports(tree, module, path.name == "__init__.py"):
            if imported != "medsae" and not imported.startswith("medsae."):
                continue
            target = _unit(imported)
            if target != source and target != "medsae":
                where = f"{path.relative_to(ROOT.parent)}:{line}"
                graph[source].setdefault(target, []).append(where)
    return graph


def find_cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Every elementary cycle's nodes, one per strongly connected component found by DFS (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
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
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _describe(graph: dict[str, dict[str, list[str]]], component: list[str]) -> str:
    members = set(component)
    lines = [" <-> ".join(component)]
    for source in component:
        for target, places in sorted(graph[source].items()):
            if target in members:
                lines.append(f"  {source} -> {target}: {', '.join(places[:3])}{' ...' if len(places) > 3 else ''}")
    return "\n".join(lines)


def test_graph_sees_function_level_imports() -> None:
    """The parser counts an import inside a function body (a blind parser would pass anything)."""
    tree = ast.parse("def f():\n    from medsae.plan import x\n\nif TYPE_CHECKING:\n    import medsae.spec\n")
    assert [m for m, _ in _imports(tree, "medsae.sae.checkpoint", False)] == ["medsae.plan"]
    assert find_cycles({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}) == [["a", "b", "c"]]


def test_no_package_cycles() -> None:
    graph = import_graph()
    assert {"medsae.plan", "medsae.sae", "medsae.registry", "medsae.cli"} <= set(graph)
    cycles = find_cycles(graph)
    report = "\n".join(_describe(graph, c) for c in cycles)
    print(report)
    assert not cycles, f"package import cycles:\n{report}"


def test_nothing_imports_the_cli() -> None:
    graph = import_graph()
    importers = {src: places["medsae.cli"] for src, places in graph.items() if "medsae.cli" in places}
    assert not importers, f"medsae.cli is imported by {importers}"
