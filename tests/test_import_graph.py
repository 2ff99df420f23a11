"""The package's import graph, read from the source: no cycles between modules, and no ``_private``
name imported from another package (shared things get a public home one layer down)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "torchcompress"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports():
    """(importer, imported module, names, top-level?) for every ``torchcompress`` import in the source."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    out = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, path.name == "__init__.py", node)
                if not target.startswith("torchcompress"):
                    continue
                names = [a.name for a in node.names]
                # `from pkg import sub` imports the submodule pkg.sub
                for n in names:
                    if f"{target}.{n}" in modules:
                        out.append((mod, f"{target}.{n}", [], id(node) in top))
                out.append((mod, target, [n for n in names if f"{target}.{n}" not in modules], id(node) in top))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("torchcompress"):
                        out.append((mod, a.name, [], id(node) in top))
    return modules, out


def _package(mod: str, modules: dict) -> str:
    """The package a module belongs to (``torchcompress.prune`` for ``torchcompress.prune.apply``)."""
    p = modules[mod]
    return mod if p.name == "__init__.py" else mod.rpartition(".")[0]


def test_no_private_names_across_packages():
    modules, imports = _imports()
    bad = []
    for src, dst, names, _ in imports:
        if dst not in modules:
            continue
        for n in names:
            if n.startswith("_") and not n.startswith("__") and n != "_C" and _package(src, modules) != _package(dst, modules):
                bad.append(f"{src} imports {dst}.{n}")
    assert bad == [], "\n".join(bad)


def test_no_import_cycles():
    """Module-level imports (those that run when the module is imported) form no cycle; imports
    inside functions run later and do not count."""
    modules, imports = _imports()
    graph = {m: set() for m in modules}
    for src, dst, _, top in imports:
        if top and dst in modules and dst != src:
            graph[src].add(dst)
    # a package's __init__ importing its own submodules is how packages re-export: not a cycle
    # unless the submodule imports the package back through another path
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert cycles == [], "\n".join(cycles)


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    """The checks can fail: a fake package with a cycle and a cross-package private import."""
    pkg = tmp_path / "torchcompress"
    (pkg / "a").mkdir(parents=True)
    (pkg / "b").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "b" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from ..b.y import _helper\n")
    (pkg / "b" / "y.py").write_text("from ..a import x\n\ndef _helper(): pass\n")
    import sys

    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    import pytest

    with pytest.raises(AssertionError, match="imports torchcompress.b.y._helper"):
        test_no_private_names_across_packages()
    with pytest.raises(AssertionError, match="torchcompress.a.x -> torchcompress.b.y -> torchcompress.a.x"):
        test_no_import_cycles()
