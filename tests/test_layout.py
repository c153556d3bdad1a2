"""The package's shape (issue 28): no import cycles between its modules (imports inside functions included), no
module over 800 lines, and no module using another module's private names. Read from the source with ``ast``, so
an in-function import "to avoid the cycle" counts as the cycle it is."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lcnn_jax")
MAX_LINES = 800


def _modules() -> dict:
    """``{dotted name: path}`` of every module of the package (``pkg`` for ``pkg/__init__.py``)."""
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(d, f)
    return out


MODULES = _modules()
# Deprecated aliases kept for one release (they only re-export their new modules).
ALIASES = {"lcnn_jax.training", "lcnn_jax.sweep"}


def _imports(name: str, path: str):
    """``(target module, imported names, line)`` for every import of a package module in ``path``."""
    tree = ast.parse(open(path).read())
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lcnn_jax"):
                    yield a.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")
                mod = ".".join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
            if not mod.startswith("lcnn_jax"):
                continue
            for a in node.names:  # `from pkg import submodule` depends on the submodule, not on pkg's __init__
                sub = f"{mod}.{a.name}"
                yield (sub, (), node.lineno) if sub in MODULES else (mod, (a.name,), node.lineno)


def _graph() -> dict:
    graph = {}
    for name, path in MODULES.items():
        if name in ALIASES or name == "lcnn_jax":  # the top package imports lazily (module __getattr__)
            continue
        graph[name] = {t for t, _, _ in _imports(name, path) if t in MODULES and t != name and t not in ALIASES}
    return graph


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_cycle(monkeypatch):
    """The oracle can fail: a graph with a planted cycle is reported."""
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: {"a": {"b"}, "b": {"c"}, "c": {"a"}})
    with pytest.raises(AssertionError, match="a -> b -> c -> a"):
        test_no_import_cycles()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_800_lines(name):
    n = sum(1 for _ in open(MODULES[name]))
    assert n <= MAX_LINES, f"{MODULES[name]} has {n} lines; split it (issue 28: none over {MAX_LINES})"


def test_no_module_imports_private_names_of_another():
    bad = []
    for name, path in MODULES.items():
        for target, names, line in _imports(name, path):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != name:
                    bad.append(f"{path}:{line} imports {target}.{n}")
    assert not bad, "\n".join(bad)
