"""The shape of the code, read with `ast` (nothing imported or executed).

Over upcycle/, adapters/ (upcycle.adapters) and kernels/ (upcycle.kernels):
- no import cycles between modules (imports inside functions count: a cycle deferred to call
  time is still two modules that cannot be understood apart);
- no import of an underscore name from another module;
- no function longer than MAX_LINES lines (from `def` to its last line, docstring included).

Each test names what it found, so that a failure says which module or function to change.
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"upcycle": "upcycle", "adapters": "upcycle.adapters", "kernels": "upcycle.kernels"}
MAX_LINES = 80


def modules() -> dict[str, str]:
    """Dotted module name -> file path, for every .py file of the three packages."""
    found = {}
    for folder, package in PACKAGES.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, base)
            prefix = package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}"
            if package == "upcycle" and prefix.split(".")[1:2] in (["adapters"], ["kernels"]):
                continue
            for name in filenames:
                if name.endswith(".py"):
                    mod = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    found[mod] = os.path.join(dirpath, name)
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods: dict[str, str]):
    """Yield (importer, imported module, imported name or None) for every import statement."""
    for mod, path in mods.items():
        tree = ast.parse(open(path).read(), path)
        is_package = path.endswith("__init__.py")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield mod, alias.name, None
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_package, node)
                for alias in node.names:
                    yield mod, target, alias.name


def graph(mods: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from pkg import mod` counts as mod)."""
    edges = defaultdict(set)
    for mod, target, name in imports(mods):
        dep = f"{target}.{name}" if name and f"{target}.{name}" in mods else target
        while dep and dep not in mods:
            dep = dep.rpartition(".")[0]
        if dep and dep != mod and not mod.startswith(dep + "."):  # a package's own __init__
            edges[mod].add(dep)
    return edges


def cycles(edges: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index, low, stack, on, out = {}, {}, [], set(), set()

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.add(tuple(sorted(comp)))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def private_imports(mods: dict[str, str]) -> set[tuple[str, str]]:
    """(importer, "module.name") for imports of an underscore name from another of the
    project's modules (a dependency's private name is that dependency's business)."""
    found = set()
    for mod, target, name in imports(mods):
        ours = target.split(".")[0] == "upcycle"
        if ours and name and name.startswith("_") and not name.startswith("__") and target != mod:
            found.add((mod, f"{target}.{name}"))
    return found


def long_functions(mods: dict[str, str]) -> set[str]:
    """ "module:qualified name (lines)" for functions longer than MAX_LINES lines."""
    found = set()
    for mod, path in mods.items():
        tree = ast.parse(open(path).read(), path)

        def walk(node, prefix, mod=mod):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    if child.end_lineno - child.lineno + 1 > MAX_LINES:
                        found.add(f"{mod}:{name}")
                    walk(child, name + ".")
                elif isinstance(child, ast.ClassDef):
                    walk(child, f"{prefix}{child.name}.")

        walk(tree, "")
    return found


def test_no_import_cycles():
    found = cycles(graph(modules()))
    assert not found, f"import cycles: {sorted(found)}"


def test_no_private_names_imported_from_other_modules():
    found = private_imports(modules())
    assert not found, f"imports of private names: {sorted(found)}"


def test_no_long_functions():
    found = long_functions(modules())
    assert not found, f"functions over {MAX_LINES} lines: {sorted(found)}"


def test_the_checks_see_what_they_should(tmp_path):
    """The analysis itself, on a made-up package: a cycle, a private import, a long function."""
    edges = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert cycles(edges) == {("p.a", "p.b", "p.c")}
    mods = {"upcycle.x": str(tmp_path / "x.py"), "upcycle.y": str(tmp_path / "y.py")}
    (tmp_path / "x.py").write_text("from upcycle.y import _hidden, shown\n")
    body = "\n".join(f"    v{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "y.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert private_imports(mods) == {("upcycle.x", "upcycle.y._hidden")}
    assert long_functions(mods) == {"upcycle.y:long"}


def test_every_package_is_listed_in_setup_cfg():
    """setup.cfg lists packages by name: one left out is missing from a non-editable install."""
    import configparser

    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    listed = set(config["options"]["packages"].split())
    found = {mod for mod, path in modules().items() if os.path.basename(path) == "__init__.py"}
    assert found == listed, f"not listed: {sorted(found - listed)}; gone: {sorted(listed - found)}"
