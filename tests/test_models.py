"""Tests for lcnn_jax.nn.layers and lcnn_jax.nn.models.

Oracles: closed forms in NumPy float64 (activations, batch norm, pooling, a one-hidden-layer MLP),
parameter counts derived from the architecture by hand, linearity identities, and batch-independence
of evaluation-mode outputs.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax.nn import layers, models

KEY = jax.random.PRNGKey(0)
TINY = {  # small but structurally complete variants of every registered model
    "mlp": dict(widths=(8, 6)),
    "ms_mlp": dict(),
    "lenet": dict(),
    "ms_lenet": dict(),
    "small_cnn": dict(width_mult=0.125),
    "resnet18": dict(width_mult=1 / 16),
    "vgg11": dict(width_mult=1 / 16),
    "lcnn_small_cnn": dict(width_mult=0.125),
    "lcnn_resnet18": dict(width_mult=1 / 16),
    "lcnn_vgg11": dict(width_mult=1 / 16),
    "aol_mlp": dict(widths=(8, 6)),
    "aol_cnn": dict(channels=(4,), dense_widths=(6,)),
}
BN_MODELS = ("resnet18", "vgg11")
STATEFUL_MODELS = BN_MODELS + ("lcnn_small_cnn", "lcnn_resnet18", "lcnn_vgg11")  # have batch_stats


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _leaves_named(tree, leaf_name):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [v for path, v in flat if getattr(path[-1], "key", None) == leaf_name]


def _init(model, shape, seed=0):
    """Variables drawn in NumPy on the shapes from ``_shapes``: LeCun-normal kernels, small biases,
    BN scale near 1, running mean 0 / var 1. ``model.init`` would give the same structure, but
    compiling its PRNG calls costs tens of seconds on CPU for ResNet-18, even at width 4."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "kernel":
            v = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name == "mean":
            v = np.zeros(leaf.shape)
        elif name in ("var", "scale"):
            v = 1.0 + (0.1 * np.abs(rng.normal(size=leaf.shape)) if name == "scale" else 0.0)
        else:
            v = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(v, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, _shapes(model, shape))


def _shapes(model, shape):
    """Variables' shapes without computing anything (tracing only: no compilation)."""
    return jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct(shape, jnp.float32))


def _jit_apply(model):
    return jax.jit(model.apply, static_argnames=("train", "mutable", "capture_intermediates"))


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------
def test_activation_closed_forms():
    x = np.linspace(-6.0, 6.0, 41)
    expected = {
        "relu": np.maximum(x, 0.0),
        "sigmoid": 1.0 / (1.0 + np.exp(-x)),
        "tanh": np.tanh(x),
        "identity": x,
    }
    for name, want in expected.items():
        got = layers.activation(name)()(jnp.asarray(x, jnp.float32))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("beta", [0.5, 1.0, 10.0])
def test_softplus_beta_closed_form(beta):
    x = np.linspace(-5.0, 5.0, 101)
    want = np.logaddexp(0.0, beta * x) / beta
    got = layers.activation("softplus", beta=beta)()(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_softplus_beta_stable_at_large_inputs():
    act = layers.activation("softplus", beta=10.0)()
    x = jnp.array([-1e4, -1e3, 1e3, 1e4], jnp.float32)
    y = act(x)
    g = jax.vmap(jax.grad(lambda t: act(t)))(x)
    assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(g)))
    # tails: ~0 for very negative inputs, ~x for very positive ones; slope sigmoid(beta x) -> 0 / 1
    np.testing.assert_allclose(np.asarray(y), [0.0, 0.0, 1e3, 1e4], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g), [0.0, 0.0, 1.0, 1.0], atol=1e-6)


def test_activation_factory_errors():
    with pytest.raises(ValueError, match="softplus"):
        layers.activation("swish")
    with pytest.raises(ValueError, match="beta"):
        layers.activation("relu", beta=2.0)
    with pytest.raises(ValueError, match="beta > 0"):
        layers.activation("softplus", beta=0.0)
    with pytest.raises(ValueError, match="batch"):
        layers.normalization("layer")


def test_batchnorm_closed_form_train_and_eval():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(4, 3, 3, 5)).astype(np.float32)
    bn = layers.BatchNorm()
    variables = bn.init(KEY, jnp.asarray(x))
    # train: batch statistics over (B, H, W), biased variance; running stats move by 1 - momentum
    y, upd = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    mu, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(y), (x - mu) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.1 * mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]), 0.9 + 0.1 * var, rtol=1e-5)
    # eval: uses the stored running statistics and the affine parameters
    stats = {"mean": jnp.asarray(rng.normal(size=5), jnp.float32),
             "var": jnp.asarray(rng.uniform(0.5, 2.0, size=5), jnp.float32)}
    params = {"scale": jnp.asarray(rng.normal(size=5), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=5), jnp.float32)}
    y_eval = bn.apply({"params": params, "batch_stats": stats}, jnp.asarray(x), train=False)
    want = ((x - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
            * np.asarray(params["scale"]) + np.asarray(params["bias"]))
    np.testing.assert_allclose(np.asarray(y_eval), want, rtol=1e-5, atol=1e-5)


def test_pool2d_closed_form():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    x[0, 0, 0, 0] = 100.0
    blocks = x.reshape(2, 2, 2, 2, 2, 3)  # (B, H/2, 2, W/2, 2, C)
    np.testing.assert_allclose(np.asarray(layers.pool2d(jnp.asarray(x), "max")), blocks.max(axis=(2, 4)))
    np.testing.assert_allclose(np.asarray(layers.pool2d(jnp.asarray(x), "avg")), blocks.mean(axis=(2, 4)),
                               rtol=1e-6)
    # SAME padding on an odd size: the border window averages only its real entries
    y = np.asarray(layers.pool2d(jnp.ones((1, 3, 3, 1)), "avg", padding="SAME"))
    np.testing.assert_allclose(y, np.ones((1, 2, 2, 1)))
    with pytest.raises(ValueError, match="max"):
        layers.pool2d(jnp.asarray(x), "median")


@pytest.mark.parametrize("k", [2, 3])
def test_max_pool_blocks_has_select_and_scatters_derivative_ties_included(k):
    """Oracle: flax.linen.max_pool (XLA's reduce-window, differentiated by select-and-scatter). Integer-valued
    inputs make ties common, so the first-maximum rule is checked where it matters, in float64 to the bit."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(k)
        x = rng.integers(0, 3, size=(4, 3 * k, 2 * k, 2)).astype(np.float64)
        ref = lambda z: nn.max_pool(z, (k, k), strides=(k, k))  # noqa: E731
        new = lambda z: layers.max_pool_blocks(z, k)  # noqa: E731
        np.testing.assert_array_equal(np.asarray(new(x)), np.asarray(ref(x)))
        g = rng.normal(size=np.asarray(ref(x)).shape)
        np.testing.assert_array_equal(np.asarray(jax.vjp(new, x)[1](g)[0]), np.asarray(jax.vjp(ref, x)[1](g)[0]))
        t = rng.normal(size=x.shape)
        np.testing.assert_array_equal(np.asarray(jax.jvp(new, (x,), (t,))[1]), np.asarray(jax.jvp(ref, (x,), (t,))[1]))
        # forward over reverse (what input-Hessian measures do) through a smooth function of the pooled map
        xf = rng.normal(size=x.shape)
        hvp = lambda f: jax.jvp(jax.grad(lambda z: jnp.sum(jnp.tanh(f(z)) ** 2)), (xf,), (t,))[1]  # noqa: E731
        np.testing.assert_allclose(np.asarray(hvp(new)), np.asarray(hvp(ref)), rtol=1e-12, atol=1e-14)
    # pool2d takes the block path only where the windows tile the image; elsewhere reduce-window as before
    odd = jnp.asarray(rng.normal(size=(1, 5, 5, 1)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(layers.pool2d(odd, "max", padding="SAME")),
                                  np.asarray(nn.max_pool(odd, (2, 2), strides=(2, 2), padding="SAME")))


# ------------------------------------------------------------------------------------------------
# models: shapes, registry
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("shape", [(2, 28, 28, 1), (2, 32, 32, 3)])
def test_output_shapes(name, shape):
    """Shapes by tracing (jax.eval_shape); values are checked by the behaviour tests below."""
    model = models.make_model(name, num_classes=7, **TINY[name])
    variables = _shapes(model, shape)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 7)
    if name in STATEFUL_MODELS:
        assert "batch_stats" in variables
        mutable = [k for k in variables if k != "params"]  # batch_stats (+ spectral vectors for LCNN)
        logits_t, upd = jax.eval_shape(functools.partial(model.apply, train=True, mutable=mutable), variables, x)
        assert logits_t.shape == (2, 7)
        assert jax.tree_util.tree_structure(upd["batch_stats"]) == \
            jax.tree_util.tree_structure(variables["batch_stats"])
    else:
        assert "batch_stats" not in variables


@pytest.mark.parametrize("name", models.MODELS)
def test_forward_values_finite_and_input_dependent(name):
    model = models.make_model(name, num_classes=7, **TINY[name])
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 28, 28, 1))
    variables = _init(model, x.shape)
    logits = _jit_apply(model)(variables, x)
    assert logits.shape == (2, 7) and bool(jnp.all(jnp.isfinite(logits)))
    assert float(jnp.max(jnp.abs(logits[0] - logits[1]))) > 0.0  # different images, different logits


def test_models_registry_lists_all_names():
    assert set(models.MODELS) >= {"mlp", "ms_mlp", "lenet", "small_cnn", "resnet18", "vgg11"}


def test_lenet_and_ms_configs_layer_shapes():
    p = _shapes(models.make_model("lenet", 10), (1, 28, 28, 1))["params"]
    # SAME first conv: 28 -> 28 -> pool 14 -> VALID conv 10 -> pool 5, so 16 * 5 * 5 = 400 features
    assert p["fc1"]["kernel"].shape == (400, 120)
    assert p["fc2"]["kernel"].shape == (120, 84) and p["head"]["kernel"].shape == (84, 10)
    # classic LeNet-5 parameter count on 28x28x1, every layer with bias
    want = (25 * 6 + 6) + (25 * 6 * 16 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert _count(p) == want

    p = _shapes(models.make_model("ms_mlp", 10), (1, 28, 28, 1))["params"]
    dims = [784, 512, 128, 512, 10]
    assert _count(p) == sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))

    # minimum-sharpness reference "LeNet": pool(2, stride 1) then 120 5x5 conv -> 120*7*7 features
    p = _shapes(models.make_model("ms_lenet", 10), (1, 28, 28, 1))["params"]
    assert p["fc1"]["kernel"].shape == (120 * 7 * 7, 84)
    want = (25 * 6 + 6) + (25 * 6 * 16 + 16) + (25 * 16 * 120 + 120) + (5880 * 84 + 84) + (84 * 10 + 10)
    assert _count(p) == want


def test_resnet18_parameter_count():
    """PyTorch CIFAR ResNet-18 (bias-free convs, BN scale+bias, 512x10 dense): 11,173,962 params."""
    model = models.make_model("resnet18", num_classes=10)
    shapes = _shapes(model, (1, 32, 32, 3))
    conv = lambda k, cin, cout: k * k * cin * cout  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(3, 3, 64) + bn(64)  # stem
    cin = 64
    for i, cout in enumerate((64, 128, 256, 512)):
        for b in range(2):
            total += conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
            if cin != cout:  # 1x1 projection shortcut at the first block of stages 2-4
                total += conv(1, cin, cout) + bn(cout)
            cin = cout
    total += 512 * 10 + 10  # head
    assert total == 11_173_962  # the figure quoted for the PyTorch model
    assert _count(shapes["params"]) == total
    # running mean and var for each of the 20 BN layers' channels (4800 channels in all)
    assert _count(shapes["batch_stats"]) == 2 * 4800


def test_vgg11_parameter_count():
    model = models.make_model("vgg11", num_classes=10)
    shapes = _shapes(model, (1, 32, 32, 3))
    cfg = [c for c in models.VGG11_CFG if c != "M"]
    chans = [3] + cfg
    # bias-free 3x3 convs (BN follows), BN scale + bias, 512 -> 10 dense head
    want = sum(9 * a * b + 2 * b for a, b in zip(chans[:-1], chans[1:])) + 512 * 10 + 10
    assert _count(shapes["params"]) == want


# ------------------------------------------------------------------------------------------------
# models: behaviour
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BN_MODELS)
def test_bn_train_updates_stats_and_eval_is_batch_independent(name):
    model = models.make_model(name, num_classes=5, **TINY[name])
    x = jax.random.uniform(jax.random.PRNGKey(2), (4, 32, 32, 3))
    x_other = x.at[1:].set(jax.random.uniform(jax.random.PRNGKey(3), (3, 32, 32, 3)))
    variables = _init(model, x.shape)

    apply = _jit_apply(model)
    # train mode: returns new running statistics, and example 0 depends on the other examples
    out_a, upd = apply(variables, x, train=True, mutable=("batch_stats",))
    out_b, _ = apply(variables, x_other, train=True, mutable=("batch_stats",))
    old, new = variables["batch_stats"], upd["batch_stats"]
    assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
    changed = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), old, new)
    assert min(jax.tree_util.tree_leaves(changed)) > 0.0  # every BN layer's statistics moved
    assert float(jnp.max(jnp.abs(out_a[0] - out_b[0]))) > 1e-4

    # eval mode: running statistics, so example 0's logits ignore the rest of the batch
    ev_vars = {"params": variables["params"], "batch_stats": new}
    ev_a = apply(ev_vars, x)
    ev_b = apply(ev_vars, x_other)
    np.testing.assert_allclose(np.asarray(ev_a[0]), np.asarray(ev_b[0]), rtol=1e-5, atol=1e-6)
    ev_ref = apply(ev_vars, jnp.concatenate([x[:1], x[:1] + 0.5, x[:1] * 0.1, x[:1] ** 2]))
    np.testing.assert_allclose(np.asarray(ev_a[0]), np.asarray(ev_ref[0]), rtol=1e-5, atol=1e-6)


def test_small_cnn_first_bn_stats_match_conv_output():
    """The first BN's new running mean/var equal 0.1 * the batch moments of conv1's output."""
    model = models.SmallCNN(num_classes=3, width_mult=0.125, norm=layers.BatchNorm)
    x = jax.random.uniform(jax.random.PRNGKey(4), (3, 28, 28, 1))
    variables = _init(model, x.shape)
    _, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=lambda mdl, _: mdl.name == "conv1")
    h = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
    np.testing.assert_allclose(np.asarray(state["batch_stats"]["norm1"]["mean"]),
                               0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state["batch_stats"]["norm1"]["var"]),
                               0.9 + 0.1 * h.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    # with a norm, convolutions carry no bias (BN's shift replaces it); without, they do
    assert "bias" not in variables["params"]["conv1"]
    assert "bias" in _init(models.SmallCNN(num_classes=3, width_mult=0.125), x.shape)["params"]["conv1"]


def test_mlp_identity_activation_is_affine(x64):
    model = models.make_model("mlp", 4, widths=(7, 5), act="identity")
    k1, k2 = jax.random.split(jax.random.PRNGKey(5))
    x1 = jax.random.normal(k1, (3, 4, 4, 1), jnp.float64)
    x2 = jax.random.normal(k2, (3, 4, 4, 1), jnp.float64)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), _init(model, x1.shape))
    f = lambda x: model.apply(params, x)  # noqa: E731
    for a in (0.3, -1.7, 2.5):
        np.testing.assert_allclose(np.asarray(f(a * x1 + (1 - a) * x2)),
                                   np.asarray(a * f(x1) + (1 - a) * f(x2)), rtol=1e-10, atol=1e-10)
    # the same combination fails for ReLU, so the identity above is not vacuous
    relu_model = models.make_model("mlp", 4, widths=(7, 5), act="relu")
    g = lambda x: relu_model.apply(params, x)  # noqa: E731
    gap = jnp.max(jnp.abs(g(-1.7 * x1 + 2.7 * x2) - (-1.7 * g(x1) + 2.7 * g(x2))))
    assert float(gap) > 1e-3


def test_mlp_softplus_by_name_matches_closed_form():
    model = models.make_model("mlp", 3, widths=(6,), act="softplus", act_kwargs={"beta": 10.0},
                              output_activation="sigmoid")
    x = jax.random.uniform(jax.random.PRNGKey(6), (4, 5, 5, 1))
    params = model.init(KEY, x)["params"]  # the real initialiser, on a model small enough to be cheap
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    xf = np.asarray(x, np.float64).reshape(4, -1)
    h = np.logaddexp(0.0, 10.0 * (xf @ p["dense0"]["kernel"] + p["dense0"]["bias"])) / 10.0
    want = 1.0 / (1.0 + np.exp(-(h @ p["head"]["kernel"] + p["head"]["bias"])))
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x)), want, rtol=1e-5, atol=1e-6)


def test_small_cnn_pool_choice_matters():
    x = jax.random.uniform(jax.random.PRNGKey(7), (2, 28, 28, 1))
    m_max = models.make_model("small_cnn", 4, width_mult=0.125, pool="max")
    m_avg = models.make_model("small_cnn", 4, width_mult=0.125, pool="avg")
    variables = _init(m_max, x.shape)  # same parameter structure for both
    gap = jnp.max(jnp.abs(m_max.apply(variables, x) - m_avg.apply(variables, x)))
    assert float(gap) > 1e-5


# ------------------------------------------------------------------------------------------------
# pluggability
# ------------------------------------------------------------------------------------------------
class CountingAct(nn.Module):
    """A trainable-per-site activation: one scalar parameter per site, softplus-like forward."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = self.param("site", nn.initializers.ones, ())
        return jax.nn.softplus(a * x) / a


class CountingConv(nn.Module):
    """A conv drop-in accepting the documented constructor keywords, with a per-site marker."""

    features: int
    kernel_size: tuple
    strides: tuple = (1, 1)
    padding: str = "SAME"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        self.param("conv_site", nn.initializers.zeros, ())
        return nn.Conv(self.features, self.kernel_size, self.strides, self.padding,
                       use_bias=self.use_bias)(x)


class SpyNorm(nn.Module):
    """A stateful norm drop-in that records (by sowing) whether it was called in training mode."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        self.variable("batch_stats", "dummy", lambda: jnp.zeros(()))
        if train:
            self.sow("spy", "train_seen", jnp.ones(()))
        return x


# expected sites: (activations, convolutions, norms)
SITES = {
    "mlp": (2, 0, 0),        # widths (8, 6)
    "lenet": (4, 2, 0),      # conv, conv, fc120, fc84
    "small_cnn": (3, 2, 0),  # conv, conv, fc1024
    "resnet18": (17, 20, 20),  # stem + 2 per block x 8; stem + 16 + 3 projections
    "vgg11": (8, 8, 8),
}


@pytest.mark.parametrize("name", list(SITES))
def test_custom_factories_one_module_per_site(name):
    n_act, n_conv, n_norm = SITES[name]
    kwargs = dict(TINY[name], act=CountingAct)
    if n_conv:
        kwargs["conv"] = CountingConv
    if n_norm:
        kwargs["norm"] = SpyNorm
    model = models.make_model(name, 3, **kwargs)
    variables = _shapes(model, (2, 32, 32, 3))
    assert len(_leaves_named(variables["params"], "site")) == n_act
    assert len(_leaves_named(variables["params"], "conv_site")) == n_conv
    if n_norm:
        x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
        for train, expected in ((True, n_norm), (False, 0)):  # train reached every norm, eval none
            _, upd = jax.eval_shape(functools.partial(model.apply, train=train, mutable=["spy"]),
                                    variables, x)
            assert len(jax.tree_util.tree_leaves(upd)) == expected


def test_output_activation_adds_a_site():
    model = models.MLP(widths=(4, 4, 4), num_classes=2, act=CountingAct, output_activation=CountingAct)
    assert len(_leaves_named(_shapes(model, (1, 3, 3, 1))["params"], "site")) == 4


class LCNNStyleBlock(nn.Module):
    """out = act(0.5 * (conv2(act(conv1(x / sqrt2))) + shortcut(x / sqrt2))), norms omitted."""

    features: int
    strides: int
    conv: object
    norm: object
    act: object

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = (self.strides, self.strides)
        x = x / jnp.sqrt(2.0)
        y = self.conv(features=self.features, kernel_size=(3, 3), strides=s, padding="SAME",
                      use_bias=False, name="lc_conv1")(x, train=train)
        y = self.act(name="lc_act1")(y, train=train)
        y = self.conv(features=self.features, kernel_size=(3, 3), strides=(1, 1), padding="SAME",
                      use_bias=False, name="lc_conv2")(y, train=train)
        sc = x
        if self.strides != 1 or x.shape[-1] != self.features:
            sc = self.conv(features=self.features, kernel_size=(1, 1), strides=s, padding="SAME",
                           use_bias=False, name="lc_short")(x, train=train)
        return self.act(name="lc_act2")(0.5 * (y + sc), train=train)


def test_resnet_block_is_swappable():
    model = models.make_model("resnet18", 3, width_mult=1 / 16, block=LCNNStyleBlock, norm="none",
                              act="softplus", act_kwargs={"beta": 5.0})
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = _shapes(model, x.shape)
    blocks = [k for k in variables["params"] if k.startswith("stage")]
    assert len(blocks) == 8
    assert all("lc_conv1" in variables["params"][b] for b in blocks)
    assert sum("lc_short" in variables["params"][b] for b in blocks) == 3
    assert "batch_stats" not in variables  # norm='none' really removed every norm
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 3)


# ------------------------------------------------------------------------------------------------
# make_model errors
# ------------------------------------------------------------------------------------------------
def test_make_model_errors():
    with pytest.raises(ValueError, match="resnet18"):
        models.make_model("resnet50", 10)
    with pytest.raises(ValueError, match="width_mult"):
        models.make_model("small_cnn", 10, depth=3)
    with pytest.raises(ValueError, match="widths"):  # MLP has no norm; the message lists its kwargs
        models.make_model("mlp", 10, norm="batch")
    with pytest.raises(ValueError, match="relu"):
        models.make_model("lenet", 10, act="gelu")
    with pytest.raises(ValueError, match="none"):
        models.make_model("resnet18", 10, norm="group")
    with pytest.raises(ValueError, match="beta"):
        models.make_model("lenet", 10, act="relu", act_kwargs={"beta": 3.0})
    with pytest.raises(ValueError, match="num_classes"):
        models.make_model("lenet", 0)
    with pytest.raises(ValueError, match="NHWC"):
        models.make_model("lenet", 10).init(KEY, jnp.zeros((28, 28)))
