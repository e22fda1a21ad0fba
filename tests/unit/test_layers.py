"""The tree's layers hold (docs/architecture.md): every module of harness/ belongs to a layer, imports only
from its own layer or the layers below it, takes part in no import circle, and no module outside
harness/store/ speaks SQL.

The imports are read with ast from the source (every import, also those inside functions: a local import
that dodges a circle at load time is still a circle in the design; not those under `if TYPE_CHECKING:`,
which only name types for annotations). The checks are plain functions, and the
tests at the bottom run them on small made-up trees too, so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Lowest first. A module may import from its own layer and the layers before it, never after.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("harness.base", "harness")),  # errors, safefs, units, YAML with lines; "harness": the package itself
    ("protocols", ("harness.protocols",)),  # sans-IO codecs: the scenario validates templates with them
    ("shim", ("harness.shim",)),            # the LD_PRELOAD fault shim: its source, build and control file
    ("scenario", ("harness.scenario",)),    # the typed model and how it is read
    ("plan", ("harness.plan",)),            # seeded streams and cuts: pure functions of the scenario
    ("collect", ("harness.collect",)),      # cores, triage, proof of what ran
    ("store", ("harness.store",)),          # the only SQL
    ("analysis", ("harness.analysis",)),    # pure over what the store reads
    ("present", ("harness.present",)),      # text, HTML, JUnit, Prometheus, crash views, status line
    ("run", ("harness.run",)),              # the only place that schedules I/O; writes the store, shows status
    ("sim", ("harness.sim",)),              # a second executor of the same plan, in virtual time
    ("cluster", ("harness.cluster",)),      # simulated trials as tasks on a Dask cluster (docs/cluster.md)
    ("cli", ("harness.cli", "harness.__main__")),            # parse and dispatch
)

# Upward imports still to be removed, each with the change that removes it. The test fails on any other, and
# on an entry that no longer happens (so the list only shrinks). None now.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}

# Where SQL is allowed: the store package, and nothing else.
SQL_PACKAGES = ("harness.store",)
SQL_TEXT = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER|PRAGMA|WITH)\s")
SQL_CALLS = {"execute", "executemany", "executescript"}    # on a connection (Run.execute is no SQL)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path, package: str = "harness") -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The harness modules this module imports: `from pkg import sub` counts as sub when sub is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue        # `if TYPE_CHECKING:` imports name types for annotations; nothing runs them
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in known else source)
    out = set()
    for target in found:
        while target and target not in known:    # import harness.a.b.attr -> harness.a.b
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def layer_of(name: str) -> int | None:
    best: tuple[int, int] | None = None          # (prefix length, layer index): the longest prefix wins
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or (prefix != "harness" and name.startswith(prefix + ".")):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    return None if best is None else best[1]


def unplaced(g: dict[str, set[str]]) -> list[str]:
    return sorted(name for name in g if layer_of(name) is None)


def upward(g: dict[str, set[str]], known: Iterable[tuple[str, str]] = ()) -> list[str]:
    out = []
    for name, targets in sorted(g.items()):
        here = layer_of(name)
        for target in sorted(targets):
            there = layer_of(target)
            if here is not None and there is not None and there > here and (name, target) not in set(known):
                out.append(f"{name} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]}), a layer above it")
    return out


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def _names_a_connection(node: ast.expr) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return name in ("db", "conn", "connection", "cursor")


def sql_outside_store(root: Path) -> list[str]:
    out = []
    for name, path in modules(root).items():
        if any(name == p or name.startswith(p + ".") for p in SQL_PACKAGES):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL_TEXT.match(node.value):
                out.append(f"{path.relative_to(root)}:{node.lineno}: SQL text {node.value.strip()[:50]!r}")
            elif isinstance(node, ast.Attribute) and node.attr == "db":
                out.append(f"{path.relative_to(root)}:{node.lineno}: the store's connection (.db)")
            elif isinstance(node, ast.Attribute) and node.attr in SQL_CALLS and _names_a_connection(node.value):
                out.append(f"{path.relative_to(root)}:{node.lineno}: .{node.attr}(...) on a connection")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if "sqlite3" in names:
                    out.append(f"{path.relative_to(root)}:{node.lineno}: imports sqlite3")
    return sorted(out)


# --- the tree as it is -------------------------------------------------------------------------------------

def test_every_module_is_in_a_layer() -> None:
    assert unplaced(graph(REPO)) == []


def test_no_module_imports_a_layer_above_its_own() -> None:
    g = graph(REPO)
    assert upward(g, KNOWN_UPWARD) == []
    gone = [f"{a} -> {b}" for a, b in KNOWN_UPWARD if b not in g.get(a, set())]
    assert gone == [], "no longer imported: remove from KNOWN_UPWARD"


def test_no_import_circle() -> None:
    assert circles(graph(REPO)) == []


def test_no_sql_outside_the_store() -> None:
    assert sql_outside_store(REPO) == []


# --- the checks themselves, on made-up trees --------------------------------------------------------------

def _tree(tmp: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp


def test_the_checks_find_an_upward_import_a_circle_sql_and_a_stray_module(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "harness/__init__.py": "",
        "harness/base/__init__.py": "",
        "harness/base/errors.py": "from harness.store import runstore\n",           # base -> store: upward
        "harness/store/__init__.py": "",
        "harness/store/runstore.py": "import sqlite3\ndef f(db):\n    return db.execute('SELECT 1')\n",
        "harness/analysis/__init__.py": "",
        "harness/analysis/a.py": "from . import b\nQ = 'SELECT x FROM t'\n",          # relative import
        "harness/analysis/b.py": "def g():\n    from harness.analysis.a import Q\n",   # a local import: a circle
        "harness/analysis/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                 "    from harness.analysis.e import E\n",          # for annotations only
        "harness/analysis/e.py": "from harness.analysis import d\nclass E:\n    pass\n",
        "harness/analysis/c.py": "def h(store, conn, q):\n    store.db\n    conn.executemany(q)\n"
                                 "    return store.execute()\n",
        "harness/stray.py": "import os\n",
    })
    g = graph(root)
    assert g["harness.base.errors"] == {"harness.store.runstore"}
    assert g["harness.analysis.d"] == set() and g["harness.analysis.e"] == {"harness.analysis.d"}
    assert upward(g) == ["harness.base.errors (base) imports harness.store.runstore (store), a layer above it"]
    assert upward(g, [("harness.base.errors", "harness.store.runstore")]) == []
    assert circles(g) == [["harness.analysis.a", "harness.analysis.b"]]
    assert unplaced(g) == ["harness.stray"]
    assert sql_outside_store(root) == ["harness/analysis/a.py:2: SQL text 'SELECT x FROM t'",
                                       "harness/analysis/c.py:2: the store's connection (.db)",
                                       "harness/analysis/c.py:3: .executemany(...) on a connection"]


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "harness/__init__.py": "",
        "harness/cli.py": "from harness.run import runner\nfrom harness.base.errors import E\n",
        "harness/run/__init__.py": "",
        "harness/run/runner.py": "from harness.store.runstore import open_run\nimport harness.base.errors\n",
        "harness/store/__init__.py": "",
        "harness/store/runstore.py": "import sqlite3\nfrom harness.base import errors\n",
        "harness/base/__init__.py": "",
        "harness/base/errors.py": "class E(Exception):\n    pass\n",
    })
    g = graph(root)
    assert g["harness.cli"] == {"harness.run.runner", "harness.base.errors"}
    assert upward(g) == [] and circles(g) == [] and sql_outside_store(root) == []
