"""Package structure: no import cycles, a light runtime side, short files, a docstring per module.

The import graph is read from the source (``ast``), not by importing, so it holds without
torch/onnx/TensorRT installed. Every ``import`` statement of the package counts, wherever it is:

- module-level **and function-level** imports: a lazy import inside a function defers a
  cycle to call time, it does not remove it (the two halves still cannot be understood,
  tested or moved apart), so both count;
- imports under ``if TYPE_CHECKING:`` count too: they never run, but a module that needs
  another's types to be read depends on it all the same (``targets`` ↔ ``pipeline`` is such a
  cycle). Messages mark each edge ``[function]`` or ``[type-only]`` so the fix is obvious;
- ``importlib.import_module("tome_export.x")`` with a literal name counts as ``import``;
- ``from tome_export.a import b`` is an edge to ``tome_export.a.b`` when that is a module,
  else to ``tome_export.a``; importing ``tome_export.a.b`` also runs ``tome_export/a/__init__.py``,
  so there is an edge to every enclosing package the importer is not itself inside of (a
  module importing a sibling from its own package is not a cycle through that package).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "tome_export"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_import_module_call(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name == "import_module" and isinstance(node.args[0].value, str)


KIND_ORDER = {"module": 0, "function": 1, "type-only": 2}  # strongest first


def _import_nodes(tree: ast.AST):
    """(kind, node) for every Import/ImportFrom anywhere in ``tree``; kind is ``module``,
    ``function`` (inside a def) or ``type-only`` (under ``if TYPE_CHECKING:``)."""
    stack: list[tuple[str, ast.AST]] = [("module", tree)]
    while stack:
        kind, node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(("type-only", child) for child in node.body)
            stack.extend((kind, child) for child in node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield kind, node
        elif _is_import_module_call(node):  # importlib.import_module("tome_export.x"): same edge
            yield kind, ast.Import(names=[ast.alias(name=node.args[0].value)])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and kind == "module":
            kind = "function"
        stack.extend((kind, child) for child in ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """Package modules this statement names (most specific existing module per name)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = importer.split(".") if is_package else importer.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix for alias in node.names]
    found = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.split(".")[0] == PACKAGE:
            found.add(name)
    return found


def import_kinds() -> dict[str, dict[str, str]]:
    """module → {imported package module: strongest kind of import} (see the module docstring)."""
    modules = _modules()
    graph: dict[str, dict[str, str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        own_packages = {name} if is_package else set()
        parts = name.split(".")
        own_packages |= {".".join(parts[:i]) for i in range(1, len(parts))}
        edges: dict[str, str] = {}
        for kind, node in _import_nodes(tree):
            for target in _targets(node, name, is_package, set(modules)):
                pieces = target.split(".")
                parents = {".".join(pieces[:i]) for i in range(1, len(pieces))} - own_packages
                for imported in {target} | parents:
                    if imported != name and KIND_ORDER[kind] < KIND_ORDER.get(edges.get(imported, ""), 9):
                        edges[imported] = kind
        graph[name] = edges
    return graph


def import_graph() -> dict[str, set[str]]:
    """module → package modules it imports, of any kind."""
    return {name: set(edges) for name, edges in import_kinds().items()}


def _chain(kinds: dict[str, dict[str, str]], chain: list[str]) -> str:
    text = chain[0]
    for a, b in zip(chain, chain[1:]):
        kind = kinds[a][b]
        text += f" →{'' if kind == 'module' else f'[{kind}]'} {b}"
    return text


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _path(graph: dict[str, set[str]], start: str, goal: str, within: set[str]) -> list[str]:
    """A shortest import chain start → … → goal inside ``within`` (breadth first)."""
    previous: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & within):
            if nxt == goal:
                chain = [goal, node]
                while previous[chain[-1]] is not None:
                    chain.append(previous[chain[-1]])
                return chain[::-1]
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return [start, goal]


def test_no_import_cycles():
    kinds = import_kinds()
    graph = import_graph()
    problems = []
    for component in _cycles(graph):
        members = set(component)
        lines = [f"{len(component)} modules in a cycle: {', '.join(component)}"]
        for first in component:  # one concrete cycle through each member's imports
            for nxt in sorted(graph[first] & members):
                lines.append("    " + _chain(kinds, [first, *_path(graph, nxt, first, members)]))
        problems.append("\n  ".join(dict.fromkeys(lines)))
    assert not problems, "import cycles (module-level, [function] or [type-only] imports):\n  " + "\n  ".join(problems)


def _is_runtime_side(name: str) -> bool:
    return name == f"{PACKAGE}.runtime" or name.startswith(f"{PACKAGE}.runtimes")


def _is_build_side(name: str) -> bool:
    return any(name == f"{PACKAGE}.{p}" or name.startswith(f"{PACKAGE}.{p}.") for p in ("merging", "exporter"))


def test_runtime_side_imports_nothing_from_merging_or_exporter():
    """runtime.py and runtimes/ run a bundle with onnxruntime + numpy only, so neither they nor
    anything they import may import merging/ or exporter/ (the PyTorch side). Each offending
    import is listed once, with how the runtime side reaches the module that makes it."""
    kinds = import_kinds()
    graph = import_graph()
    starts = sorted(n for n in graph if _is_runtime_side(n))
    reached: dict[str, list[str]] = {s: [s] for s in starts}  # module → shortest chain from the runtime side
    queue = list(starts)
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node]):
            if nxt not in reached and not _is_build_side(nxt):
                reached[nxt] = [*reached[node], nxt]
                queue.append(nxt)
    problems = []
    for node, chain in reached.items():
        bad = sorted(n for n in graph[node] if _is_build_side(n))
        bad = [n for n in bad if not any(other.startswith(n + ".") for other in bad)]  # a.b implies a
        via = f"   (reached: {_chain(kinds, chain)})" if len(chain) > 1 else ""
        problems += [f"{_chain(kinds, [node, target])}{via}" for target in bad]
    assert not problems, "the runtime side imports merging/ or exporter/:\n  " + "\n  ".join(sorted(problems))


def test_every_file_is_at_most_400_lines():
    too_long = [
        f"{path.relative_to(ROOT.parent)}: {count} lines"
        for path in sorted(ROOT.rglob("*"))
        if path.is_file() and path.suffix in {".py", ".json", ".md", ".txt"}
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not too_long, f"files over {MAX_LINES} lines (split them along their seams):\n  " + "\n  ".join(too_long)


def test_every_module_has_a_docstring():
    missing = [
        str(path.relative_to(ROOT.parent))
        for path in _modules().values()
        if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
    ]
    assert not missing, "modules without a module docstring saying what they own:\n  " + "\n  ".join(missing)


# -- the checker itself --------------------------------------------------------------------


def test_cycle_finder_finds_function_level_and_package_cycles(tmp_path):
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}, "p.e": set()}
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]
    assert _path(graph, "p.a", "p.c", set(graph)) == ["p.a", "p.b", "p.c"]
    source = (
        "import os\nif TYPE_CHECKING:\n    import tome_export.x\ndef f():\n    from . import y\n"
        "    return importlib.import_module('tome_export.z')\n"
    )
    found = sorted((kind, type(node).__name__) for kind, node in _import_nodes(ast.parse(source)))
    assert found == [("function", "Import"), ("function", "ImportFrom"), ("module", "Import"), ("type-only", "Import")]
    modules = {"tome_export", "tome_export.pkg", "tome_export.pkg.y", "tome_export.pkg.z"}
    relative = ast.parse("from . import y\nfrom .z import thing\nfrom .. import pkg").body
    got = [_targets(n, "tome_export.pkg.x", False, modules) for n in relative]
    assert got == [{"tome_export.pkg.y"}, {"tome_export.pkg.z"}, {"tome_export.pkg"}]
