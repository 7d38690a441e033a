"""Modules import in one direction: no import cycles, including imports placed inside functions
(an import moved into a function to dodge a cycle is still a cycle)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"cl_arch": "cl_arch", "cl_arch.kernels": "kernels", "cl_arch.train": "train", "cl_arch.eval": "eval",
            "cl_arch.scripts": "scripts"}


def _modules():
    mods = {}
    for pkg, folder in PACKAGES.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            if "__pycache__" in dirpath:
                continue
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))[:-3].replace(os.sep, ".")
                    if rel == "__init__":
                        name = pkg
                    elif rel.endswith(".__init__"):
                        name = f"{pkg}.{rel[:-len('.__init__')]}"
                    else:
                        name = f"{pkg}.{rel}"
                    mods[name] = os.path.join(dirpath, f)
    return mods


def import_graph():
    """module -> modules of this project it imports anywhere in its source (a package's
    ``__init__`` counts as the package)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    if f"{target}.{alias.name}" in mods:
                        deps.add(f"{target}.{alias.name}")
                    elif target in mods:
                        deps.add(target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
        # a module importing its own package's __init__ (re-exports) is not a dependency loop
        graph[name] = {d for d in deps if d != name and not (name.startswith(d + ".") and mods[d].endswith("__init__.py"))}
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the project
    assert cycles(graph) == []
