"""The import graph of `stoptool`: no cycles, and no module imports one of a higher layer.

Every `import` statement counts, those inside functions too: a lazy import still ties two
modules together, it only hides the tie until the function runs.
"""

import ast
from pathlib import Path

import pytest

import stoptool

# Lowest first. A module sits in the layer of the longest entry that is its name or a package
# above it, so a module added under one of these packages has a layer without being listed.
# "stoptool" itself is the package's __init__ only: a new top-level module must be placed.
LAYERS = [
    ["stoptool", "stoptool.errors", "stoptool.configs"],
    ["stoptool.options", "stoptool.models.archs", "stoptool.io.paths"],
    ["stoptool.models", "stoptool.masks", "stoptool.flops"],
    ["stoptool.data", "stoptool.io.checkpoint"],
    ["stoptool.io", "stoptool.config", "stoptool.runs"],
    ["stoptool.train", "stoptool.probe"],
    # the evaluations beyond the linear probe: fine-tuning (Table 5), transfer probes (Table 4),
    # video label propagation (Table 3)
    ["stoptool.finetune", "stoptool.evaluate", "stoptool.track"],
    ["stoptool.viz", "stoptool.bench", "stoptool.dispatch", "stoptool.sweep", "stoptool.report",
     "stoptool.demo"],
    ["stoptool.cli", "stoptool.cliopts", "stoptool.__main__"],
]
ROOT = "stoptool"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package at `root`, by dotted name (a package by its own name)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(path: Path, module: str, known: set[str]) -> set[str]:
    """The modules of `known` that the file of `module` imports, anywhere in it.

    `from a.b import c` imports the module a.b.c when there is one, else a.b (c is a name in
    it); an import of a name inside a module counts as an import of that module."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: counted from the package that holds `module`
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` names a.b.c; a name that is not a module stands for its module
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    names = module_names(root, package)
    return {name: imported_modules(path, name, set(names)) for name, path in names.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each group of modules that import each other, e.g. [a, b, a]."""
    cycles, done = [], set()
    for start in sorted(graph):
        if start in done:
            continue
        reach = _reachable(graph, start)
        group = {m for m in reach if start in _reachable(graph, m)}
        done |= group | {start}
        if start in group:
            cycles.append(_path(graph, start, start, group))
    return cycles


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules `start` imports, directly or through others (itself only through a cycle)."""
    seen, stack = set(), list(graph.get(start, ()))
    while stack:
        m = stack.pop()
        if m not in seen:
            seen.add(m)
            stack.extend(graph.get(m, ()))
    return seen


def _path(graph: dict[str, set[str]], start: str, end: str, within: set[str]) -> list[str]:
    """A shortest chain of imports from `start` to `end` through `within` (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for m in frontier:
            for n in sorted(graph.get(m, ())):
                if n in within and n not in came_from:
                    came_from[n] = m
                    following.append(n)
        if end in came_from:
            break
        frontier = following
    chain = [end]
    while len(chain) == 1 or chain[-1] != start:
        chain.append(came_from[chain[-1]])
    return chain[::-1]


def layer_of(module: str, layers: list[list[str]], root: str = ROOT) -> int | None:
    best, depth = None, -1
    for level, entries in enumerate(layers):
        for entry in entries:
            covers = module == entry or (entry != root and module.startswith(entry + "."))
            if covers and entry.count(".") > depth:
                best, depth = level, entry.count(".")
    return best


def upward_imports(graph: dict[str, set[str]], layers: list[list[str]], root: str = ROOT) -> list[str]:
    found = []
    for module in sorted(graph):
        own = layer_of(module, layers, root)
        for target in sorted(graph[module]):
            theirs = layer_of(target, layers, root)
            if own is not None and theirs is not None and theirs > own:
                found.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(Path(stoptool.__file__).parent, ROOT)


# -- the package ---------------------------------------------------------------------------


def test_the_graph_is_read_from_the_package(graph):
    # guards the checks below against passing on a graph that came out empty
    assert len(graph) > 30
    assert {"stoptool.errors", "stoptool.io.paths"} <= graph["stoptool.data.datasets"]


def test_every_module_has_a_layer(graph):
    unplaced = [m for m in sorted(graph) if layer_of(m, LAYERS) is None]
    assert not unplaced, f"modules in no layer (place them in LAYERS): {', '.join(unplaced)}"


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_a_higher_layer(graph):
    found = upward_imports(graph, LAYERS)
    assert not found, "imports of a higher layer:\n" + "\n".join(found)


# -- the checks themselves, on graphs made up for them -------------------------------------


def test_a_cycle_is_found_and_named():
    assert find_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_an_import_of_a_higher_layer_is_found():
    layers = [["p", "p.low"], ["p.high"]]
    assert upward_imports({"p.low.x": {"p.high.y"}, "p.high.y": set()}, layers, "p") == [
        "p.low.x (layer 0) imports p.high.y (layer 1)"]
    # downward and sideways are allowed
    assert upward_imports({"p.high.y": {"p.low.x", "p.high"}, "p.low.x": set()}, layers, "p") == []


def test_the_longest_entry_decides_and_the_root_covers_only_itself():
    layers = [["p", "p.a.base"], ["p.a"]]
    assert [layer_of(m, layers, "p") for m in ("p", "p.a", "p.a.x", "p.a.base", "p.a.base.y")] == [
        0, 1, 1, 0, 0]
    assert layer_of("p.new", layers, "p") is None
    assert layer_of("p.ab", layers, "p") is None  # a prefix of the name, not a package above it


def test_every_kind_of_import_statement_is_read(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "errors.py").write_text("")
    (root / "util.py").write_text("VALUE = 1\n")
    (root / "sub" / "__init__.py").write_text("from .leaf import thing\n")
    (root / "sub" / "leaf.py").write_text(
        "import pkg.errors as e\n"
        "from .. import util\n"
        "from . import sibling\n"
        "thing = 1\n"
        "def late():\n"
        "    from pkg import top\n"
        "    from pkg.util import VALUE\n"
        "    return top, VALUE\n"
    )
    (root / "sub" / "sibling.py").write_text("import os\n")
    (root / "top.py").write_text("class A:\n    def m(self):\n        import pkg.sub.leaf\n")
    graph = import_graph(root, "pkg")
    assert graph["pkg.sub.leaf"] == {"pkg.errors", "pkg.util", "pkg.sub.sibling", "pkg.top"}
    assert graph["pkg.sub"] == {"pkg.sub.leaf"}
    assert graph["pkg.top"] == {"pkg.sub.leaf"}  # inside a method
    assert graph["pkg.sub.sibling"] == set()  # outside the package: not counted
    assert find_cycles(graph) == [["pkg.sub.leaf", "pkg.top", "pkg.sub.leaf"]]
