"""The library's layers, read from the imports of every module (ast), and import cycles.

Dependencies point one way, so that each part can be understood, tested and reused on its own:

* ``fileio``, ``simulation``, ``metrics``, ``vtkimage``, ``jobstate`` use nothing of the library
  (``segmentation`` only ``vtkimage``);
* ``engine`` (the network, training, inference, the latest-frame-wins live despeckler) uses
  ``fileio``: never ``scene`` (MRML), ``cli`` or ``igtl``;
* ``igtl`` (the OpenIGTLink relay and its messages) uses ``engine`` and ``fileio``;
* ``scene`` (MRML, headless) uses all of the above, ``cli`` none of ``scene``;
* the module's Qt side (``Speckle2Self.py``, ``Speckle2SelfWidgets``) reaches the library
  through ``scene`` only (its self-test excepted), and the library never imports the Qt side.

Every import counts, also the ones inside functions (made lazy for start-up time, they are
dependencies all the same). A cycle is a chain of imports that leads back to its start.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "Speckle2Self"
LIB = "Speckle2SelfLib"
GUI = "Speckle2SelfWidgets"

#: What each layer of the library may import from the library (besides itself).
ALLOWED = {
    "jobstate": set(),
    "metrics": set(),
    "vtkimage": set(),
    "fileio": set(),
    "simulation": set(),
    "segmentation": {"vtkimage"},
    "engine": {"fileio", "jobstate"},
    "igtl": {"engine", "fileio"},
    "scene": {"engine", "fileio", "segmentation", "simulation", "igtl", "vtkimage", "jobstate"},
    "cli": {"engine", "fileio", "segmentation", "simulation", "igtl", "metrics", "vtkimage"},
}

#: The module's self-test checks the library itself (it makes a model, simulates speckle).
GUI_TESTS = {"Speckle2SelfWidgets.selftest"}

#: Cycles that another change is removing; each entry names the pair of modules.
KNOWN_CYCLES: set = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(MODULE_DIR).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources() -> Dict[str, Path]:
    """Module name -> file, for the module file, the Qt side and the library."""
    files = [MODULE_DIR / "Speckle2Self.py", *sorted((MODULE_DIR / LIB).rglob("*.py")),
             *sorted((MODULE_DIR / GUI).rglob("*.py"))]
    return {module_name(p): p for p in files if "__pycache__" not in p.parts}


def imported_names(path: Path, name: str) -> Set[str]:
    """Every module name an ``import`` or ``from ... import`` in the file can mean, resolved
    against the file's package (relative imports), at any depth (lazy imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}   # "from pkg import module"
    return found


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the project's modules it imports. A module's own parent packages are left out:
    Python loads them before the module anyway, so they make no dependency (and no cycle)."""
    modules = sources()
    graph = {}
    for name, path in modules.items():
        parents = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
        graph[name] = {m for m in imported_names(path, name) if m in modules and m != name and m not in parents}
    return graph


def layer(module: str) -> str:
    """"engine" for Speckle2SelfLib.engine.models, "gui" for the Qt side, "lib" for the package itself."""
    parts = module.split(".")
    if parts[0] != LIB:
        return "gui"
    return parts[1] if len(parts) > 1 else "lib"


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected group of modules (Tarjan), as a sorted list; a group of one
    that imports itself counts too."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    groups: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


# ----------------------------------------------------------------------------- the checks find what they look for

def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    assert find_cycles({"a": {"a"}}) == [["a"]]


def test_imports_are_resolved_relative_lazy_and_from_packages(tmp_path):
    path = tmp_path / "adapt.py"
    path.write_text("from ..engine.models import x\nfrom . import nodes\n\ndef f():\n    import numpy\n"
                    "    from .jobs import JobState\n")
    names = imported_names(path, "Speckle2SelfLib.scene.adapt")
    assert {"Speckle2SelfLib.engine.models", "Speckle2SelfLib.scene.nodes", "Speckle2SelfLib.scene.jobs",
            "numpy"} <= names


def test_the_graph_sees_the_library_and_the_qt_side():
    graph = import_graph()
    assert "Speckle2SelfLib.scene.logic" in graph["Speckle2Self"]
    assert {"Speckle2SelfLib.engine.inference", "Speckle2SelfLib.scene.nodes"} <= graph["Speckle2SelfLib.scene.live"] | \
        graph["Speckle2SelfLib.scene.logic"]
    assert {layer(m) for m in graph} >= set(ALLOWED) | {"gui"}


# ----------------------------------------------------------------------------- the rules

def layer_violations(graph: Dict[str, Set[str]]) -> List[str]:
    return [f"{source} imports {target}" for source, targets in sorted(graph.items()) for target in sorted(targets)
            if layer(source) in ALLOWED and layer(target) not in ALLOWED[layer(source)] | {layer(source), "lib"}]


def test_a_layer_violation_is_found():
    graph = {"Speckle2SelfLib.engine.adapt": {"Speckle2SelfLib.scene.nodes", "Speckle2SelfLib.engine.models"},
             "Speckle2SelfLib.fileio.safeio": {"Speckle2SelfLib.cli.exitcodes"},
             "Speckle2SelfLib.scene.logic": {"Speckle2SelfLib.engine.adapt"}}
    assert layer_violations(graph) == ["Speckle2SelfLib.engine.adapt imports Speckle2SelfLib.scene.nodes",
                                       "Speckle2SelfLib.fileio.safeio imports Speckle2SelfLib.cli.exitcodes"]


def test_every_library_layer_imports_only_what_it_may():
    graph = import_graph()
    unknown = sorted({layer(m) for m in graph} - set(ALLOWED) - {"gui", "lib"})
    assert not unknown, f"layers without a rule in ALLOWED: {unknown}"
    broken = layer_violations(graph)
    assert not broken, "imports against the layers:\n" + "\n".join(broken)


def test_the_library_never_imports_the_qt_side_and_the_qt_side_uses_the_scene_layer():
    graph = import_graph()
    upward = [f"{s} imports {t}" for s, targets in graph.items() if layer(s) != "gui"
              for t in targets if layer(t) == "gui"]
    assert not upward, upward
    past_scene = [f"{s} imports {t}" for s, targets in graph.items() if layer(s) == "gui" and s not in GUI_TESTS
                  for t in targets if layer(t) not in ("gui", "scene")]
    assert not past_scene, "the Qt side reaches the library through scene (its logic):\n" + "\n".join(past_scene)


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    unexpected = [c for c in cycles if frozenset(c) not in KNOWN_CYCLES]
    assert not unexpected, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in unexpected)


@pytest.mark.parametrize("pair", sorted(sorted(c) for c in KNOWN_CYCLES))
def test_known_cycles_are_still_there(pair):
    """An exemption that is no longer needed must go (then this test tells)."""
    assert pair in find_cycles(import_graph()), f"{pair} is no longer a cycle: remove it from KNOWN_CYCLES"
