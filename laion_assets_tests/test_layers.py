"""The package's layering, read from its imports (those inside functions included): no import cycle, the core free of
Dagster, and production code free of the offline (demo) package."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "laion_assets"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The modules a file imports, anywhere in it: `from a import b` is module a.b when that is a module, else a."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {i for i in imports(path, known) if i in known and i != name} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_anywhere_in_the_package():
    assert cycles(graph()) == []


def test_the_core_never_imports_dagster():
    mods = modules()
    offenders = sorted(name for name, path in mods.items() if name.startswith("laion_assets.core")
                       and any(i == "dagster" or i.startswith("dagster") for i in imports(path, set(mods))))
    assert offenders == []


def test_production_code_never_imports_the_offline_package():
    edges = graph()
    importers = sorted(m for m, deps in edges.items() if not m.startswith("laion_assets.offline")
                       and any(d.startswith("laion_assets.offline") for d in deps))
    # The one place that decides local versus production adds the demo's asset to the local definitions only.
    assert importers == ["laion_assets.definitions"]
    code = ("import sys, laion_assets.definitions as d, laion_assets.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('laion_assets.offline'))); "
            "print(sorted(k.to_user_string() for k in d.defs.resolve_asset_graph().get_all_asset_keys()))")
    env = {**os.environ, "LAION_ASSETS_DEPLOYMENT": "production"}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.splitlines()
    assert out[0] == "[]"
    assert "sample_crawl" not in out[1] and "image_shards" in out[1]
