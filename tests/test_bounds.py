"""Tests for the certified bounds: lcnn_jax.measures.operator_norms and lcnn_jax.measures.bounds.

Oracles: the dense float64 Jacobian of the convolution (``jax.jacfwd``) and its SVD (``numpy.linalg.svd``) for
operator norms; dense float64 input Hessians (``jax.hessian``) and ``numpy.linalg.eigvalsh`` for curvature;
derivatives of the activations on a fine float64 grid for their constants. A certified upper bound is checked
with no tolerance; a lower side (an estimate from below, in the kernel's dtype) with that dtype's rounding.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from _lcnn_helpers import F64, KEY, downsample, random_variables, to64, xla_optimizations
from lcnn_jax.measures import bounds as cb
from lcnn_jax.measures import operator_norms as on
from lcnn_jax.nn import layers, lcnn, models


@pytest.fixture(autouse=True)
def quick_compile():
    with xla_optimizations(False):
        yield


def _dense_sigma(f, shape):
    """Largest singular value of the dense float64 Jacobian of the linear map f on inputs of ``shape``."""
    jac = jax.jacfwd(f)(jnp.zeros(shape, F64))
    return float(np.linalg.svd(np.asarray(jac).reshape(-1, int(np.prod(shape))), compute_uv=False)[0])


def _conv_sigma(kernel_sp_io, spatial, strides, padding, lhs_dilation, rhs_dilation, groups):
    """``||A||_2`` of a convolution from its dense matrix, built in NumPy from the definition (independent of
    lax): ``y[o, c_out] = sum_{a, c} K[a, c, c_out] x[p, c]`` over taps ``a`` and input positions ``p`` with
    ``l p = s o + r a - lo`` (``l`` input dilation, ``r`` kernel dilation, ``lo`` the low padding), within
    the feature group of ``c_out``."""
    kernel = np.asarray(kernel_sp_io, np.float64)
    d = len(spatial)
    cin_g, cout = kernel.shape[-2:]
    cin, cout_g = cin_g * groups, cout // groups
    n_dil = [(n - 1) * l + 1 for n, l in zip(spatial, lhs_dilation)]
    out_sp = [(nd + lo + hi - ((k - 1) * r + 1)) // st + 1
              for nd, (lo, hi), k, r, st in zip(n_dil, padding, kernel.shape[:d], rhs_dilation, strides)]
    mat = np.zeros((int(np.prod(out_sp)) * cout, int(np.prod(spatial)) * cin))
    for o in np.ndindex(*out_sp):
        row0 = np.ravel_multi_index(o, out_sp) * cout
        for a in np.ndindex(*kernel.shape[:d]):
            p = [st * oi + r * ai - lo for oi, ai, st, r, (lo, _) in zip(o, a, strides, rhs_dilation, padding)]
            if any(pi % l or not 0 <= pi // l < n for pi, l, n in zip(p, lhs_dilation, spatial)):
                continue
            col0 = np.ravel_multi_index(tuple(pi // l for pi, l in zip(p, lhs_dilation)), spatial) * cin
            for g in range(groups):
                block = kernel[a][:, g * cout_g:(g + 1) * cout_g].T  # (cout_g, cin_g)
                mat[row0 + g * cout_g:row0 + (g + 1) * cout_g, col0 + g * cin_g:col0 + (g + 1) * cin_g] += block
    return float(np.linalg.svd(mat, compute_uv=False)[0])


# ------------------------------------------------------------------------------------------------
# Operator norms of convolutions
# ------------------------------------------------------------------------------------------------
# (kernel (spatial..., in, out), input spatial, strides, padding, lhs dilation, rhs dilation, groups)
CONV_CASES = [
    ((3, 3, 2, 3), (7, 7), (1, 1), "SAME", None, None, 1),
    ((3, 3, 2, 3), (7, 7), (2, 2), "SAME", None, None, 1),
    ((5, 5, 1, 4), (7, 6), (1, 1), "SAME", None, None, 1),
    ((2, 3, 3, 2), (7, 5), (2, 1), "VALID", None, None, 1),
    ((3, 3, 2, 2), (6, 7), (1, 2), ((2, 0), (1, 1)), None, None, 1),
    ((4, 2, 1, 3), (7, 7), (2, 2), ((1, 2), (0, 3)), None, None, 1),
    ((3, 3, 2, 2), (6, 6), (1, 1), ((-1, 1), (1, -2)), None, None, 1),  # negative padding crops
    ((1, 1, 3, 4), (5, 5), (2, 2), "VALID", None, None, 1),
    ((3, 3, 2, 2), (7, 7), (1, 1), "SAME", None, (2, 2), 1),  # atrous
    ((3, 3, 1, 4), (6, 6), (1, 1), "SAME", None, None, 2),  # two feature groups (C_in 2)
    ((3, 3, 2, 2), (4, 4), (1, 1), ((2, 2), (2, 2)), (2, 2), None, 1),  # transposed conv (input dilation)
    ((3, 2, 3), (9,), (2,), "SAME", None, None, 1),  # 1-D
]


def _case_params(case, dtype, seed):
    kshape, spatial, strides, padding, ldil, rdil, groups = case
    rng = np.random.default_rng(seed)
    kernel = jnp.asarray(rng.normal(size=kshape), dtype)
    d = len(spatial)
    cin = kshape[-2] * groups
    lhs_shape = (1,) + tuple(spatial) + (cin,)
    spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[d]
    dn = lax.conv_dimension_numbers(lhs_shape, kshape, spec)
    if isinstance(padding, str):
        eff = [(k - 1) * (rdil or (1,) * d)[i] + 1 for i, k in enumerate(kshape[:d])]
        dil_in = [(n - 1) * (ldil or (1,) * d)[i] + 1 for i, n in enumerate(spatial)]
        padding = tuple(lax.padtype_to_pads(dil_in, eff, strides, padding))
    params = dict(window_strides=strides, padding=padding, lhs_dilation=ldil or (1,) * d,
                  rhs_dilation=rdil or (1,) * d, dimension_numbers=dn, feature_group_count=groups)
    exact = _conv_sigma(np.asarray(kernel), spatial, strides, padding, params["lhs_dilation"],
                        params["rhs_dilation"], groups)
    return kernel, lhs_shape, params, exact


def test_conv_norm_bounds_bracket_the_exact_norm(x64):
    """upper >= ||A||_2 (dense float64 SVD) always, with no tolerance, for float32 and float64 kernels; the lower
    side <= it up to the dtype's rounding (the witness alone, and after power iteration on some cases)."""
    report = []
    for i, case in enumerate(CONV_CASES):
        k32, lhs_shape, params, exact = _case_params(case, jnp.float32, i)  # float32 values are exact in float64
        kernels = [(k32, 1e-5, 60 if i % 4 == 0 else 0)] + ([(jnp.asarray(k32, F64), 1e-12, 0)] if i % 4 == 1 else [])
        for kernel, rtol, iters in kernels:
            nb = on.conv_general_norm_bounds(kernel, lhs_shape, key=None, num_iters=iters, **params)
            report.append((i, kernel.dtype.name, iters, round(nb.upper / exact, 4), round(nb.lower / exact, 4)))
            assert nb.upper >= exact, (case, nb, exact)
            assert 0 < nb.lower <= exact * (1 + rtol), (case, nb, exact)
            if iters:
                assert nb.lower >= 0.99 * exact, (case, nb, exact)  # converged from the witness
    print("(case, dtype, power iterations, upper / exact, lower / exact):", report)
    # the NumPy oracle is the map lax computes (else the comparison above would prove nothing)
    k32, lhs_shape, params, exact = _case_params(CONV_CASES[10], jnp.float32, 10)
    x = np.random.default_rng(0).normal(size=lhs_shape)
    y = np.asarray(lax.conv_general_dilated(jnp.asarray(x, F64), jnp.asarray(k32, F64), **params))
    assert np.linalg.norm(y) <= exact * np.linalg.norm(x) * (1 + 1e-12)
    # tight on these small images (boundary effects only), except the transposed convolution, whose inserted
    # zeros the circular embedding does not exploit
    loose = {i: u for i, _, _, u, _ in report}
    assert max(u for i, u in loose.items() if CONV_CASES[i][4] is None) < 1.3, report
    assert max(loose.values()) < 1.6, report


def test_conv_norm_bounds_nhwc_helper_and_stride_matter(x64):
    """conv_norm_bounds (Flax layout) agrees with the general path; a stride-2 map is bounded by its own norm,
    not by the stride-1 map's (the polyphase form), and the SAME map differs from the reshaped-kernel norm."""
    rng = np.random.default_rng(3)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 3)), F64)
    uppers = {}
    for strides in ((1, 1), (2, 2)):
        nb = on.conv_norm_bounds(kernel, (8, 8, 2), strides=strides, padding="SAME", num_iters=0)
        pads = lax.padtype_to_pads((8, 8), (3, 3), strides, "SAME")
        exact = _conv_sigma(kernel, (8, 8), strides, pads, (1, 1), (1, 1), 1)
        assert exact <= nb.upper <= 1.15 * exact
        uppers[strides] = nb.upper
    assert uppers[(2, 2)] < 0.9 * uppers[(1, 1)]  # bounding by the stride-1 map would be valid but loose
    s1 = uppers[(1, 1)]
    miyato = np.linalg.svd(np.asarray(kernel).reshape(-1, 3), compute_uv=False)[0]
    assert abs(s1 / miyato - 1) > 0.1


def test_matrix_norm_bounds(x64):
    rng = np.random.default_rng(0)
    m = rng.normal(size=(7, 4)).astype(np.float32)
    nb = on.matrix_norm_bounds(m)
    exact = np.linalg.svd(m.astype(np.float64), compute_uv=False)[0]
    assert nb.lower == pytest.approx(exact, rel=1e-13) and exact <= nb.upper <= exact * (1 + 1e-5)
    stack = rng.normal(size=(3, 5, 2))
    assert on.matrix_norm_bounds(stack).lower == pytest.approx(
        max(np.linalg.svd(b, compute_uv=False)[0] for b in stack), rel=1e-13)
    assert on.matrix_norm_bounds(np.zeros((0, 3))) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------------
# Activation constants
# ------------------------------------------------------------------------------------------------
_ACTS = {
    "softplus": jax.nn.softplus,
    "_log_half_one_plus_exp": lambda z: lcnn.centered_softplus(z, 1.0),
    "logaddexp": lambda z: jnp.logaddexp(z, 0.7),
    "log_sigmoid": jax.nn.log_sigmoid,
    "logistic": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "sin": jnp.sin,
}


@pytest.mark.parametrize("name", sorted(_ACTS))
def test_activation_constants_bound_and_nearly_attain_the_derivatives(x64, name):
    f = _ACTS[name]
    z = jnp.linspace(-15.0, 15.0, 120_001, dtype=F64)  # the suprema lie in [-3, 3]; the tails decay
    d1, d2 = jax.jit(lambda t: (jax.vmap(jax.grad(f))(t), jax.vmap(jax.grad(jax.grad(f)))(t)))(z)
    lip, curv = cb.ACTIVATION_BOUNDS[name]
    m1, m2 = float(jnp.max(jnp.abs(d1))), float(jnp.max(jnp.abs(d2)))
    assert m1 <= lip and m2 <= curv, (m1, m2)
    assert m1 >= 0.999 * lip and m2 >= 0.999 * curv, (m1, m2)  # the constants are the suprema, not slack


# ------------------------------------------------------------------------------------------------
# Models: the bound holds on random and real inputs
# ------------------------------------------------------------------------------------------------
def _hessian_and_grad_norms(fn, xs):
    """(N, K) Hessian spectral norms and gradient norms of every output at every x (dense, float64)."""
    hess = jax.jit(jax.vmap(jax.hessian(fn)))(xs)
    jac = jax.jit(jax.vmap(jax.jacfwd(fn)))(xs)
    n, k = hess.shape[:2]
    d = int(np.prod(xs.shape[1:]))
    h = np.asarray(hess).reshape(n, k, d, d)
    return np.max(np.abs(np.linalg.eigvalsh(h)), axis=-1), np.linalg.norm(np.asarray(jac).reshape(n, k, d), axis=-1)


@pytest.fixture(scope="module")
def digits():
    from lcnn_jax.data import load_split

    return load_split("mnist5k", "test").images[:6]


class _OwnResidualNet(nn.Module):
    """A network the library does not define: spectral and plain convs, Lipschitz and plain BN, centred
    softplus, tanh, a residual sum with an average-pooled shortcut, global average pooling, a sigmoid
    layer and a spectral head. ``train`` is accepted; the bound applies it with train=False."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = lcnn.SpectralConv(4, (3, 3), name="stem")(x, train=train)
        x = lcnn.LipschitzBatchNorm(name="stem_bn")(x, train=train)
        x = lcnn.CenteredSoftplus(name="stem_act")(x)
        r = lcnn.SpectralConv(4, (3, 3), strides=(2, 2), use_bias=False, name="branch_conv")(x, train=train)
        r = jnp.tanh(r)
        r = nn.Conv(4, (3, 3), name="branch_plain")(r)
        r = nn.BatchNorm(use_running_average=not train, name="branch_bn")(r)
        s = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = layers.softplus_beta(0.5 * (r + s), 3.0)
        x = jnp.mean(x, axis=(1, 2))
        x = jax.nn.sigmoid(nn.Dense(6, name="fc")(x))
        return lcnn.SpectralDense(3, name="head")(x, train=train)


def test_bound_of_a_model_defined_here_holds_on_random_and_real_inputs(x64, digits):
    model = _OwnResidualNet()
    shape = (7, 7, 1)
    variables = random_variables(model, shape, 5)
    res = cb.curvature_bound(model, variables, shape, key=KEY)
    xs = np.concatenate([downsample(digits, 4), np.random.default_rng(0).uniform(size=(10,) + shape),
                         np.random.default_rng(1).normal(0.0, 3.0, size=(4,) + shape)])
    v64 = to64(variables)
    fn = lambda t: model.apply(v64, t[None])[0]  # noqa: E731
    h_norms, g_norms = _hessian_and_grad_norms(fn, jnp.asarray(xs, F64))
    curv, lip = np.asarray(res.curvature), np.asarray(res.lipschitz)
    assert curv.shape == (3,) and np.all(np.isfinite(curv))
    assert np.all(h_norms <= curv[None]), (h_norms.max(0), curv)
    assert np.all(g_norms <= lip[None]), (g_norms.max(0), lip)
    assert np.all(h_norms.max(0) > 0)
    full = np.asarray(jax.jit(jax.vmap(jax.jacfwd(fn)))(jnp.asarray(xs, F64))).reshape(len(xs), 3, -1)
    assert max(np.linalg.svd(j, compute_uv=False)[0] for j in full) <= res.network.lipschitz
    # every module of the model is accounted for, and each factor is a sandwich lower <= upper
    names = dict(res.layers)
    for site in ("stem", "stem_bn", "stem_act", "branch_conv", "branch_plain", "branch_bn", "fc", "head"):
        assert site in names, sorted(names)
    assert all(f.lower <= f.upper for f in res.factors)
    assert sum(v for _, v in res.curvature_terms) == pytest.approx(res.network.curvature, rel=1e-12)
    # one share per nonlinearity: the module's path, or the function's name in the model's own code
    assert {k for k, _ in res.curvature_terms} == {"stem_act/centered_softplus", "tanh", "softplus", "logistic"}


@pytest.fixture(scope="module")
def tiny_lcnn_resnet():
    model = models.make_lcnn_model("resnet18", 10, width_mult=1 / 16, stage_sizes=(1, 1))
    return model, random_variables(model, (7, 7, 1), 1)


@pytest.mark.slow  # long for the default run; CI runs it
@pytest.mark.parametrize("which", ["small_cnn", "resnet"])
def test_bound_of_library_lcnn_models(x64, digits, which, tiny_lcnn_resnet):
    if which == "small_cnn":
        model, shape = models.make_lcnn_model("small_cnn", 10, width_mult=1 / 8), (7, 7, 1)
        variables = random_variables(model, shape, 0)
        xs = np.concatenate([downsample(digits, 4)[:2], np.random.default_rng(0).uniform(size=(1,) + shape)])
    else:
        (model, variables), shape = tiny_lcnn_resnet, (7, 7, 1)
        xs = np.concatenate([downsample(digits, 4)[:2], np.random.default_rng(1).uniform(size=(1,) + shape)])
    res = cb.curvature_bound(model, variables, shape, key=jax.random.PRNGKey(7))
    v64 = to64(variables)
    fn = lambda t: model.apply(v64, t[None], train=False)[0]  # noqa: E731
    h_norms, _ = _hessian_and_grad_norms(fn, jnp.asarray(xs, F64))
    curv = np.asarray(res.curvature)
    assert curv.shape == (10,) and np.all(np.isfinite(curv)) and np.all(h_norms <= curv[None])
    names = dict(res.layers)
    if which == "small_cnn":
        assert {"conv1", "norm1", "act1", "conv2", "norm2", "act2", "fc1", "act3", "head"} <= set(names)
        pools = [f for f in res.factors if f.op == "pool_sum"]
        assert len(pools) == 2 and all(f.upper == 2.0 for f in pools)  # 2x2 sums: sqrt(4); then the 1/4 scale
        assert dict(res.layers)["conv1"].lipschitz > 1.0  # random stored vectors: the layers are not 1-Lipschitz
        # the model's own pooling and flattening: each 2x2 average is one sum (sqrt 4) and one 1/4 scale
        glue = [(f.op, f.upper) for f in res.factors if f.path == ""]
        assert [op for op, _ in glue] == ["pool_sum", "scale", "pool_sum", "scale"], glue
    else:
        assert "stage2_block0/shortcut_conv" in names and "stage1_block0/shortcut_conv" not in names
        gap = [f for f in res.factors if f.op == "sum" and f.path == ""]
        assert len(gap) == 1 and gap[0].upper == pytest.approx(4.0)  # 4x4 map: sqrt(16), then the 1/16 scale
    for f in res.factors:
        assert f.lower <= f.upper
    # a centred softplus site is bounded by (1, b/4) with its own beta
    beta = float(lcnn.beta_from_log(variables["params"]["act1" if which == "small_cnn" else "stem_act"]["log_beta"]))
    act = names["act1" if which == "small_cnn" else "stem_act"]
    assert act.curvature == pytest.approx(beta / 4, rel=1e-4) and act.lipschitz == pytest.approx(1.0, rel=1e-4)


@pytest.mark.slow
def test_bound_resnet18_lcnn(x64, digits):
    model = models.make_lcnn_model("resnet18", 10, width_mult=1 / 16)  # stages 7 -> 4 -> 2 -> 1
    variables = random_variables(model, (7, 7, 1), 3)
    res = cb.curvature_bound(model, variables, (7, 7, 1), key=KEY)
    xs = np.concatenate([downsample(digits, 4)[:2], np.random.default_rng(1).uniform(size=(1, 7, 7, 1))])
    fn = lambda t: model.apply(to64(variables), t[None], train=False)[0]  # noqa: E731
    h_norms, _ = _hessian_and_grad_norms(fn, jnp.asarray(xs, F64))
    assert np.all(h_norms <= np.asarray(res.curvature)[None])
    assert sum(name.endswith("/act2") for name, _ in res.layers) == 8  # 8 blocks


# ------------------------------------------------------------------------------------------------
# Tight cases: where the bound must equal the exact value
# ------------------------------------------------------------------------------------------------
def test_bound_is_attained_by_one_hidden_unit(x64):
    """logit = w2 s(w1 . x + b1) + b2 with unit-norm w1, w2: the max Hessian norm is exactly b/4."""
    net = models.MLP(widths=(1,), num_classes=1, act=lcnn.CenteredSoftplus, dense=lcnn.SpectralDense)
    w1, w2 = np.array([0.3, -1.2, 0.5]), np.array([-0.7])
    variables = {  # converged power-iteration vectors: the top right singular vectors, w1/||w1|| and 1
        "params": {"dense0": {"kernel": jnp.asarray(w1[:, None], F64), "bias": jnp.asarray([0.4], F64)},
                   "act0": {"log_beta": jnp.asarray(math.log(7.3), F64)},
                   "head": {"kernel": jnp.asarray(w2[:, None], F64), "bias": jnp.asarray([0.1], F64)}},
        "spectral": {"dense0": {"v": jnp.asarray(w1 / np.linalg.norm(w1), F64)}, "head": {"v": jnp.ones(1, F64)}}}
    res = cb.curvature_bound(net, variables, (3,), key=KEY)
    x_star = jnp.asarray(-0.4 * w1 / np.linalg.norm(w1), F64)  # the pre-activation vanishes: |s''| = b/4
    hess = jax.hessian(lambda t: net.apply(variables, t[None])[0, 0])(x_star)
    measured = np.max(np.abs(np.linalg.eigvalsh(np.asarray(hess))))
    np.testing.assert_allclose(measured, (7.3 + 1e-3) / 4, rtol=1e-6)
    assert measured <= float(res.curvature[0]) <= measured * (1 + 1e-10)
    assert 1.0 <= float(res.lipschitz[0]) <= 1.0 + 1e-10


def test_linear_models_bounds_are_exact_per_output(x64):
    """Affine models: per-output slopes are the rows' norms (exactly), the network's the Jacobian's norm, no
    curvature; a conv chain is bounded by the product of certified conv norms."""
    net = models.MLP(widths=(), num_classes=4, act=layers.activation("identity"))
    variables = to64(random_variables(net, (2, 3, 1), 0))
    res = cb.curvature_bound(net, variables, (2, 3, 1), key=KEY)
    w = np.asarray(variables["params"]["head"]["kernel"])
    np.testing.assert_allclose(res.lipschitz, np.linalg.norm(w, axis=0), rtol=1e-12)
    np.testing.assert_allclose(res.network.lipschitz, np.linalg.svd(w, compute_uv=False)[0], rtol=1e-12)
    assert np.all(np.asarray(res.curvature) == 0.0)

    class Convs(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(3, (3, 3), strides=(2, 2), name="a")(x)
            return nn.Conv(2, (3, 3), padding="VALID", name="b")(x)

    conv_net = Convs()
    cvars = to64(random_variables(conv_net, (8, 8, 2), 1))
    res = cb.curvature_bound(conv_net, cvars, (8, 8, 2))
    exact = _dense_sigma(lambda t: conv_net.apply(cvars, t) - conv_net.apply(cvars, 0 * t), (1, 8, 8, 2))
    per_layer = [_conv_sigma(cvars["params"]["a"]["kernel"], (8, 8), (2, 2), ((0, 1), (0, 1)), (1, 1), (1, 1), 1),
                 _conv_sigma(cvars["params"]["b"]["kernel"], (4, 4), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), 1)]
    # a product of certified per-layer norms: above the composite's norm and each layer's; the 3x3 VALID conv
    # on a 4x4 map (2x2 outputs) is where the circular embedding is loosest
    assert exact <= res.network.lipschitz
    for f, e in zip(res.factors, per_layer):
        assert e <= f.upper <= 1.6 * e and f.lower <= e * (1 + 1e-12)
    assert [f.op for f in res.factors] == ["conv", "conv"]
    assert res.network.lipschitz == pytest.approx(res.factors[0].upper * res.factors[1].upper, rel=1e-12)


def test_bound_uses_true_norm_of_unconverged_spectral_conv(x64):
    """With no initial iterations the stored sigma underestimates ||A_W||; the bound must not (issue #13)."""
    conv = lcnn.SpectralConv(features=3, kernel_size=(3, 3), padding="SAME", n_init_iter=0)
    variables = to64(conv.init(KEY, jax.random.normal(KEY, (1, 5, 5, 2))))
    actual = _dense_sigma(lambda t: conv.apply(variables, t) - conv.apply(variables, 0 * t), (1, 5, 5, 2))
    assert actual > 1.05  # the layer, as applied, is not 1-Lipschitz yet
    for dtype_vars in (variables, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)):
        bound, out_shape = cb.layer_bound(conv, dtype_vars, (5, 5, 2), key=KEY)
        assert out_shape == (5, 5, 3)
        assert actual * (1 - 1e-6) <= float(bound.lipschitz) <= 1.3 * actual


# ------------------------------------------------------------------------------------------------
# Kinks and unsupported operations
# ------------------------------------------------------------------------------------------------
def test_kinks_are_infinite_curvature_unless_almost_everywhere(x64):
    """Max pooling (overlapping windows: each input in up to 4) after a smooth activation."""

    class KinkNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = layers.softplus_beta(nn.Conv(3, (3, 3), name="conv")(x), 2.0)
            x = nn.max_pool(x, (2, 2), strides=(1, 1))
            return nn.Dense(3, name="head")(x.reshape((x.shape[0], -1)))

    model, shape = KinkNet(), (5, 5, 1)
    variables = to64(random_variables(model, shape, 2))
    res = cb.curvature_bound(model, variables, shape)
    assert np.all(np.isinf(res.curvature)) and not res.almost_everywhere
    assert np.all(np.isfinite(res.lipschitz))
    ae = cb.curvature_bound(model, variables, shape, almost_everywhere=True)
    assert ae.almost_everywhere and np.all(np.isfinite(ae.curvature))
    xs = jnp.asarray(np.random.default_rng(0).uniform(size=(3,) + shape), F64)
    h_norms, g_norms = _hessian_and_grad_norms(lambda t: model.apply(variables, t[None])[0], xs)
    assert np.all(h_norms <= np.asarray(ae.curvature)[None]) and np.all(g_norms <= np.asarray(ae.lipschitz)[None])
    assert [f.upper for f in res.factors if f.op == "max_pool"] == [2.0]  # sqrt(4 windows per input)
    relu, _ = cb.layer_bound(layers.Activation(kind="relu"), {}, (3,))
    assert relu == (1.0, math.inf)


def test_unsupported_operation_is_named_with_its_module():
    class Square(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * x

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="head")(Square(name="square_me")(nn.Dense(3, name="fc")(x)))

    net = Net()
    variables = net.init(KEY, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"`mul`.*'square_me'.*two input-dependent"):
        cb.curvature_bound(net, variables, (4,))
    with pytest.raises(ValueError, match=r"`exp`"):
        cb.function_bound(lambda x: jnp.exp(x), jax.ShapeDtypeStruct((3,), jnp.float32))
    with pytest.raises(ValueError, match="params"):
        cb.curvature_bound(net, {"batch_stats": {}}, (4,))


def test_bound_algebra_closed_forms():
    f, g = cb.Bound(2.0, 3.0), cb.Bound(0.5, 7.0)
    assert cb.compose(f, g) == (1.0, 3.0 * 0.25 + 2.0 * 7.0)
    assert cb.chain(g, f) == cb.compose(f, g)
    assert cb.add(f, g) == (2.5, 10.0)
    assert cb.scale(-0.5, f) == (1.0, 1.5)
    assert cb.compose(cb.linear(3.0), cb.IDENTITY) == (3.0, 0.0)
