"""The package's imports flow one way: no import cycle (imports inside functions count, they only hide a
cycle), and the core library never imports the nnU-Net integration, the CLI commands or the demo.

The graph is read with ``ast`` from the installed package's files, so nothing is imported to build it
(only sub-package ``__init__`` files, to locate the folders the packaging maps in)."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import pytest

ROOT = "lesiondiffusion"
# what the core library must not depend on (the layers above it)
UPPER = (f"{ROOT}.nnunet_integration", f"{ROOT}.commands", f"{ROOT}.demo", f"{ROOT}.cli", f"{ROOT}.__main__")


def _spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def module_imports(name: str, path: Path, is_pkg: bool) -> list[tuple[str, int]]:
    """(dotted target, line) of every import of the package's own modules, module level and in functions.
    ``from a import b`` gives ``a.b``: a module when b is one, otherwise an attribute of ``a``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    pkg = name if is_pkg else name.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = parts[: len(parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return [(t, line) for t, line in out if t == ROOT or t.startswith(ROOT + ".")]


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is package) for every module of the installed package, including the
    sub-packages the packaging maps in from other folders (found through the imports that name them)."""
    mods: dict[str, tuple[Path, bool]] = {}
    seen: set[str] = set()
    todo = [ROOT]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        parent = name.rpartition(".")[0]
        if parent and parent not in mods:
            if parent in seen:  # the parent is no module: neither is this
                seen.add(name)
                continue
            todo += [name, parent]
            continue
        seen.add(name)
        if parent and not mods[parent][1]:
            continue  # an attribute of a module, not a module
        spec = _spec(name)
        if spec is None or not str(spec.origin or "").endswith(".py"):
            continue
        is_pkg = spec.submodule_search_locations is not None
        mods[name] = (Path(spec.origin), is_pkg)
        if is_pkg:
            todo += [f"{name}.{m.name}" for m in pkgutil.iter_modules(list(spec.submodule_search_locations))]
        for target, _ in module_imports(name, *mods[name]):
            parts = target.split(".")
            todo += [".".join(parts[:i]) for i in range(2, len(parts) + 1)]
    return mods


def import_graph(mods: dict[str, tuple[Path, bool]]) -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}; an imported attribute counts as its module."""
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_pkg) in mods.items():
        edges: dict[str, int] = {}
        for target, line in module_imports(name, path, is_pkg):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


@pytest.fixture(scope="module")
def mods():
    return package_modules()


def _is_core(name: str, path: Path) -> bool:
    """The library under src/lesiondiffusion/, less the layers above it."""
    core_dir = Path(_spec(ROOT).origin).parent
    return path.is_relative_to(core_dir) and not any(name == u or name.startswith(u + ".") for u in UPPER)


def test_the_walk_finds_every_part_of_the_package(mods):
    for name in (f"{ROOT}.pipeline", f"{ROOT}.pretrain.engine", f"{ROOT}.nnunet_integration.trainers",
                 f"{ROOT}.commands.synthesize", f"{ROOT}.evaluation.segmentation", f"{ROOT}.models.lmnet"):
        assert name in mods, f"{name} not found by the import walk"


def test_no_import_cycles(mods):
    graph = import_graph(mods)
    found = cycles(graph)
    detail = ["  ".join(f"{a} -> {b} (line {line});" for a in c for b, line in graph[a].items() if b in c) for c in found]
    assert not found, "import cycles (module-level or inside functions):\n" + "\n".join(detail)


def test_core_library_does_not_import_the_layers_above_it(mods):
    bad = []
    for name, (path, is_pkg) in sorted(mods.items()):
        if not _is_core(name, path):
            continue
        for target, line in module_imports(name, path, is_pkg):
            if any(target == u or target.startswith(u + ".") for u in UPPER):
                bad.append(f"{path}:{line}: {name} imports {target}")
    assert not bad, "the core library imports the nnU-Net integration, the CLI or the demo:\n" + "\n".join(bad)


def test_the_cycle_finder_finds_cycles():
    """The checks above can fail: a two-module and a three-module cycle are found, a chain is not."""
    assert cycles({"a": {"b": 1}, "b": {"a": 1}, "c": {"a": 1}}) == [["a", "b"]]
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) == []


def test_imports_inside_functions_are_seen(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from .pipeline import LesionSynthesizer\n    import lesiondiffusion.demo\n")
    targets = [t for t, _ in module_imports(f"{ROOT}.m", src, False)]
    assert targets == [f"{ROOT}.pipeline.LesionSynthesizer", f"{ROOT}.demo"]


def test_installed_package_does_not_import_the_benchmarks(mods):
    """benchmarks/ (learns, toydata, the demo-bundle recipe, the few-shot script) is not installed: nothing
    in the package may import it, so the demo runs from a wheel."""
    bench = {p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")} | {"benchmarks"}
    assert {"learns", "toydata", "demo_bundle"} <= bench
    bad = []
    for name, (path, _) in sorted(mods.items()):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = [(node.module or "").split(".")[0]]
            else:
                continue
            bad += [f"{path}:{node.lineno}: {name} imports {t}" for t in tops if t in bench]
    assert not bad, "the installed package imports benchmark code:\n" + "\n".join(bad)
