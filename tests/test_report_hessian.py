"""The report's parameter-Hessian trace: its s.e. against a dense float64 oracle, the exactness claim behind the
sign check (a ReLU network's CE Hessian trace is its Gauss-Newton trace), and the warning a noisy estimate gets."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from lcnn_jax import report
from lcnn_jax.estimators import tree_rademacher
from lcnn_jax.nn.models import make_model


def _tiny(act: str):
    model = make_model("mlp", num_classes=3, widths=(5,), act=act)
    rng = np.random.default_rng(0)
    xs, ys = rng.uniform(size=(12, 2, 2, 1)), rng.integers(0, 3, 12)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(0), xs[:1]))
    return model, variables, xs, ys


def _oracle(model, variables, xs, ys, key, n):
    """The dense Hessian of the mean CE in the flat parameters (float64), its Gauss-Newton part, and the
    quadratic forms z_i^T H z_i of the report's probes (Rademacher, drawn from fold_in(k1, i), k1 the first half
    of the report's key)."""
    params = variables["params"]
    flat, unravel = ravel_pytree(params)
    logits = lambda f: model.apply({"params": unravel(f)}, xs)  # noqa: E731
    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, ys).mean()  # noqa: E731
    # each piece as one compiled program (run eagerly, jax.hessian dispatched hundreds of small ops: 7 s)
    hess = np.asarray(jax.jit(jax.hessian(lambda f: ce(logits(f))))(flat))
    jac = np.asarray(jax.jit(jax.jacfwd(logits))(flat)).reshape(-1, flat.size)  # (B * classes, P)
    h_out = np.asarray(jax.jit(jax.hessian(lambda z: ce(z.reshape(len(xs), -1))))(
        np.asarray(jax.jit(logits)(flat)).ravel()))
    ggn = jac.T @ h_out @ jac
    k1 = jax.random.split(key)[0]
    zs = [np.asarray(ravel_pytree(tree_rademacher(jax.random.fold_in(k1, i), params))[0]) for i in range(n)]
    return hess, ggn, np.array([z @ hess @ z for z in zs])


def _cfg(probes: int):
    cfg = report.measure_defaults()
    cfg.hessian_probes, cfg.hessian_lanczos_iters = probes, 3
    return cfg


@pytest.mark.slow  # a long oracle test: CI runs it with -m slow (the default suite stays < 3 min)
def test_trace_se_is_the_standard_error_of_the_probes(x64):
    model, variables, xs, ys = _tiny("softplus")
    key = jax.random.key(3)
    out = report.parameter_hessian(model, variables, xs, ys, _cfg(6), key)
    tr = out["hessian_trace"]
    assert "std" not in tr and "std" not in out["hessian_top_eigenvalue"] and tr["n"] == 6
    _, _, q = _oracle(model, variables, xs, ys, key, 6)
    np.testing.assert_allclose(tr["mean"], q.mean(), rtol=1e-9)
    np.testing.assert_allclose(tr["se"], np.std(q, ddof=1) / np.sqrt(6), rtol=1e-9)
    assert report.trace_se(tr) == tr["se"] and report.trace_se({"mean": 1.0, "std": 0.5, "n": 3}) == 0.5  # old files


def test_relu_trace_is_gauss_newton_and_the_check_says_so(x64):
    relu, smooth = _tiny("relu"), _tiny("softplus")
    hess, ggn, _ = _oracle(*relu, jax.random.key(0), 1)
    assert np.trace(hess) == pytest.approx(np.trace(ggn), rel=1e-9) and np.trace(ggn) >= 0
    hess_s, ggn_s, _ = _oracle(*smooth, jax.random.key(0), 1)
    assert abs(np.trace(hess_s) - np.trace(ggn_s)) > 1e-6 * abs(np.trace(ggn_s))  # not so for softplus
    assert report.linear_in_each_parameter(relu[0], relu[1], relu[2], jax.random.key(1))
    assert not report.linear_in_each_parameter(smooth[0], smooth[1], smooth[2], jax.random.key(1))


def test_a_two_probe_estimate_that_cannot_be_read_gets_a_warning_naming_the_probes(x64):
    model, variables, xs, ys = _tiny("relu")
    for seed in range(200):  # the first key whose 2-probe estimate is negative or has s.e. > |mean| / 2
        q = _oracle(model, variables, xs, ys, jax.random.key(seed), 2)[2]
        if q.mean() < 0 or np.std(q, ddof=1) / np.sqrt(2) > abs(q.mean()) / 2:
            break
    else:
        pytest.fail("no noisy 2-probe estimate among 200 keys")
    ps = report.parameter_hessian(model, variables, xs, ys, _cfg(2), jax.random.key(seed))
    tr = ps["hessian_trace"]
    assert tr["n"] == 2 and tr["mean"] == pytest.approx(q.mean(), rel=1e-9)
    assert tr.get("nonnegative", True)  # set (True: ReLU) where the mean is negative
    text = report.format_report({"test": {"accuracy": {"mean": 1.0, "std": 0.0, "n": 12}}, "parameter_space": ps})
    assert "(parameter space; s.e. of 2 probes)" in text
    warning = [line for line in text.splitlines() if line.startswith("warning: hessian_trace")]
    assert len(warning) == 1 and "--config.measure.hessian_probes=" in warning[0] and "2 probes" in warning[0]
    assert ("negative" in warning[0]) == (q.mean() < 0)


@pytest.mark.parametrize("st, probes", [
    ({"mean": -18.97, "se": 2.09, "n": 2, "nonnegative": True}, 10),  # the ReLU run
    ({"mean": 1.0, "se": 0.8, "n": 10}, 640),  # s.e. to |mean| / 10: 10 * (0.8 / 0.1)^2 probes
    ({"mean": 1.0, "std": 0.8, "n": 10}, 640),  # a measures.json written before the rename
    ({"mean": 5.0, "se": 0.0, "n": 1}, 100),  # one probe: no s.e. at all
])
def test_trace_warning_names_a_probe_count(st, probes):
    w = report.trace_warning(st)
    assert w is not None and f"--config.measure.hessian_probes={probes} " in w, w


@pytest.mark.parametrize("st", [{"mean": 10.0, "se": 1.0, "n": 50},
                                {"mean": -3.0, "se": 0.1, "n": 50, "nonnegative": False},  # a smooth net
                                {"mean": -3.0, "se": 0.1, "n": 50}])  # nothing known about the sign
def test_no_warning_for_a_readable_estimate(st):
    assert report.trace_warning(st) is None
