"""The package's modules: each one's public names import, and no two import each other.

- ``from cv2r2d2.<module> import *`` works for every module, and gives every name of
  its ``__all__`` (every module but the ``python -m`` entry points has one).
- No import cycle, counting imports inside functions (``import_optional``-style late
  imports included); imports under ``TYPE_CHECKING`` do not count, as in the layers
  contract of pyproject.toml.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Set

import pytest

import cv2r2d2

MODULES = sorted(m.name for m in pkgutil.walk_packages(cv2r2d2.__path__, "cv2r2d2."))
# `python -m` entry points: the command line's main, nothing to export.
ENTRY_POINTS = {"cv2r2d2.__main__", "cv2r2d2.train.__main__"}


@pytest.mark.parametrize("name", ["cv2r2d2", *MODULES])
def test_star_import_gives_every_public_name(name):
    module = importlib.import_module(name)
    if name in ENTRY_POINTS:
        return
    assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__ list"
    assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ repeats a name"
    namespace: Dict[str, object] = {}
    exec(f"from {name} import *", namespace)  # noqa: S102 - the statement under test
    missing = [n for n in module.__all__ if n not in namespace]
    assert not missing, f"from {name} import * lacks {missing}"


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    grimp = pytest.importorskip("grimp")  # installed with import-linter (the test extra)
    graph = grimp.build_graph("cv2r2d2", exclude_type_checking_imports=True, cache_dir=None)
    imports = {module: set(graph.find_modules_directly_imported_by(module))
               for module in graph.modules}
    assert _cycles(imports) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
