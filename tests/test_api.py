"""The public names: ``import lcnn_jax as lj`` reaches every module, and every entry of the API overview table
(docs/api/index.md, the README's until the docs moved to docs/) resolves to what it says.

The API table's convention (stated on that page): a row whose first column starts with ``**module**`` opens the
section of the module named in backticks (``lcnn_jax.x``); in every other row each backticked span of the FIRST
column is a public name of that module: ``name`` (a function, class, or an UPPER_CASE constant),
``name(args)`` (a callable accepting those arguments), or ``prefix_*`` (at least one such name). In ``args``:
``x`` is a positional argument named ``x``; ``x=`` a keyword argument; ``x=<literal>`` a keyword argument whose
default is that literal; ``**kw`` keyword arguments beyond those; ``...`` anything.
"""
import ast
import importlib
import inspect
import os
import re
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLIC_MODULES = ("types", "autodiff", "estimators", "measures", "regularizers", "nn", "attacks", "data",
                  "batching", "training", "sweep", "report", "compare", "configs")


def test_import_lcnn_jax_gives_every_public_module():
    import lcnn_jax as lj

    for name in PUBLIC_MODULES:
        mod = getattr(lj, name)
        assert isinstance(mod, types.ModuleType) and mod.__name__ == f"lcnn_jax.{name}"
        assert name in dir(lj)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        lj.nonexistent  # noqa: B018


def test_regularizer_names_are_the_functions_and_old_module_paths_still_work():
    from lcnn_jax.regularizers import clip, derivative

    for fn in (clip, derivative):
        assert inspect.isfunction(fn), f"{fn!r} is not the regularizer function"
    assert clip(0.1, num_pairs=4).name == "clip"
    # the submodules stay importable by their dotted paths (scripts and the registry use them)
    from lcnn_jax.regularizers.clip import draw_pairs  # noqa: F401
    from lcnn_jax.regularizers.derivative import unit_directions  # noqa: F401

    assert importlib.import_module("lcnn_jax.regularizers.clip").clip is clip
    from lcnn_jax.regularizers import make_regularizer

    assert make_regularizer("clip", coeff=0.1, num_pairs=4).name == "clip"


# ------------------------------------------------------------------------------------- the docs' API table

API_PAGE = os.path.join("docs", "api", "index.md")


def _api_rows():
    """The first column of every row of the API overview's table (the page's first table)."""
    text = open(os.path.join(ROOT, API_PAGE), encoding="utf-8").read()
    match = re.search(r"^# API overview\n.*?^(\| name \| what it is \|\n(?:\|.*\n)+)", text, flags=re.S | re.M)
    assert match, f"{API_PAGE} has no '# API overview' heading followed by a '| name | what it is |' table"
    rows = []
    for line in match.group(1).splitlines():
        if not line.startswith("|") or re.fullmatch(r"\|[\s|:-]*\|", line.strip()) or line.startswith("| name "):
            continue
        rows.append(line.strip().strip("|").split("|")[0].strip())
    return rows


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def api_entries():
    """``(module, entry)`` for every name in the first column of the API overview's table."""
    module, out = None, []
    for first in _api_rows():
        spans = re.findall(r"`([^`]+)`", first)
        if first.startswith("**"):
            mods = [s for s in spans if s.startswith("lcnn_jax")]
            assert mods, f"section row {first!r} names no `lcnn_jax.<module>`"
            module = mods[0]
            continue
        assert module is not None, f"API row {first!r} comes before any **module** section row"
        out += [(module, s) for s in spans]
    return out


ENTRIES = api_entries()


def test_readme_api_table_is_parsed():
    modules = {m for m, _ in ENTRIES}
    assert {"lcnn_jax.measures", "lcnn_jax.regularizers", "lcnn_jax.nn", "lcnn_jax.estimators",
            "lcnn_jax.autodiff", "lcnn_jax.attacks"} <= modules
    assert len(ENTRIES) > 50


def _check_signature(obj, name: str, args: str):
    sig = inspect.signature(obj)
    params = sig.parameters
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    pos_index, bound_args, bound_kwargs = 0, [], {}
    for arg in _split_top_level(args):
        if arg in ("...", ""):
            return
        if arg.startswith("**"):
            assert has_var_kw, f"{name}: the API table lists {arg} but {name}{sig} takes no **kwargs"
            continue
        key, eq, value = arg.partition("=")
        key = key.strip()
        assert key.isidentifier(), f"{name}: cannot read the API table argument {arg!r}"
        if not eq:
            assert pos_index < len(positional), f"{name}: the API table lists positional {key!r}; {name}{sig} has fewer"
            assert positional[pos_index].name == key, (
                f"{name}: the API table's positional argument {pos_index} is {key!r}; the code calls it "
                f"{positional[pos_index].name!r} ({name}{sig})")
            bound_args.append(object())
            pos_index += 1
            continue
        assert key in params or has_var_kw, f"{name}: the API table lists {key}= but {name}{sig} has no such argument"
        bound_kwargs[key] = object()
        if key in params and value.strip():
            try:
                literal = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                continue  # an illustration ("linf"/"l2"), not a default
            default = params[key].default
            assert default is not inspect.Parameter.empty and default == literal, (
                f"{name}: the API table gives {key}={value.strip()} but the default is "
                f"{'none' if default is inspect.Parameter.empty else repr(default)}")
    # The listed arguments, and nothing else, must be enough to call it (other parameters have defaults).
    sig.bind(*bound_args, **bound_kwargs)


@pytest.mark.parametrize("module,entry", ENTRIES, ids=[f"{m.split('.')[-1]}:{e}" for m, e in ENTRIES])
def test_readme_api_entry_resolves(module, entry):
    import lcnn_jax as lj

    mod = getattr(lj, module.split(".", 1)[1]) if module != "lcnn_jax" else lj
    head = re.match(r"[A-Za-z_][\w.]*\*?", entry)
    assert head, f"cannot read API table entry `{entry}` in the {module} section"
    name, rest = head.group(0), entry[head.end():]
    if name.endswith("*"):
        matches = [n for n in dir(mod) if n.startswith(name[:-1])]
        assert matches, f"no name of {module} matches `{name}`"
        return
    obj = mod
    for part in name.split("."):
        assert hasattr(obj, part), f"`{name}` is listed in the API table's {module} section but {module} lacks it"
        obj = getattr(obj, part)
    if name.isupper():  # a constant (a registry dict, a tuple of names)
        assert not rest, f"`{entry}`: a constant takes no arguments"
        return
    assert callable(obj) and not isinstance(obj, types.ModuleType), f"{module}.{name} is not callable: {obj!r}"
    if rest:
        assert rest.startswith("(") and rest.endswith(")"), f"cannot read the arguments of `{entry}`"
        _check_signature(obj, name, rest[1:-1])


def test_progress_bars_use_tqdm_auto():
    """``tqdm.auto`` renders a widget in Jupyter and text in a terminal; plain ``tqdm`` prints raw text (or an
    "IProgress not found" warning) in notebooks."""
    offenders = []
    for folder in ("lcnn_jax", "experiments"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    for i, line in enumerate(open(path, encoding="utf-8"), 1):
                        if re.match(r"\s*(from tqdm import|import tqdm\b(?!\.auto))", line):
                            offenders.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not offenders, "use `from tqdm.auto import tqdm`:\n" + "\n".join(offenders)
