"""The library's import graph has no cycles, lazy imports included (issue 12).

Every ``import`` in ``loratool/`` is walked, those inside functions too: a lazy import keeps
start-up fast, but it must not hide a cycle. ``find_cycle`` is tested on a planted cycle, so this
check cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "loratool"
KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _modules() -> dict[str, Path]:
    mods = {}
    for root, prefix in ((LIB, "loratool"), (KERNELS, "loratool.kernels")):
        for p in sorted(root.rglob("*.py")):
            rel = p.relative_to(root).with_suffix("")
            parts = [prefix, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the library modules it imports (at module level or inside functions)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # ``from pkg import mod`` depends on pkg.mod, ``from mod import name`` on mod
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in mods else stem for a in node.names]
            for t in targets:
                # the deepest library module the name refers to
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("loratool"):
                    graph[mod].add(t)
    # importing a.b.c runs the packages a.b and a first: that is not an edge of a.b.c itself
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_finds_a_planted_cycle():
    graph = import_graph()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    planted = {k: set(v) for k, v in graph.items()}
    planted["loratool.errors"].add("loratool.merge")  # errors is imported by everything
    assert find_cycle(planted) is not None


def test_the_library_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_library_module_is_over_800_lines():
    long = {str(p.relative_to(LIB.parent)): n for p in _modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 800}
    assert not long, long


def test_readme_layout_names_every_module():
    """The README's layout map names every public module and package of the library."""
    text = (LIB.parent / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```")[1]
    names = {p.stem for p in LIB.glob("*.py")} | {p.name for p in LIB.iterdir() if (p / "__init__.py").exists()}
    missing = sorted(n for n in names if not n.startswith("_") and not re.search(rf"\b{re.escape(n)}\b", block))
    assert not missing, f"README's layout does not mention: {missing}"


def test_pyproject_lists_every_package():
    """A wheel holds only the packages pyproject names: a new subpackage missing there works in
    an editable install and is absent from a real one."""
    import tomllib

    root = LIB.parent
    conf = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(conf["tool"]["setuptools"]["packages"])
    found = {"loratool." + ".".join(p.parent.relative_to(LIB).parts) if p.parent != LIB else "loratool"
             for p in LIB.rglob("__init__.py")}
    found.add("loratool.kernels")
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_no_fixture_module_shadows_a_package():
    """`make fixtures` runs fixtures/generate.py as a script, so fixtures/ is first on sys.path:
    a fixtures/lycoris.py made `import lycoris` import itself and broke fixture generation."""
    import importlib.util
    import sys

    fixtures = LIB.parent / "fixtures"
    saved = list(sys.path)
    try:
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != fixtures.resolve()]
        clashes = [p.name for p in fixtures.glob("*.py")
                   if p.stem not in ("__init__",) and importlib.util.find_spec(p.stem) is not None]
    finally:
        sys.path[:] = saved
    assert clashes == [], f"fixtures modules named like importable packages: {clashes}"
