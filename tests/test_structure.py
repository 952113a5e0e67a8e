"""The code's shape: no import circle among memlm's modules, eval and serve apart, short functions.

Read from the source (``ast``), so every import counts, the ones inside functions too: a circle
that only a lazy import keeps from failing at load time is still a circle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "memlm"
# Functions allowed past the limit: the config schema (every key with its default and its checks).
LONG_ALLOWED = {("memlm/config.py", "default_config"), ("memlm/config.py", "validate")}
MAX_LINES = 120


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the memlm modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "memlm":
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                graph[name].update(subs)
                if len(subs) < len(node.names) and node.module in mods:
                    graph[name].add(node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in mods)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_among_memlm_modules():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_eval_and_serve_do_not_import_each_other():
    graph = import_graph()
    for src, other in (("memlm.eval", "memlm.serve"), ("memlm.serve", "memlm.eval")):
        bad = sorted((a, b) for a, bs in graph.items() if a.startswith(src) for b in bs if b.startswith(other))
        assert bad == [], bad


def test_no_function_longer_than_the_limit():
    long = []
    for path in ROOT.rglob("*.py"):
        rel = str(path.relative_to(ROOT.parent))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES and (rel, node.name) not in LONG_ALLOWED:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert long == [], long
