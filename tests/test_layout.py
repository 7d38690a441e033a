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


# ---- Python started in the repository root (python -m pytest, python -c, accelerate launch -m) ----

def test_no_root_folder_is_a_regular_package_but_cl_arch():
    """The root is on sys.path there, and a regular package in it beats any installed distribution of
    the same name (transformers imports Hugging Face's ``kernels``); a folder with no ``__init__.py``
    is a namespace portion, which never does."""
    packages = sorted(d for d in os.listdir(ROOT)
                      if os.path.isfile(os.path.join(ROOT, d, "__init__.py")) and not d.startswith("."))
    assert packages == ["cl_arch"]
    for pkg, folder in PACKAGES.items():
        if folder != "cl_arch":  # each source folder reaches the import root through its link
            assert os.path.realpath(os.path.join(ROOT, "cl_arch", folder)) == os.path.join(ROOT, folder)


def _run_in_root(args):
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    exe = [sys.executable] if args[0] == "python" else [os.path.join(os.path.dirname(sys.executable), args[0])]
    return subprocess.run(exe + args[1:], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_transformers_and_cl_arch_import_from_the_repository_root():
    pytest.importorskip("transformers")
    code = ("import sys, importlib.util, transformers; from transformers import LlamaForCausalLM; import cl_arch.hf; "
            "import cl_arch.kernels.plastic, cl_arch.train.checkpoint, cl_arch.eval.codebase, cl_arch.scripts.cli; "
            "spec = importlib.util.find_spec('kernels'); "
            "print('kernels:', 'namespace' if spec.origin in (None, 'namespace') else spec.origin)")
    out = _run_in_root(["python", "-c", code])
    assert out.returncode == 0, out.stderr[-3000:]
    line = [s for s in out.stdout.splitlines() if s.startswith("kernels:")][0]
    assert not line.startswith("kernels: " + os.path.join(ROOT, "kernels")), line  # never the repository's folder


def test_console_script_help_from_the_repository_root():
    out = _run_in_root(["cl-arch", "--help"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "consolidate" in out.stdout


# ---- eval/: a library (eval/lib/) and benchmarks that import only the library ----

# reward_fit.py (the reward memory's settings search, which games uses) is library code that stays
# beside the benchmarks while the Trainer work edits its optimiser loop; it imports only the library.
EVAL_LIBRARY_OUTSIDE_LIB = {"cl_arch.eval.reward_fit"}


def eval_layout_violations(graph):
    """``module -> the eval benchmarks it imports`` for every eval module that imports one: a benchmark is
    an eval module outside ``eval/lib/`` (and not in ``EVAL_LIBRARY_OUTSIDE_LIB``); nothing may import one."""
    def is_benchmark(m):
        return m.startswith("cl_arch.eval.") and not m.startswith("cl_arch.eval.lib") and \
            m not in EVAL_LIBRARY_OUTSIDE_LIB
    out = {m: sorted(d for d in deps if is_benchmark(d)) for m, deps in graph.items() if m.startswith("cl_arch.eval.")}
    return {m: d for m, d in out.items() if d}


def test_a_benchmark_imports_only_the_eval_library():
    """Each benchmark imports, of ``cl_arch.eval``, only the library (``cl_arch.eval.lib.*`` and
    reward_fit), never another benchmark; the library imports no benchmark (under a second: the import graph)."""
    graph = import_graph()
    assert {"cl_arch.eval.codebase", "cl_arch.eval.sutton", "cl_arch.eval.retention", "cl_arch.eval.lib.play"} <= \
        set(graph)
    assert eval_layout_violations(graph) == {}


def test_the_eval_layout_check_finds_a_benchmark_importing_another():
    graph = {"cl_arch.eval.a": {"cl_arch.eval.lib.x"}, "cl_arch.eval.b": {"cl_arch.eval.a", "cl_arch.eval.lib.x"},
             "cl_arch.eval.lib.x": set(), "cl_arch.eval.lib.y": {"cl_arch.eval.b"},
             "cl_arch.eval.reward_fit": {"cl_arch.eval.lib.x"}, "cl_arch.eval.c": {"cl_arch.eval.reward_fit"}}
    assert eval_layout_violations(graph) == {"cl_arch.eval.b": ["cl_arch.eval.a"],
                                             "cl_arch.eval.lib.y": ["cl_arch.eval.b"]}
