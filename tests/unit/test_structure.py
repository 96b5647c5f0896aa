"""Package structure: no import cycle among the product packages (core/, server/, plugins/), and neither the
engine nor the server depends on the host plugins.  Module-level imports only (an import inside a function
runs later and cannot deadlock module initialisation); a package's own ``__init__`` running before its
submodules is Python's rule, not an edge."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("core", "server", "plugins")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict:
    """``{module name: path}`` for every importable .py file of the product packages."""
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if all(part.isidentifier() for part in path.relative_to(ROOT).with_suffix("").parts):
                out[_module_name(path)] = path
    return out


def _top_level_imports(path: pathlib.Path, name: str, known: dict) -> set:
    """Modules of ``known`` that ``path`` (module ``name``) imports at module level."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    out = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # runs later
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    out.add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                subs = {f"{base}.{alias.name}" for alias in node.names} & set(known)
                out.update(subs)  # ``from pkg import submodule``: an edge to the submodule only
                if len(subs) < len(node.names):
                    out.add(base)  # a name defined in the package (or module) itself
            elif isinstance(node, ast.ClassDef):
                visit(node.body)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, field, None) or [])

    visit(tree.body)
    return {m for m in out if m in known and m != name}


def _graph() -> dict:
    known = _modules()
    return {name: _top_level_imports(path, name, known) for name, path in known.items()}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_product():
    graph = _graph()
    assert "core.session" in graph and "core.edits.formats" in graph["core.edits"]
    assert _cycles(graph) == []


def test_engine_and_server_do_not_import_the_plugins():
    graph = _graph()
    offenders = {m: sorted(d for d in deps if d == "plugins" or d.startswith("plugins."))
                 for m, deps in graph.items() if m.split(".")[0] in ("core", "server")}
    assert {m: d for m, d in offenders.items() if d} == {}
    # also imports inside functions: the server and core never reach for the plugin package
    for pkg in ("core", "server"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "plugins":
                    raise AssertionError(f"{path.relative_to(ROOT)} imports {node.module}")
                if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "plugins" for a in node.names):
                    raise AssertionError(f"{path.relative_to(ROOT)} imports the plugins package")
