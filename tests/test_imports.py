"""One clear house: the library never imports its doors, no import cycles, every package installed.

The doors are the CLI (``faceid.cli``), the KFP components (``components/``, installed as
``faceid_components``) and the pipelines with their runner (``pipelines/``, ``faceid_pipelines``);
everything else under ``faceid/`` is the library. Imports are read from the source (every
``import`` statement, also inside functions: a lazy import is still a dependency).
"""

from __future__ import annotations

import tomllib

import import_graph as ig

DOOR_PACKAGES = ("faceid_pipelines", "faceid_components")
DOOR_MODULES = {"faceid.cli"}


def _is_door(name: str) -> bool:
    return name in DOOR_MODULES or name.split(".")[0] in DOOR_PACKAGES


def test_the_library_never_imports_its_doors():
    assert set(DOOR_PACKAGES) <= set(ig.package_roots()), ig.package_roots()
    offenders = {name: sorted(d for d in ig.module_imports(name) if _is_door(d))
                 for name in ig.modules(("faceid",)) if not _is_door(name)}
    assert not {k: v for k, v in offenders.items() if v}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_the_tree():
    graph = ig.import_graph(("faceid", *DOOR_PACKAGES))
    assert len(graph) > 40
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_package_folder_is_installed():
    """pyproject.toml lists packages by hand (package-dir renames components/ and pipelines/): a new
    sub-package must be listed, or an installed faceid would lack it."""
    setuptools = tomllib.loads((ig.REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name for name in ig.modules(("faceid", *DOOR_PACKAGES)) if ig.is_package(name)}
    assert set(setuptools["packages"]) == packages
