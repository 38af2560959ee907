"""The layout states the architecture: every module imports, no import cycle, no upward import.

DESIGN.md's layers, lowest first (dependencies point downward only)::

    base (errors, runtime, atomic, dtypes) < kernels < layers < weights < backbones < models < tasks < apps
    < api (the ``vitkit`` package itself, ``vitkit.api``, ``vitkit.cli`` and the compatibility modules)

The import graph is read from the sources with ``ast``: every ``import`` counts, also those inside functions
(a function-local import is how a cycle hides) but not those under ``if TYPE_CHECKING:``. ``from pkg import
name`` is an edge to ``pkg``'s ``__init__`` (or to the module ``pkg.name``). The implicit run of parent packages'
``__init__`` is not an edge: a package that imports its own modules is no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = SRC / "vitkit"

# (layer, module prefixes) lowest first; a module belongs to the layer of its longest matching prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("vitkit.errors", "vitkit.runtime", "vitkit.atomic", "vitkit.dtypes")),
    ("kernels", ("vitkit.kernels",)),
    ("layers", ("vitkit.layers",)),
    ("weights", ("vitkit.weights",)),
    ("backbones", ("vitkit.backbones",)),
    ("models", ("vitkit.models",)),
    ("tasks", ("vitkit.tasks",)),
    ("apps", ("vitkit.apps",)),
    ("api", ("vitkit", "vitkit.configs")),
]

# Upward imports that are right, each with its reason: (importer, imported) -> why. Keep this short.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}

# Modules that need an optional dependency to import: (module, the dependency it reports missing).
OPTIONAL: dict[str, str] = {
    "vitkit.apps.peaks.stream.ray": "ray",
    "vitkit.apps.peaks.stream.remote": "ray",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module (or package) that ``name`` (a module or ``module.attribute``) is defined in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(_owner(a.name) for a in node.names if a.name.split(".")[0] == "vitkit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "vitkit":
                continue
            for a in node.names:  # "from pkg import module" imports the module
                full = f"{name}.{a.name}"
                out.add(full if full in MODULES else _owner(name))
    out.discard(module)
    out.discard(None)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (module == pre or module.startswith(pre + ".")) and len(pre) > best:
                best, rank = len(pre), i
    # top-level modules not listed in a lower layer (vitkit.api, vitkit.cli, vitkit.zoo...) are the API
    return rank if rank is not None else len(LAYERS) - 1


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

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
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(m for m in MODULES if m not in OPTIONAL)
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            f"for name, dep in {sorted(OPTIONAL.items())!r}:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ImportError as e:\n"
            "        if dep not in str(e):\n"
            "            raise\n"
            "assert 'timm' not in sys.modules, 'vitkit must not import timm'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_no_upward_import():
    bad = []
    for m, deps in GRAPH.items():
        for d in deps:
            if _layer(d) > _layer(m) and (m, d) not in ALLOWED_UPWARD:
                bad.append(f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})")
    assert not bad, "imports that point up the layers (DESIGN.md):\n" + "\n".join(sorted(bad))


def test_allowed_exceptions_are_still_needed():
    stale = [k for k in ALLOWED_UPWARD if k[1] not in GRAPH.get(k[0], ())]
    assert not stale, f"ALLOWED_UPWARD lists imports that no longer exist: {stale}"


@pytest.mark.parametrize("graph, cycle", [({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, ["a", "b", "c"]),
                                          ({"a": {"b"}, "b": set()}, None)])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert _cycles(graph) == ([cycle] if cycle else [])


def test_the_graph_sees_function_local_imports(tmp_path):
    mod = ROOT / "weights" / "loading.py"
    assert "vitkit.layers" in GRAPH["vitkit.weights.loading"] and mod.exists()
    # a function-local import is an edge like any other
    src = "def f():\n    from vitkit.models.eomt import EoMT\n"
    (tmp_path / "m.py").write_text(src)
    assert "vitkit.models.eomt" in _imports("vitkit.weights.m", tmp_path / "m.py")
