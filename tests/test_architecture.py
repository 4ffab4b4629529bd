"""The layering of docs/ARCHITECTURE.md: no import cycles, and nothing below imports the command line; and
no function over 60 lines without a comment saying why.

Every ``import`` statement counts, also those inside functions (a deferred import still ties two modules
together). The graph is read from the source with :mod:`ast`, so nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("detector", "service", "pathguard", "bench")
LOWER = ("detector", "service")  # layers that must never import the command line
FORBIDDEN = {"detector": ("service", "pathguard", "bench"), "service": ("pathguard", "bench")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "_proto" not in path.parts:
                mods[_module_name(path)] = path
    return mods


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of these packages it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, path, node)
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                targets = subs or [target]
            graph[module] |= {t for t in targets if t in mods and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_real_imports():
    graph = import_graph()
    assert "service.config" in graph["pathguard.serving"]
    assert "detector.bundle" in graph["service.config"]
    assert "detector.models.gates" in graph["detector.models"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_never_import_upper_ones(layer):
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        if m.split(".")[0] == layer
        for t in targets
        if t.split(".")[0] in FORBIDDEN[layer]
    )
    assert bad == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# A function over MAX_FUNCTION_LINES lines says why in a comment starting with this marker, in the comment block
# right above it (above its decorators) or inside it; docs/ARCHITECTURE.md, "Checks that keep it so".
MAX_FUNCTION_LINES = 60
LONG_MARKER = "# Over 60 lines on purpose:"


def _says_why(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])  # 1-based
    above = []
    i = start - 2
    while i >= 0 and lines[i].lstrip().startswith("#"):
        above.append(lines[i])
        i -= 1
    inside = lines[start - 1 : node.end_lineno]
    return any(line.lstrip().startswith(LONG_MARKER) for line in above + inside)


def long_functions(source: str, name: str) -> list[str]:
    """``name:line function (N lines)`` for each function of ``source`` over the limit without the marker."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and not _says_why(lines, node):
                found.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_long_function_without_a_reason():
    found = [
        hit
        for path in sorted(_modules().values())
        for hit in long_functions(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not found, "functions over 60 lines without a reason:\n" + "\n".join(found)


def test_the_length_check_counts_lines_and_reads_the_marker():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    long_def = "@decorator\ndef f():\n" + body  # 61 lines from `def`
    short_def = "def f():\n" + body[body.index("\n") + 1 :]  # 60 lines
    assert long_functions(long_def, "m.py") == ["m.py:2 f (61 lines)"]
    assert long_functions(short_def, "m.py") == []
    assert long_functions(f"{LONG_MARKER} a table.\n# more why\n" + long_def, "m.py") == []
    assert long_functions(long_def.replace("    x3", f"    {LONG_MARKER} a table\n    x3"), "m.py") == []
    assert long_functions(f"{LONG_MARKER} a table.\n\n" + long_def, "m.py") == ["m.py:4 f (61 lines)"]
    nested = "def outer():\n" + "".join("    " + line + "\n" for line in long_def.splitlines())
    assert long_functions(nested, "m.py") == ["m.py:1 outer (63 lines)", "m.py:3 f (61 lines)"]
