"""Tests for lcnn_jax.measures.sharpness against dense float64 oracles.

Oracles: the dense parameter Hessian of the mean cross-entropy (``jax.hessian`` on the flattened
parameters), the dense Gauss-Newton matrix ``J^T (diag p - p p^T) J`` from ``jax.jacfwd``, and
``scipy.optimize.minimize`` on the rescaling objectives written out independently here.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax import lax
from jax.flatten_util import ravel_pytree

from lcnn_jax.measures.sharpness import (
    layer_hessian_traces,
    layer_order,
    minimum_sharpness,
    minimum_sharpness_from_traces,
    normalized_layer_sharpness,
    normalized_sharpness,
    rescale_params,
)

# --------------------------------------------------------------------------------------------
# Tiny networks written as plain functions of a Flax-style params dict.


def init_mlp(key, sizes, bias=True):
    params = {}
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k1, k2 = jax.random.split(key, 3)
        layer = {"kernel": jax.random.normal(k1, (m, n)) * (1.5 / np.sqrt(m))}
        if bias:
            layer["bias"] = 0.3 * jax.random.normal(k2, (n,))
        params[f"Dense_{i}"] = layer
    return params


def make_mlp_logits(act=jax.nn.relu):
    def logits_fn(params, x):
        names = [f"Dense_{i}" for i in range(len(params))]
        h = x
        for i, name in enumerate(names):
            h = h @ params[name]["kernel"]
            if "bias" in params[name]:
                h = h + params[name]["bias"]
            if i < len(names) - 1:
                h = act(h)
        return h

    return logits_fn


mlp_logits = make_mlp_logits()


def init_cnn(key):
    k = jax.random.split(key, 6)
    return {
        "Conv_0": {"kernel": 0.6 * jax.random.normal(k[0], (3, 3, 1, 2)), "bias": 0.2 * jax.random.normal(k[1], (2,))},
        "Conv_1": {"kernel": 0.5 * jax.random.normal(k[2], (3, 3, 2, 2)), "bias": 0.2 * jax.random.normal(k[3], (2,))},
        "Dense_0": {"kernel": 0.5 * jax.random.normal(k[4], (18, 3)), "bias": 0.2 * jax.random.normal(k[5], (3,))},
    }


def _conv(x, kernel, bias):
    y = lax.conv_general_dilated(x[None], kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y[0] + bias


def cnn_logits(params, x):  # x: (6, 6, 1)
    h = jax.nn.relu(_conv(x, **params["Conv_0"]))
    h = lax.reduce_window(h, -jnp.inf, lax.max, (2, 2, 1), (2, 2, 1), "VALID")  # max-pool -> (3, 3, 2)
    h = jax.nn.relu(_conv(h, **params["Conv_1"]))
    return h.reshape(-1) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]


# --------------------------------------------------------------------------------------------
# Oracles.


def mean_ce(logits_fn, params, xs, labels):
    logits = jax.vmap(lambda x: logits_fn(params, x))(xs)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def dense_hessian_diag(logits_fn, params, xs, *label_sets):
    """Diagonals of the dense parameter Hessian of the mean CE (one per label set), as params-shaped trees."""
    flat, unravel = ravel_pytree(params)
    hess = jax.jit(jax.hessian(lambda f, labels: mean_ce(logits_fn, unravel(f), xs, labels)))
    out = [unravel(jnp.diag(hess(flat, labels))) for labels in label_sets]
    return out[0] if len(out) == 1 else out


def dense_gauss_newton_diag(logits_fn, params, xs):
    flat, unravel = ravel_pytree(params)

    def one(x):
        f = lambda fl: logits_fn(unravel(fl), x)
        jac = jax.jacfwd(f)(flat)  # (K, P)
        p = jax.nn.softmax(f(flat))
        return jac.T @ (jnp.diag(p) - jnp.outer(p, p)) @ jac

    gn = jnp.mean(jax.jit(jax.vmap(one))(xs), axis=0)
    return unravel(jnp.diag(gn))


def tree_allclose(a, b, rtol, atol=0.0):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b))


def mlp_case(key=0, n=7, sizes=(4, 5, 6, 3), bias=True):
    kp, kx = jax.random.split(jax.random.PRNGKey(key))
    params = init_mlp(kp, sizes, bias=bias)
    xs = jax.random.normal(kx, (n, sizes[0]))
    return params, xs


def cnn_case(key=1, n=7):
    kp, kx = jax.random.split(jax.random.PRNGKey(key))
    return init_cnn(kp), jax.random.uniform(kx, (n, 6, 6, 1))


# --------------------------------------------------------------------------------------------
# Exact per-layer traces.


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_traces_match_dense_hessian(x64, case):
    params, xs = mlp_case() if case == "mlp" else cnn_case()
    logits_fn = mlp_logits if case == "mlp" else cnn_logits
    n = xs.shape[0]
    labels_a = jnp.arange(n) % 3
    labels_b = (jnp.arange(n) * 7 + 1) % 3
    oracle, oracle_b = dense_hessian_diag(logits_fn, params, xs, labels_a, labels_b)
    # Piecewise-linear network: the Hessian of CE does not depend on the labels.
    tree_allclose(oracle, oracle_b, rtol=1e-9, atol=1e-14)

    # chunk_size=3 with n=7: two full chunks and a partial one.
    diag = layer_hessian_traces(logits_fn, params, xs, chunk_size=3, diagonal=True)
    tree_allclose(diag, oracle, rtol=1e-8, atol=1e-13)
    traces = layer_hessian_traces(logits_fn, params, xs, chunk_size=3)
    tree_allclose(traces, jax.tree_util.tree_map(jnp.sum, oracle), rtol=1e-8)
    for leaf in jax.tree_util.tree_leaves(traces):
        assert leaf.shape == ()
    # Output keeps the params' structure and key order.
    assert list(traces) == list(params)


@pytest.mark.slow  # long for the default run; CI runs it
def test_smooth_activation_gives_gauss_newton_diagonal(x64):
    """With tanh the result is the Gauss-Newton diagonal, which differs from the Hessian diagonal."""
    logits_fn = make_mlp_logits(jnp.tanh)
    params, xs = mlp_case(key=3, n=5)
    diag = layer_hessian_traces(logits_fn, params, xs, chunk_size=2, diagonal=True)
    tree_allclose(diag, dense_gauss_newton_diag(logits_fn, params, xs), rtol=1e-8, atol=1e-14)
    hess = dense_hessian_diag(logits_fn, params, xs, jnp.arange(5) % 3)
    gaps = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            for a, b in zip(jax.tree_util.tree_leaves(diag), jax.tree_util.tree_leaves(hess))]
    assert max(gaps) > 1e-3


def test_traces_reject_batched_logits():
    params, xs = mlp_case()
    with pytest.raises(ValueError, match="ONE example"):
        layer_hessian_traces(lambda p, x: mlp_logits(p, x)[None], params, xs)


# --------------------------------------------------------------------------------------------
# Layer order and rescaling.


def test_layer_order_insertion_and_numeric_suffix():
    leaf = {"kernel": jnp.ones((1, 1))}
    p = {"Conv_0": leaf, "Dense_0": leaf, "Conv_1": leaf, "Dense_1": leaf}
    assert layer_order(p) == ("Conv_0", "Dense_0", "Conv_1", "Dense_1")
    # After jax.tree_util.tree_map keys are sorted as strings: Dense_10 would precede Dense_2.
    p = jax.tree_util.tree_map(lambda a: a, {f"Dense_{i}": leaf for i in range(12)})
    assert layer_order(p) == tuple(f"Dense_{i}" for i in range(12))
    nested = {"Block_0": {"Dense_0": leaf, "Dense_1": leaf}, "Dense_0": leaf}
    assert layer_order(nested) == ("Block_0/Dense_0", "Block_0/Dense_1", "Dense_0")


def test_rescale_preserves_function_and_scales_traces(x64):
    params, xs = mlp_case(n=6)
    alpha = np.array([2.5, -0.5, -2.0])
    new = rescale_params(params, alpha)
    assert list(new) == list(params)
    np.testing.assert_allclose(jax.vmap(lambda x: mlp_logits(new, x))(xs),
                               jax.vmap(lambda x: mlp_logits(params, x))(xs), rtol=1e-10, atol=1e-12)
    t0 = layer_hessian_traces(mlp_logits, params, xs)
    t1 = layer_hessian_traces(mlp_logits, new, xs)
    c = np.cumsum(alpha)
    for l, name in enumerate(layer_order(params)):
        np.testing.assert_allclose(t1[name]["kernel"], t0[name]["kernel"] * np.exp(-2 * alpha[l]), rtol=1e-8)
        np.testing.assert_allclose(t1[name]["bias"], t0[name]["bias"] * np.exp(-2 * c[l]), rtol=1e-8)


def test_rescale_params_checks():
    params, _ = mlp_case()
    with pytest.raises(ValueError, match="sum"):
        rescale_params(params, np.array([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="3 layers"):
        rescale_params(params, np.array([1.0, -1.0]))


# --------------------------------------------------------------------------------------------
# Minimum sharpness.


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_minimum_sharpness_scale_invariant(x64, case):
    if case == "mlp":
        params, xs = mlp_case(n=6)
        logits_fn, alpha = mlp_logits, np.array([-3.0, 1.0, 2.0])
    else:
        params, xs = cnn_case(n=5)
        logits_fn, alpha = cnn_logits, np.array([-2.5, 1.0, 1.5])
    new = rescale_params(params, alpha)
    total = lambda p: sum(float(v) for v in jax.tree_util.tree_leaves(layer_hessian_traces(logits_fn, p, xs)))
    ratio = total(new) / total(params)
    assert ratio > 10 or ratio < 0.1, ratio
    for include_bias in (False, True):
        a = minimum_sharpness(logits_fn, params, xs, include_bias=include_bias)
        b = minimum_sharpness(logits_fn, new, xs, include_bias=include_bias)
        assert a.converged and b.converged
        assert rel(a.value, b.value) < 1e-5, (include_bias, a.value, b.value)
        # The minimiser moves by exactly the applied rescaling (unique minimiser, all traces > 0).
        np.testing.assert_allclose(b.log_scales + alpha, a.log_scales, atol=1e-5)
        # Applying the optimal log-scales realises the minimum.
        opt = layer_hessian_traces(logits_fn, rescale_params(params, a.log_scales), xs)
        realised = sum(float(opt[n]["kernel"]) + include_bias * float(opt[n]["bias"]) for n in a.layers)
        assert rel(realised, a.value) < 1e-6
        # The minimum is at most the unrescaled value.
        assert a.value <= sum(float(v) for v in a.weight_traces) + include_bias * sum(a.bias_traces) + 1e-12


def _no_bias_oracle(tw):
    """min sum T_l e^{-2 alpha_l} s.t. sum alpha = 0, by BFGS on alpha_1..alpha_{L-1}."""
    tw = np.asarray(tw, np.float64)
    scale = tw.sum()

    def obj(free):
        alpha = np.append(free, -free.sum())
        return float(np.sum(tw * np.exp(-2 * alpha))) / scale

    res = scipy.optimize.minimize(obj, np.zeros(len(tw) - 1), method="BFGS", options={"gtol": 1e-12})
    return res.fun * scale


def _bias_oracle(tw, tb, start):
    tw, tb = np.asarray(tw, np.float64), np.asarray(tb, np.float64)
    scale = tw.sum() + tb.sum()

    def obj(free):
        alpha = np.append(free, -free.sum())
        return float(np.sum(tw * np.exp(-2 * alpha)) + np.sum(tb * np.exp(-2 * np.cumsum(alpha)))) / scale

    res = scipy.optimize.minimize(obj, start, method="BFGS", options={"gtol": 1e-12})
    return res.fun * scale


def _trace_tree(tw, tb=None):
    out = {}
    for l, t in enumerate(tw):
        out[f"Dense_{l}"] = {"kernel": t} if tb is None else {"kernel": t, "bias": tb[l]}
    return out


def test_closed_form_matches_numerical_minimum():
    rng = np.random.default_rng(0)
    for L in (2, 3, 5):
        tw = np.exp(3 * rng.normal(size=L))
        res = minimum_sharpness_from_traces(_trace_tree(tw), include_bias=False)
        assert res.value == pytest.approx(L * np.exp(np.mean(np.log(tw))), rel=1e-12)
        assert rel(res.value, _no_bias_oracle(tw)) < 1e-8
        # At the closed-form scales every layer carries the same share MS / L.
        np.testing.assert_allclose(tw * np.exp(-2 * res.log_scales), res.value / L, rtol=1e-10)
        assert abs(res.log_scales.sum()) < 1e-12
        # The Newton path with all-zero bias traces agrees with the closed form.
        newton = minimum_sharpness_from_traces(_trace_tree(tw, np.zeros(L)), include_bias=True)
        assert newton.converged and rel(newton.value, res.value) < 1e-10


def test_bias_minimum_independent_of_start_and_matches_scipy():
    rng = np.random.default_rng(1)
    L = 4
    tw = np.exp(2 * rng.normal(size=L))
    tb = np.exp(2 * rng.normal(size=L))
    traces = _trace_tree(tw, tb)
    results = []
    for scale in (0.0, 2.0, 6.0):
        init = scale * rng.normal(size=L)
        init -= init.mean()
        res = minimum_sharpness_from_traces(traces, include_bias=True, init_log_scales=init)
        assert res.converged and res.rel_grad_norm <= 1e-10
        results.append(res)
    for r in results[1:]:
        assert rel(r.value, results[0].value) < 1e-12
        np.testing.assert_allclose(r.log_scales, results[0].log_scales, atol=1e-8)
    assert rel(results[0].value, _bias_oracle(tw, tb, np.zeros(L - 1))) < 1e-8
    # Adding bias traces can only increase the minimum relative to the weights-only one.
    assert results[0].value > minimum_sharpness_from_traces(traces, include_bias=False).value
    with pytest.raises(ValueError, match="sum"):
        minimum_sharpness_from_traces(traces, include_bias=True, init_log_scales=np.ones(L))


def test_dead_layer_no_nan():
    # No biases: a zero-trace layer makes the infimum 0 (not attained).
    with pytest.warns(UserWarning, match="zero"):
        res = minimum_sharpness_from_traces(_trace_tree([1.0, 0.0, 2.0]), include_bias=False)
    assert res.value == 0.0 and np.all(np.isfinite(res.log_scales))
    # With biases the infimum is finite: layer 1's terms vanish as c_1 -> inf, leaving
    # min_c2 (2 e^{2 c2} + 0.3 e^{-2 c2}) + 0.1 = 2 sqrt(0.6) + 0.1.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = minimum_sharpness_from_traces(_trace_tree([1.0, 0.0, 2.0], [0.5, 0.3, 0.1]), include_bias=True)
    assert np.isfinite(res.value) and np.all(np.isfinite(res.log_scales))
    assert res.converged
    assert res.value == pytest.approx(2 * np.sqrt(0.6) + 0.1, rel=1e-8)
    # All traces zero (a completely dead network): value 0, no NaN.
    res = minimum_sharpness_from_traces(_trace_tree([0.0, 0.0], [0.0, 0.0]), include_bias=True)
    assert res.value == 0.0 and res.converged and np.all(np.isfinite(res.log_scales))


# --------------------------------------------------------------------------------------------
# Normalized sharpness.


def _ns_oracle(h, w, start):
    h, w2 = np.asarray(h, np.float64), np.asarray(w, np.float64) ** 2
    n_out, n_in = h.shape

    def obj(z):
        y, x = z[:n_out], z[n_out:]
        e = np.exp(y[:, None] + x[None, :])
        return float(np.sum(h * e + w2 / e))

    res = scipy.optimize.minimize(obj, start, method="BFGS", options={"gtol": 1e-10})
    return res.fun


def test_normalized_layer_sharpness_closed_cases_and_scipy():
    # 1 x 1: min_s h s + w^2 / s = 2 |w| sqrt(h).
    res = normalized_layer_sharpness(np.array([[3.0]]), np.array([[-2.0]]))
    assert res.value == pytest.approx(4 * np.sqrt(3.0), rel=1e-12)
    rng = np.random.default_rng(2)
    h = rng.random((4, 6)) * np.exp(rng.normal(size=(4, 1)))
    w = rng.normal(size=(4, 6))
    values = []
    for scale in (0.0, 1.0, 4.0):
        r = normalized_layer_sharpness(h, w, init_log_s1=scale * rng.normal(size=4))  # kernel (in=4, out=6)
        assert r.converged
        values.append(r.value)
    np.testing.assert_allclose(values, values[0], rtol=1e-10)
    assert rel(values[0], _ns_oracle(h, w, np.zeros(10))) < 1e-7
    assert rel(values[0], _ns_oracle(h, w, rng.normal(size=10))) < 1e-7
    # A zero row of the (in, out) kernel's H: that input's terms vanish as s1_j -> inf; the rest is 3 x 6.
    h0 = h.copy()
    h0[1] = 0.0
    r0 = normalized_layer_sharpness(h0, w)
    rsub = normalized_layer_sharpness(np.delete(h, 1, 0), np.delete(w, 1, 0))
    assert np.isfinite(r0.value) and rel(r0.value, rsub.value) < 1e-10


def test_normalized_sharpness_invariances(x64):
    params, xs = mlp_case(n=6)
    base = normalized_sharpness(mlp_logits, params, xs)
    assert base.converged and set(base.per_layer) == set(params)
    assert base.value == pytest.approx(sum(base.per_layer.values()), rel=1e-12)
    # Layer-wise rescaling.
    layer = normalized_sharpness(mlp_logits, rescale_params(params, np.array([3.0, -1.0, -2.0])), xs)
    assert rel(layer.value, base.value) < 1e-6
    # Neuron-wise rescaling of hidden unit 2 of Dense_0 (ReLU is positively homogeneous).
    g = 20.0
    neuron = jax.tree_util.tree_map(lambda a: a, params)
    neuron["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[:, 2].multiply(g)
    neuron["Dense_0"]["bias"] = params["Dense_0"]["bias"].at[2].multiply(g)
    neuron["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[2, :].multiply(1 / g)
    np.testing.assert_allclose(jax.vmap(lambda x: mlp_logits(neuron, x))(xs),
                               jax.vmap(lambda x: mlp_logits(params, x))(xs), rtol=1e-10, atol=1e-12)
    other = normalized_sharpness(mlp_logits, neuron, xs, layers=layer_order(params))
    assert rel(other.value, base.value) < 1e-6


def test_normalized_sharpness_conv_channel_invariance(x64):
    params, xs = cnn_case(n=5)
    base = normalized_sharpness(cnn_logits, params, xs)
    g = 8.0
    p = jax.tree_util.tree_map(lambda a: a, params)
    p["Conv_0"]["kernel"] = params["Conv_0"]["kernel"].at[..., 1].multiply(g)
    p["Conv_0"]["bias"] = params["Conv_0"]["bias"].at[1].multiply(g)
    p["Conv_1"]["kernel"] = params["Conv_1"]["kernel"].at[:, :, 1, :].multiply(1 / g)
    np.testing.assert_allclose(jax.vmap(lambda x: cnn_logits(p, x))(xs),
                               jax.vmap(lambda x: cnn_logits(params, x))(xs), rtol=1e-10, atol=1e-12)
    other = normalized_sharpness(cnn_logits, p, xs, layers=layer_order(params))
    assert base.converged and other.converged
    assert rel(other.value, base.value) < 1e-6
