"""ARCHITECTURE.md's map is the code's: its table names every module, its arrows are the real imports.

The arrows are the fenced ```imports block: one line per module, `module -> eager, ... | lazy: ...`, where
eager imports run when the module is imported (module level) and lazy ones inside a function, or through a
package's `_EXPORTS` (lazy.py). Modules inside a package are `package.module`; `package` is its __init__.
Parsed with `ast` (no module is imported, so no torch): a few tens of milliseconds.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cifar10_cnn"
MAP = ROOT / "ARCHITECTURE.md"
LINE = re.compile(r"^([\w.]+)(?:\s*->\s*([\w., ]*?))?(?:\s*\|\s*lazy:\s*([\w., ]+))?$")

Edges = dict[str, dict[str, str]]  # module -> {imported module: "eager" or "lazy"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The modules of ours that one import statement loads: `from .x import y` is x.y if that is a module."""
    if isinstance(node, ast.Import):
        return {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("cifar10_cnn.")}
    if node.level == 0:
        if not (node.module or "").startswith("cifar10_cnn"):
            return set()
        base = node.module.split(".")[1:]
    else:
        here = [] if name == "__init__" else name.split(".")[: None if path.name == "__init__.py" else -1]
        base = here[: len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
    prefix = ".".join(base)
    found = set()
    for alias in node.names:
        sub = f"{prefix}.{alias.name}" if prefix else alias.name
        found.add(sub if sub in known else prefix or "__init__")
    return found


def lazy_exports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The modules a package's `_EXPORTS = {public name: module}` loads on first use (lazy.py)."""
    prefix = "" if name == "__init__" else f"{name}."
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["_EXPORTS"]:
            values = ast.literal_eval(node.value).values()
            assert all(prefix + v in known for v in values), (name, sorted(values))
            return {prefix + v for v in values}
    return set()


def imports(tree: ast.AST, lazy: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it is lazy (inside a function body, run only when called)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
        else:
            inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from imports(node, inner)


@functools.cache
def real_edges() -> Edges:
    known = modules()
    edges: Edges = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        deps: dict[str, str] = dict.fromkeys(lazy_exports(name, tree, set(known)), "lazy")
        for node, lazy in imports(tree):
            for dep in imported(name, path, node, set(known)) - {name}:
                if not lazy or dep not in deps:  # eager wherever one import of it is
                    deps[dep] = "lazy" if lazy else "eager"
        edges[name] = deps
    return edges


def declared() -> tuple[list[str], Edges]:
    """The modules of the ```imports block in the order listed, and their arrows."""
    block = re.search(r"^```imports\n(.*?)^```", MAP.read_text(), re.S | re.M)
    assert block, f"{MAP.name} has no ```imports block"
    order, edges = [], {}
    for raw in block.group(1).splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = LINE.match(line)
        assert m, f"not `module -> a, b | lazy: c`: {raw!r}"
        name, eager, lazy = m.groups()
        assert name not in edges, f"{name} has two lines"
        order.append(name)
        split = lambda s: [d.strip() for d in (s or "").split(",") if d.strip()]  # noqa: E731
        edges[name] = {**dict.fromkeys(split(lazy), "lazy"), **dict.fromkeys(split(eager), "eager")}
    return order, edges


def arrows(edges: Edges) -> set[str]:
    return {f"{a} -> {b} ({kind})" for a, deps in edges.items() for b, kind in deps.items()}


def test_every_import_is_declared_and_every_arrow_is_an_import():
    real, (_, listed) = real_edges(), declared()
    assert sorted(set(real) - set(listed)) == [], "modules missing from the ```imports block"
    assert sorted(set(listed) - set(real)) == [], "the ```imports block lists modules that do not exist"
    assert sorted(arrows(real) - arrows(listed)) == [], "imports that the map does not declare (or not so)"
    assert sorted(arrows(listed) - arrows(real)) == [], "arrows in the map that no import makes"


def test_the_arrows_point_down_the_map_so_there_is_no_cycle():
    """Each module is listed above everything it imports, lazy or not: an order that exists only without cycles."""
    order, listed = declared()
    rank = {name: i for i, name in enumerate(order)}
    upward = [f"{a} -> {b}" for a, deps in listed.items() for b in deps if rank.get(b, len(order)) <= rank[a]]
    assert upward == [], "arrows pointing up the ```imports block (a cycle, or a module listed too low)"
    assert find_cycle(real_edges()) is None
    collapsed = {}  # a package as one node: none of its modules is imported by what it imports
    for a, deps in real_edges().items():
        collapsed.setdefault(a.split(".")[0], {}).update({b.split(".")[0]: "" for b in deps})
    assert find_cycle({a: {b: k for b, k in d.items() if b != a} for a, d in collapsed.items()}) is None


def find_cycle(edges: Edges) -> list[str] | None:
    """One import cycle (as the path around it), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in edges.get(node, {}):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep] if dep in path else [node, dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[node] = 2
        return None

    return next((c for n in list(edges) if n not in state and (c := visit(n, [n]))), None)


def table_name(path: Path) -> str:
    """How the table names a module: `cli.py`, `serve/app.py`, `serve/` (a package's __init__), `__init__.py`."""
    rel = path.relative_to(PACKAGE)
    return f"{rel.parent}/" if rel.name == "__init__.py" and rel.parent.parts else str(rel)


def test_the_table_has_one_row_per_module():
    rows = re.findall(r"^\| `([^`]+)` \|", MAP.read_text(), re.M)
    files = {table_name(p) for p in modules().values()}
    assert sorted(set(files) - set(rows)) == [], "modules without a row in the table"
    assert sorted(set(rows) - set(files)) == [], "rows for modules that do not exist"
    assert len(rows) == len(set(rows)), "a module with two rows"


def test_the_checks_find_what_they_are_for():
    """The parser sees a lazy import and a relative one from a package, and find_cycle sees a cycle."""
    real = real_edges()
    assert real["cli"]["pipeline"] == "lazy" and real["cli"]["config"] == "eager"
    assert real["report.load"]["runs"] == "eager" and real["serve"]["serve.app"] == "lazy"
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": ""}, "b": {}}) is None
