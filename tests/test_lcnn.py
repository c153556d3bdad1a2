"""Tests for LCNN: lcnn_jax.nn.lcnn, lcnn_jax.regularizers.lcnn, configs (the curvature bound: test_bounds.py).

Oracles: closed forms of the centred softplus and its derivatives (NumPy float64); dense Jacobians
(``jax.jacfwd``) and their SVD for batch norm and the spectrally normalised layers; the transposed
convolution from ``jax.vjp`` (independent of the layer's ``jax.linear_transpose``); the reference code's
penalty formulas written out literally (gradient of the batch-mean loss, its sign direction).
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.linen.linear import canonicalize_padding

from _lcnn_helpers import F64, KEY, random_variables, to64, xla_optimizations
from lcnn_jax.measures import bounds as cb
from lcnn_jax.nn import layers, lcnn, models
from lcnn_jax.regularizers import lcnn as lcnn_regs

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs")


@pytest.fixture(autouse=True)
def quick_compile():
    with xla_optimizations(False):
        yield


_to64 = to64


def _closed_forms(x, b):
    z = b * x
    s = (np.logaddexp(z, 0.0) - np.log(2.0)) / b
    d1 = 1.0 / (1.0 + np.exp(-z))
    d2 = b * d1 * (1.0 - d1)
    return s, d1, d2


# ------------------------------------------------------------------------------------------------
# Centred softplus
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [0.3, 5.0, 37.0])
def test_centered_softplus_value_and_derivatives(x64, b):
    x = np.linspace(-4.0, 4.0, 161)
    s, d1, d2 = _closed_forms(x, b)
    f = lambda t: lcnn.centered_softplus(t, jnp.asarray(b, F64))  # noqa: E731
    got = f(jnp.asarray(x, F64))
    g1 = jax.vmap(jax.grad(f))(jnp.asarray(x, F64))
    g2 = jax.vmap(jax.grad(jax.grad(f)))(jnp.asarray(x, F64))
    np.testing.assert_allclose(got, s, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g1, d1, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g2, d2, rtol=1e-10, atol=1e-14)
    assert float(f(jnp.zeros((), F64))) == 0.0
    interior = np.abs(b * x) < 30  # beyond, sigmoid(b x) rounds to 0 or 1 in float64
    assert np.all((g1[interior] > 0) & (g1[interior] < 1)) and np.all((g1 >= 0) & (g1 <= 1))
    assert np.all(np.abs(g2) <= b / 4 * (1 + 1e-12))
    np.testing.assert_allclose(float(jax.grad(jax.grad(f))(jnp.zeros((), F64))), b / 4, rtol=1e-12)  # max at 0


def test_centered_softplus_module_parameter_and_init(x64):
    act = lcnn.CenteredSoftplus()
    variables = act.init(KEY, jnp.zeros((2, 3)))
    assert set(variables) == {"params"} and set(variables["params"]) == {"log_beta"}
    log_beta = variables["params"]["log_beta"]
    assert log_beta.shape == () and log_beta.dtype == jnp.float32
    np.testing.assert_allclose(float(log_beta), math.log(5.0 - 1e-3), rtol=1e-6)
    np.testing.assert_allclose(float(lcnn.beta_from_log(log_beta)), 5.0, rtol=1e-6)
    x = np.linspace(-3, 3, 13)
    out = act.apply(_to64(variables), jnp.asarray(x, F64))
    np.testing.assert_allclose(out, _closed_forms(x, float(lcnn.beta_from_log(jnp.asarray(log_beta, F64))))[0],
                               rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="init_beta"):
        lcnn.CenteredSoftplus(init_beta=1e-4).init(KEY, jnp.zeros(2))


def test_centered_softplus_float32_stable_at_1e4():
    act = lcnn.CenteredSoftplus()
    variables = act.init(KEY, jnp.zeros(()))
    x = jnp.array([-1e4, -1e3, -30.0, 0.0, 30.0, 1e3, 1e4], jnp.float32)
    y = act.apply(variables, x)
    gx = jax.vmap(jax.grad(lambda t: act.apply(variables, t)))(x)
    gxx = jax.vmap(jax.grad(jax.grad(lambda t: act.apply(variables, t))))(x)
    gb = jax.vmap(jax.grad(lambda v, t: act.apply(v, t)), in_axes=(None, 0))(variables, x)["params"]["log_beta"]
    for arr in (y, gx, gxx, gb):
        assert bool(jnp.all(jnp.isfinite(arr))), arr
    b = 5.0
    np.testing.assert_allclose(np.asarray(y), [-math.log(2) / b] * 3 + [0.0] + [v - math.log(2) / b for v in
                                                                                  (30.0, 1e3, 1e4)], rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(gx), [0, 0, 0, 0.5, 1, 1, 1], atol=1e-6)
    # d s / d log_beta = b * ds/db = x sigmoid(bx) - s(x) -> +-ln2/b in both tails
    np.testing.assert_allclose(np.asarray(gb)[[0, 1, 5, 6]], [math.log(2) / b] * 4, rtol=5e-2)


def test_centered_softplus_small_beta_is_half_identity(x64):
    x = jnp.linspace(-3.0, 3.0, 61, dtype=F64)
    log_beta = jnp.asarray(-40.0, F64)  # b = 1e-3 + e^-40
    b = float(lcnn.beta_from_log(log_beta))
    y = lcnn.centered_softplus(x, lcnn.beta_from_log(log_beta))
    # log((1 + e^z) / 2) = z/2 + z^2/8 - z^4/192 + ...  =>  0 <= s(x) - x/2 <= b x^2 / 8
    err = np.asarray(y - x / 2)
    assert np.all(err >= -1e-15) and np.all(err <= b * np.asarray(x) ** 2 / 8 + 1e-15)
    assert np.max(np.abs(err)) < 2e-3


# ------------------------------------------------------------------------------------------------
# Lipschitz batch norm
# ------------------------------------------------------------------------------------------------
def _lipschitz_of(f, x):
    """Largest singular value of the dense Jacobian of f at x (float64)."""
    jac = jax.jacfwd(f)(x).reshape(int(np.prod(f(x).shape)), x.size)
    return float(np.linalg.svd(np.asarray(jac), compute_uv=False)[0])


@pytest.mark.parametrize("var,gamma,branch", [([0.04, 0.5, 2.0], 10.0, "1/s"), ([1e-4, 1.0, 3.0], 10.0, "gamma"),
                                              ([0.3, 0.09, 1.5], 2.0, "gamma")])
def test_lipschitz_bn_eval_lipschitz_constant(x64, var, gamma, branch):
    bn = lcnn.LipschitzBatchNorm()
    variables = bn.init(KEY, jnp.zeros((1, 2, 2, 3)))
    assert set(variables["params"]) == {"log_gamma"} and set(variables["batch_stats"]) == {"mean", "var"}
    np.testing.assert_allclose(float(jnp.exp(variables["params"]["log_gamma"])), 10.0, rtol=1e-6)
    variables = _to64(variables)
    variables["batch_stats"] = {"mean": jnp.asarray([0.3, -1.0, 2.0], F64), "var": jnp.asarray(var, F64)}
    variables["params"] = {"log_gamma": jnp.asarray(math.log(gamma), F64)}
    s = math.sqrt(min(var) + 1e-5)
    want = min(1.0 / s, gamma)
    assert (want == 1.0 / s) == (branch == "1/s")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 3)), F64)
    f = lambda t: bn.apply(variables, t[None], train=False)[0]  # noqa: E731
    lip = _lipschitz_of(f, x)
    np.testing.assert_allclose(lip, want, rtol=1e-10)
    assert lip <= gamma * (1 + 1e-12)
    expected = (np.asarray(x) - [0.3, -1.0, 2.0]) / np.sqrt(np.asarray(var) + 1e-5) * s * want
    np.testing.assert_allclose(f(x), expected, rtol=1e-12)
    bound, _ = cb.layer_bound(bn, variables, (2, 2, 3), key=KEY)
    assert want <= float(bound.lipschitz) <= want * (1 + 1e-12)  # certified, float64 margin only
    assert float(bound.curvature) == 0.0


def test_lipschitz_bn_train_mode_statistics(x64):
    bn = lcnn.LipschitzBatchNorm(momentum=0.8)
    variables = _to64(bn.init(KEY, jnp.zeros((1, 4))))
    variables["batch_stats"] = {"mean": jnp.asarray([0.0, 1.0, 0.0, 0.0], F64),
                                "var": jnp.asarray([0.25, 1.0, 4.0, 9.0], F64)}
    x = np.random.default_rng(1).normal(1.0, 2.0, size=(6, 4))
    y, upd = bn.apply(variables, jnp.asarray(x, F64), train=True, mutable=["batch_stats"])
    mu, var = x.mean(0), x.var(0)  # biased batch statistics
    s = math.sqrt(0.25 + 1e-5)  # the running variance BEFORE this step's update (as in the reference)
    np.testing.assert_allclose(y, (x - mu) / np.sqrt(var + 1e-5) * s * min(1 / s, 10.0), rtol=1e-10)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.8 * np.array([0, 1, 0, 0]) + 0.2 * mu, rtol=1e-12)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.8 * np.array([0.25, 1, 4, 9]) + 0.2 * var, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Spectral layers
# ------------------------------------------------------------------------------------------------
CONV_CASES = [
    dict(kernel_size=(3, 3), strides=(1, 1), padding="SAME"),
    dict(kernel_size=(3, 3), strides=(2, 2), padding="SAME"),
    dict(kernel_size=(2, 3), strides=(2, 1), padding="VALID"),
    dict(kernel_size=(3, 3), strides=(1, 2), padding=((2, 0), (1, 1))),
]


def _dense_norm(f, x):
    return _lipschitz_of(f, x)


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_spectral_conv_true_operator_norm(x64, case):
    cfg = CONV_CASES[case]
    conv = lcnn.SpectralConv(features=3, use_bias=True, bias_init=jax.nn.initializers.normal(1.0), **cfg)
    x = jax.random.normal(jax.random.PRNGKey(case), (2, 7, 6, 2))
    variables = conv.init(jax.random.PRNGKey(10 + case), x)
    assert variables["spectral"]["v"].shape == (1, 7, 6, 2)
    step = jax.jit(lambda v: conv.apply(v, x, train=True, mutable=["spectral"])[1])
    for _ in range(300):  # 1 power iteration per training call, as in training
        variables = {**variables, **step(variables)}
    v64 = _to64(variables)
    x0 = jnp.asarray(np.random.default_rng(case).uniform(size=(7, 6, 2)), F64)
    bias = v64["params"]["bias"]
    linear_part = lambda t: conv.apply(v64, t[None])[0] - bias  # noqa: E731
    norm = _dense_norm(linear_part, x0)
    np.testing.assert_allclose(norm, 1.0, atol=1e-3)
    # the unnormalised convolution's true norm vs the reshaped-kernel (Miyato) norm
    kernel = np.asarray(v64["params"]["kernel"])
    true = _dense_norm(lambda t: lcnn.conv_nhwc(t[None], v64["params"]["kernel"], cfg["strides"],
                                                canonicalize_padding(cfg["padding"], 2))[0], x0)
    miyato = np.linalg.svd(kernel.reshape(-1, kernel.shape[-1]), compute_uv=False)[0]
    if case == 0:  # stride 1, SAME: dividing by Miyato's norm would leave the layer far from 1-Lipschitz
        assert abs(true / miyato - 1) > 0.1, (true, miyato)


def test_spectral_conv_train_updates_eval_does_not(x64):
    conv = lcnn.SpectralConv(features=3, kernel_size=(3, 3), strides=(2, 2), padding="SAME", use_bias=False)
    x = jax.random.normal(KEY, (2, 6, 6, 2))
    variables = _to64(conv.init(KEY, x))
    x = jnp.asarray(x, F64)
    kernel, v = variables["params"]["kernel"], variables["spectral"]["v"]
    op = lambda t: lcnn.conv_nhwc(t, kernel, (2, 2), "SAME")  # noqa: E731
    # eval: sigma from the stored vector, nothing mutated
    y_eval, upd = conv.apply(variables, x, mutable=["spectral"])
    np.testing.assert_array_equal(upd["spectral"]["v"], v)
    np.testing.assert_allclose(y_eval, op(x) / jnp.linalg.norm(op(v)), rtol=1e-12)
    # train: one step v <- A^T A v / ||.|| with A^T from jax.vjp (independent of linear_transpose)
    y_train, upd = conv.apply(variables, x, train=True, mutable=["spectral"])
    w = jax.vjp(op, v)[1](op(v))[0]
    v_new = w / jnp.linalg.norm(w)
    np.testing.assert_allclose(upd["spectral"]["v"], v_new, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(y_train, op(x) / jnp.linalg.norm(op(v_new)), rtol=1e-10)
    # gradient flows through W in sigma = ||A_W v|| with v constant (standard SN gradient)
    loss = lambda p: jnp.sum(jnp.sin(conv.apply({**variables, "params": p}, x)))  # noqa: E731
    want = jax.grad(lambda k: jnp.sum(jnp.sin(lcnn.conv_nhwc(x, k, (2, 2), "SAME")
                                              / jnp.linalg.norm(lcnn.conv_nhwc(v, k, (2, 2), "SAME")))))(kernel)
    np.testing.assert_allclose(jax.grad(loss)(variables["params"])["kernel"], want, rtol=1e-10)
    with pytest.raises(ValueError, match="re-initialise"):
        conv.apply(variables, jnp.zeros((1, 8, 8, 2), F64))


def test_spectral_dense_matrix_norm(x64):
    dense = lcnn.SpectralDense(features=4, n_init_iter=300)
    x = jnp.ones((3, 6))
    variables = _to64(dense.init(KEY, x))
    w = np.asarray(variables["params"]["kernel"])
    assert variables["spectral"]["v"].shape == (6,)
    y = dense.apply(variables, jnp.asarray(x, F64))
    np.testing.assert_allclose(y, np.ones((3, 6)) @ w / np.linalg.svd(w, compute_uv=False)[0], rtol=1e-6)
    lin = lambda t: dense.apply(variables, t[None])[0] - variables["params"]["bias"]  # noqa: E731
    np.testing.assert_allclose(_lipschitz_of(lin, jnp.zeros(6, F64)), 1.0, atol=1e-6)


RESNET_INPUT = (7, 7, 1)


@pytest.fixture(scope="module")
def tiny_lcnn_resnet():
    """A two-stage LCNN ResNet (an identity block and a strided block with a conv shortcut)."""
    model = models.make_lcnn_model("resnet18", 10, width_mult=1 / 16, stage_sizes=(1, 1))
    return model, random_variables(model, RESNET_INPUT, 1)


def test_lcnn_resnet_block_structure(tiny_lcnn_resnet):
    """The block computes act2(0.5 (B2(act1(B1(x/sqrt2))) + S(x/sqrt2))) (checked on the initialised model)."""
    model, variables = tiny_lcnn_resnet
    name = "stage2_block0"
    block_vars = {col: tree[name] for col, tree in variables.items() if name in tree}
    block = lcnn.LCNNBasicBlock(features=8, strides=2)
    x = jax.random.uniform(KEY, (2, 7, 7, 4))
    got = block.apply(block_vars, x)

    def sub(n, mod, t):
        return mod.apply({col: tree[n] for col, tree in block_vars.items() if n in tree}, t)

    h = x / math.sqrt(2)
    conv = lambda k, s, n: lcnn.SpectralConv(features=8, kernel_size=(k, k), strides=(s, s), use_bias=False)  # noqa
    y = sub("norm1", lcnn.LipschitzBatchNorm(), sub("conv1", conv(3, 2, "conv1"), h))
    y = sub("act1", lcnn.CenteredSoftplus(), y)
    y = sub("norm2", lcnn.LipschitzBatchNorm(), sub("conv2", conv(3, 1, "conv2"), y))
    sc = sub("shortcut_norm", lcnn.LipschitzBatchNorm(), sub("shortcut_conv", conv(1, 2, "sc"), h))
    want = sub("act2", lcnn.CenteredSoftplus(), 0.5 * (y + sc))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert "stem_conv" in variables["spectral"] and "head" in variables["spectral"]  # SN head, SN stem


# ------------------------------------------------------------------------------------------------
# Regularizers
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_problem():
    """A small softplus MLP, its apply function and a batch (float32; tests cast to float64)."""
    net = models.MLP(widths=(7,), num_classes=4, act=layers.activation("softplus", beta=3.0))
    params = net.init(KEY, jnp.zeros((1, 2, 3, 1)))["params"]
    apply_fn = lambda p, xs: net.apply({"params": p}, xs)  # noqa: E731
    rng = np.random.default_rng(2)
    batch = {"image": rng.uniform(size=(5, 2, 3, 1)), "label": np.array([0, 3, 1, 1, 2])}
    return params, apply_fn, batch


def _mlp64(problem):
    params, apply_fn, batch = problem
    return _to64(params), apply_fn, {"image": jnp.asarray(batch["image"], F64), "label": jnp.asarray(batch["label"])}


def _mean_ce(apply_fn, params, labels):
    return lambda xs: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, xs), labels))


def test_lcnn_penalty_closed_form(x64):
    params = {"act1": {"log_beta": jnp.asarray(0.3, F64)}, "blk": {"act": {"log_beta": jnp.asarray(-1.0, F64)},
                                                                    "norm": {"log_gamma": jnp.asarray(-0.7, F64)}},
              "norm1": {"log_gamma": jnp.asarray(2.0, F64)}, "conv": {"kernel": jnp.ones((2, 2), F64)}}
    reg = lcnn_regs.lcnn_penalty(beta_coeff=0.03, gamma_coeff=0.5)
    state = reg.init(KEY, params, {})
    assert {k: float(v) for k, v in state.items()} == pytest.approx({"beta_coeff": 0.03, "gamma_coeff": 0.5})
    value, _, metrics = reg.loss(params, state, {}, KEY, None)
    beta_sum = (math.exp(0.3) + 1e-3) + (math.exp(-1.0) + 1e-3)
    gamma_sum = 0.7 + 2.0
    c_beta, c_gamma = float(np.float32(0.03)), float(np.float32(0.5))  # coefficients live in float32 state
    np.testing.assert_allclose(float(value), c_beta * beta_sum + c_gamma * gamma_sum, rtol=1e-12)
    np.testing.assert_allclose(float(metrics["beta_sum"]), beta_sum, rtol=1e-12)
    np.testing.assert_allclose(float(metrics["abs_log_gamma_sum"]), gamma_sum, rtol=1e-12)
    grads = jax.grad(lambda p: reg.loss(p, state, {}, KEY, None)[0])(params)
    np.testing.assert_allclose(float(grads["norm1"]["log_gamma"]), 0.5)
    np.testing.assert_allclose(float(grads["blk"]["norm"]["log_gamma"]), -0.5)
    np.testing.assert_allclose(float(grads["act1"]["log_beta"]), c_beta * math.exp(0.3), rtol=1e-12)
    with pytest.raises(ValueError, match="log_beta"):
        reg.init(KEY, {"conv": {"kernel": jnp.ones(2)}}, {})
    with pytest.raises(ValueError):
        lcnn_regs.lcnn_penalty(beta_coeff=-1.0)


def test_lcnn_gradnorm_matches_reference_formula(x64, mlp_problem):
    params, apply_fn, batch = _mlp64(mlp_problem)
    xs, ys = batch["image"], batch["label"]
    grad_batch = jax.jit(jax.grad(_mean_ce(apply_fn, params, ys)))(xs)  # the reference: grad of the batch-mean loss
    want = 1e5 * float(jnp.sum(grad_batch ** 2)) / xs.shape[0]
    reg = lcnn_regs.lcnn_gradnorm(2e-3)
    value, _, metrics = jax.jit(reg.loss, static_argnums=4)(params, reg.init(KEY, params, batch), batch, KEY,
                                                            apply_fn)
    np.testing.assert_allclose(float(metrics["lcnn_gradnorm"]), want, rtol=1e-10)
    np.testing.assert_allclose(float(value), float(np.float32(2e-3)) * want, rtol=1e-10)
    # fixed protocol batch size: scale / 128^2 * mean_i ||g_i||^2 (per-example gradients one by one)
    per_ex = jax.jit(jax.vmap(jax.grad(lambda x, y: optax.softmax_cross_entropy_with_integer_labels(
        apply_fn(params, x[None]), y[None])[0])))(xs, ys)  # one example at a time
    want128 = 1e5 / 128 ** 2 * float(jnp.mean(jnp.sum(per_ex ** 2, axis=(1, 2, 3))))
    reg128 = lcnn_regs.lcnn_gradnorm(1.0, batch_size=128)
    np.testing.assert_allclose(float(reg128.loss(params, reg128.init(KEY, params, batch), batch, KEY, apply_fn)[0]),
                               want128, rtol=1e-10)  # coeff 1.0 is exact in float32


def test_cure_matches_reference_formula(x64, mlp_problem):
    params, apply_fn, batch = _mlp64(mlp_problem)
    xs, ys = batch["image"], batch["label"]
    grad_fn = jax.jit(jax.grad(_mean_ce(apply_fn, params, ys)))
    g = grad_fn(xs)
    sign = jnp.sign(g)
    z = sign / jnp.sqrt(jnp.sum(sign ** 2, axis=(1, 2, 3), keepdims=True))
    h = 0.7
    want = 1e3 * float(jnp.sum((grad_fn(xs + h * z) - g) ** 2)) / xs.shape[0]
    reg = lcnn_regs.cure(3e-3, h=h)
    value, _, metrics = jax.jit(reg.loss, static_argnums=4)(params, reg.init(KEY, params, batch), batch, KEY,
                                                            apply_fn)
    np.testing.assert_allclose(float(metrics["cure"]), want, rtol=1e-10)
    np.testing.assert_allclose(float(value), float(np.float32(3e-3)) * want, rtol=1e-10)
    pgrad = jax.jit(jax.grad(lambda p: reg.loss(p, reg.init(KEY, p, batch), batch, KEY, apply_fn)[0]))(params)
    leaves = jax.tree_util.tree_leaves(pgrad)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves) and any(float(jnp.abs(l).max()) > 0
                                                                           for l in leaves)
    with pytest.raises(ValueError, match="h must"):
        lcnn_regs.cure(h=0.0)


@pytest.mark.slow  # long for the default run; CI runs it
def test_training_with_lcnn_penalty_lowers_beta():
    from lcnn_jax.data import load_split
    from lcnn_jax.train import create_train_state, make_train_step

    split = load_split("mnist5k", "train")
    batch = {"image": jnp.asarray(split.images[:16]), "label": jnp.asarray(split.labels[:16])}
    model = models.make_lcnn_model("small_cnn", 10, width_mult=1 / 8)
    reg = lcnn_regs.lcnn_penalty()  # the defaults, 1e-2 and 1e-2
    state0 = jax.jit(lambda k: create_train_state(model, optax.sgd(0.05, momentum=0.9), [reg], k, batch))(KEY)
    assert set(state0.model_state) == {"batch_stats", "spectral"}
    step = jax.jit(make_train_step(model, [reg]))  # one compiled step; "without" = zero coefficients

    def run(state):
        for _ in range(6):
            state, metrics = step(state, batch)
        return state, metrics

    zero = ({"beta_coeff": jnp.zeros((), jnp.float32), "gamma_coeff": jnp.zeros((), jnp.float32)},)
    with_reg, metrics = run(state0)
    without, _ = run(state0.replace(reg_state=zero))
    t0, t1, t2 = (lcnn_regs.lcnn_terms(s.params) for s in (state0, with_reg, without))
    assert float(t1["beta_sum"]) < float(t0["beta_sum"])
    assert float(t1["beta_sum"]) < float(t2["beta_sum"])
    assert float(t1["abs_log_gamma_sum"]) < float(t0["abs_log_gamma_sum"])
    gammas = [jnp.exp(x) for x in lcnn_regs._leaves_named(with_reg.params, "log_gamma")]
    assert len(gammas) == 2 and all(bool(jnp.isfinite(g)) for g in gammas)
    assert "lcnn/beta_sum" in metrics and bool(jnp.isfinite(metrics["loss"]))
    assert int(with_reg.diverged_at) == -1
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), with_reg.model_state, state0.model_state)
    assert all(v > 0 for v in jax.tree_util.tree_leaves(moved["spectral"]))  # power iteration ran in training


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
def _model_from_config(config, num_classes):
    kwargs = dict(config.model.kwargs)
    name = config.model.name
    if name.startswith("lcnn_") and name not in models.MODELS:  # until the registry lists the LCNN variants
        return models.make_lcnn_model(name[len("lcnn_"):], num_classes, **kwargs)
    return models.make_model(name, num_classes, **kwargs)


@pytest.mark.parametrize("variant", ["standard", "lcnn", "gradreg", "lcnn_gradreg", "softplus10", "cure"])
def test_configs_build(variant):
    from lcnn_jax.configs import default_config, load_config

    for name, shape, classes in (("lcnn_mnist5k", (1, 28, 28, 1), 10), ("lcnn_cifar100", (1, 32, 32, 3), 100)):
        config = load_config(os.path.join(CONFIGS, f"{name}.py:{variant}"))
        assert config.data.name == name.split("_")[1]
        assert set(config.keys()) == set(default_config().keys())
        model = _model_from_config(config, classes)
        shapes = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct(shape, jnp.float32))
        is_lcnn = variant.startswith("lcnn")
        assert ("spectral" in shapes) == is_lcnn
        regs = {name: getattr(lcnn_regs, {"lcnn": "lcnn_penalty"}.get(name, name))(**dict(kw))
                for name, kw in config.regularizers.items()}
        assert ("lcnn" in regs) == is_lcnn
        assert ("lcnn_gradnorm" in regs) == variant.endswith("gradreg")
        if is_lcnn:
            regs["lcnn"].init(KEY, shapes["params"], {})  # the LCNN model has log_beta/log_gamma leaves
    with pytest.raises(ValueError, match="variant"):
        load_config(os.path.join(CONFIGS, "lcnn_mnist5k.py:nope"))


def test_power_iteration_unrolled_equals_rolled(monkeypatch, x64):
    """The one power-iteration step per training call is unrolled (lcnn_jax.loops.auto_unroll: a transposed
    convolution inside a while loop is slow on XLA:CPU); unrolled or rolled, the iterates are the same, and they
    converge to the top singular value of the convolution's dense matrix."""
    from lcnn_jax import loops

    kernel = jax.random.normal(KEY, (3, 3, 2, 3), jnp.float64)
    fwd = lambda v: lcnn.conv_nhwc(v, kernel, (2, 2), "SAME")  # noqa: E731
    v0 = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 6, 2), jnp.float64)
    out = {}
    for limit in (0, 20):
        monkeypatch.setattr(loops, "MAX_AUTO_UNROLL", limit)
        jaxpr = str(jax.make_jaxpr(lambda v: lcnn.power_iterate(fwd, v, 3))(v0))
        assert ("scan" in jaxpr or "while" in jaxpr) == (limit == 0)  # rolled: a loop primitive
        out[limit] = lcnn.power_iterate(fwd, v0, 3)
    np.testing.assert_allclose(out[0], out[20], rtol=1e-12, atol=1e-14)
    dense = jax.jacfwd(lambda v: fwd(v.reshape(1, 6, 6, 2)).reshape(-1))(jnp.zeros(72, jnp.float64))
    v = lcnn.power_iterate(fwd, v0, 200)
    np.testing.assert_allclose(float(jnp.linalg.norm(fwd(v))), np.linalg.svd(np.asarray(dense))[1][0], rtol=1e-6)
