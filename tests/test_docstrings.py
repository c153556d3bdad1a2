"""Every ``Example::`` block of the library's docstrings is executed, so none can rot.

The blocks are found by parsing every module of ``lcnn_jax`` (module, class and function docstrings): a line
ending in ``Example::`` (or ``Examples::``) followed by an indented literal block. Each block runs like a doctest:
in a copy of its module's namespace (so a regularizer's example may call ``clip(...)`` unqualified), from the
repository root. Fragments that show one step of a training loop use the names a training step has at hand
(``key``, ``params``, ``batch``, ``apply_fn``, ...); :func:`_training_context` supplies them from a tiny model.

Two lists below name the exceptions, each with its reason:
* ``SLOW``: correct but too expensive for the default suite (< 15 s of CPU for all examples); run with ``-m slow``.
* ``NOT_EXECUTED``: they train networks for minutes; they are still compiled, their imports executed, and every
  call of a library function checked against its signature (names and arguments), which catches renames.
A ``>>>`` doctest, should one appear, is run by ``doctest`` as well.
"""
import ast
import doctest
import functools
import importlib
import inspect
import os
import pkgutil
import re
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcnn_jax

# Out of the default run (it must stay under 3 minutes on 2 cores): every docstring example compiles its own
# programs. CI runs it with -m slow.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SLOW = {
    "lcnn_jax.nn.models": "initialises and applies a ResNet-18 on CIFAR-sized inputs (~10 s of compilation on CPU)",
    "lcnn_jax.nn.layers": "compiles a small CNN with batch norm in training mode (~7 s of CPU)",
    "lcnn_jax.nn.lcnn": "compiles an LCNN small CNN with spectral power iterations (~13 s of CPU)",
    "lcnn_jax.measures.bounds": "bounds an LCNN small CNN: model trace, SVDs and power iterations (~13 s of CPU)",
    "lcnn_jax.regularizers.clip": "CLIP's init and loss with 500 pairs run op by op outside jit (~7 s of CPU)",
    "lcnn_jax.report": "needs a trained run at runs/quickstart and compiles the full measurement suite",
}
NOT_EXECUTED = {
    "lcnn_jax.train": "trains the quickstart config (8 epochs, ~3 minutes on 2 CPU cores)",
    "lcnn_jax.train.single": "trains the quickstart config (8 epochs, ~3 minutes on 2 CPU cores)",
    "lcnn_jax.train.sweep": "trains 9 networks (3 seeds x 3 coefficients)",
    "lcnn_jax.compare": "trains and measures two methods of the compare config",
    "lcnn_jax.runs": "lists and loads the members of a trained sweep at runs/sweep (tests/test_cli_runs.py trains "
                     "and measures one)",
}


def _modules():
    out = [lcnn_jax.__name__]
    for info in pkgutil.walk_packages(lcnn_jax.__path__, prefix="lcnn_jax."):
        if info.name.endswith("__main__"):
            continue
        out.append(info.name)
    return sorted(out)


_EXAMPLE = re.compile(r"^(?P<indent>\s*)(?:.*\s)?Examples?::\s*$")


def _blocks(doc: str):
    """The literal blocks that follow an ``Example::`` line of a (cleaned) docstring."""
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        m = _EXAMPLE.match(lines[i])
        if not m:
            i += 1
            continue
        base = len(m.group("indent"))
        j, body = i + 1, []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base):
            body.append(lines[j])
            j += 1
        code = textwrap.dedent("\n".join(body)).strip("\n")
        if code:
            yield code
        i = j


def collect_examples():
    """``(id, module_name, qualname, code)`` of every example block in the package."""
    found = []
    for name in _modules():
        spec = importlib.util.find_spec(name)
        tree = ast.parse(open(spec.origin, encoding="utf-8").read())
        nodes = [("", tree)]
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                nodes.append((node.name, node))
        for qual, node in nodes:
            doc = ast.get_docstring(node, clean=True)
            for k, code in enumerate(_blocks(doc or "")):
                found.append((f"{name}{':' + qual if qual else ''}#{k}", name, qual, code))
    return found


EXAMPLES = collect_examples()


def test_examples_are_found_and_the_exception_lists_are_current():
    modules = {m for _, m, _, _ in EXAMPLES}
    assert {"lcnn_jax.estimators", "lcnn_jax.autodiff", "lcnn_jax.measures.hessian", "lcnn_jax.report"} <= modules
    for name in (*SLOW, *NOT_EXECUTED):
        assert name in modules, f"{name} is listed as an exception but has no example any more; drop it"


@functools.lru_cache(maxsize=None)
def _training_context() -> dict:
    """The names a training step has at hand, for the regularizers' fragments: a 784-8-10 MLP with LCNN's
    centred softplus (so it has a ``log_beta``), written as plain functions (no Flax: cheaper to compile), on 8
    random 28x28 images; built once."""
    import optax

    from lcnn_jax.nn.lcnn import beta_from_log, centered_softplus
    from lcnn_jax.regularizers import weight_l2

    rng = np.random.default_rng(0)  # NumPy draws: each eager jax.random call would compile a program
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    params = {"Dense_0": {"kernel": f32(0.05 * rng.standard_normal((784, 8))), "bias": f32(np.zeros(8))},
              "CenteredSoftplus_0": {"log_beta": f32(np.log(5.0))},
              "Dense_1": {"kernel": f32(0.3 * rng.standard_normal((8, 10))), "bias": f32(np.zeros(10))}}

    @jax.jit
    def apply_fn(p, xs):
        h = xs.reshape(xs.shape[0], -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        h = centered_softplus(h, beta_from_log(p["CenteredSoftplus_0"]["log_beta"]))
        return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

    key = jax.random.key(0)
    images = f32(rng.uniform(size=(8, 28, 28, 1)))
    batch = {"image": images, "label": jnp.asarray(np.arange(8) % 10, jnp.int32)}
    regularizers = (weight_l2(1e-3, target=0.9, dlam=1e-4),)
    return {
        "jax": jax, "jnp": jnp, "np": np, "key": key, "params": params, "batch": batch, "apply_fn": apply_fn,
        "step": 3, "epoch": 6, "num_epochs": 2, "train_accuracy": jnp.float32(0.93), "epoch_accuracy": 0.93,
        "cross_entropy": optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, images), batch["label"]).mean(),
        "held_out": types.SimpleNamespace(images=rng.uniform(size=(32, 28, 28, 1)).astype(np.float32)),
        "regularizers": regularizers,
        "reg_states": tuple(r.init(key, params, batch) for r in regularizers),
    }


def _namespace(module_name: str) -> dict:
    module = importlib.import_module(module_name)
    ns = dict(vars(module))
    ns["__name__"] = f"{module_name}.__example__"
    if module_name.startswith("lcnn_jax.regularizers."):
        ns.update(_training_context())
    return ns


def _run(example_id, module_name, code, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(compile(code, f"<example {example_id}>", "exec"), _namespace(module_name))  # noqa: S102


def _params(names):
    return [pytest.param(e, m, c, id=e) for e, m, _, c in EXAMPLES if m in names]


FAST = [pytest.param(e, m, c, id=e) for e, m, _, c in EXAMPLES if m not in SLOW and m not in NOT_EXECUTED]


@pytest.mark.parametrize("example_id,module_name,code", FAST)
def test_example_runs(example_id, module_name, code, monkeypatch):
    _run(example_id, module_name, code, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("example_id,module_name,code", _params(SLOW))
def test_slow_example_runs(example_id, module_name, code, monkeypatch, tmp_path):
    if module_name == "lcnn_jax.report":  # the example measures a finished run at runs/quickstart: train a tiny one
        from lcnn_jax import train as training
        from lcnn_jax.configs import default_config

        c = default_config()
        c.model.name, c.model.kwargs = "mlp", {"widths": (16,), "act": "softplus"}
        c.data.train_size, c.train.batch_size, c.train.num_steps, c.train.progress = 200, 50, 5, False
        training.fit(c, str(tmp_path / "runs" / "quickstart"))
        monkeypatch.chdir(tmp_path)
        exec(compile(code, f"<example {example_id}>", "exec"), _namespace(module_name))  # noqa: S102
        return
    _run(example_id, module_name, code, monkeypatch)


def _static_check(code: str, ns: dict):
    """Execute the imports of ``code``, then check every call of a resolvable library callable binds."""
    tree = ast.parse(code)
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([node], []), "<imports>", "exec"), ns)  # noqa: S102
    checked = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(isinstance(a, ast.Starred) for a in node.args) or any(
                k.arg is None for k in node.keywords):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in ns:
            target = ns[func.id]
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and isinstance(
                ns.get(func.value.id), types.ModuleType):
            mod = ns[func.value.id]
            assert hasattr(mod, func.attr), f"{mod.__name__}.{func.attr} does not exist"
            target = getattr(mod, func.attr)
        else:
            continue
        if not (inspect.isfunction(target) and target.__module__.startswith("lcnn_jax")):
            continue
        try:
            inspect.signature(target).bind(*node.args, **{k.arg: k.value for k in node.keywords})
        except TypeError as e:
            raise AssertionError(f"line {node.lineno}: {ast.unparse(node)} does not fit "
                                 f"{target.__name__}{inspect.signature(target)}: {e}") from None
        checked += 1
    return checked


@pytest.mark.parametrize("example_id,module_name,code", _params(NOT_EXECUTED))
def test_not_executed_example_still_fits_the_api(example_id, module_name, code, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert _static_check(code, _namespace(module_name)) >= 1, "no library call could be checked"


def test_static_check_catches_a_wrong_call():
    with pytest.raises(AssertionError, match="does not fit"):
        _static_check("from lcnn_jax import training\ntraining.fit(config=None, work_dir='/tmp/x')", {})
    with pytest.raises(AssertionError, match="does not exist"):
        _static_check("from lcnn_jax import sweep\nsweep.fit_many(None)", {})


@pytest.mark.parametrize("module_name", _modules())
def test_doctests(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name):
        runner.run(test)
    assert runner.failures == 0
