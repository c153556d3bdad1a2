"""lcnn_jax.nn.conv: convolutions with few input taps (a network's first layer on grey or RGB images) computed as
sums of shifted images on the CPU. The oracle is ``lax.conv_general_dilated`` in float64: the same values and the
same derivative of every order, in forward and reverse mode, whichever path runs."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax.nn import conv, layers

DN = ("NHWC", "HWIO", "NHWC")
# (input shape, kernel shape, padding): grey 5x5 SAME (the small CNN's and LeNet's first layer), RGB 3x3 SAME (the
# ResNet stem), VALID, a non-square kernel with uneven explicit padding, and two input channels.
CASES = [((2, 7, 6, 1), (5, 5, 1, 3), "SAME"), ((2, 5, 5, 3), (3, 3, 3, 4), "SAME"),
         ((1, 6, 7, 1), (3, 3, 1, 2), "VALID"), ((2, 6, 5, 1), (3, 5, 1, 2), ((0, 2), (1, 3))),
         ((2, 5, 4, 2), (2, 3, 2, 3), ((1, 0), (2, 1)))]


def _oracle(x, w, padding):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN)


def _ours(x, w, padding):
    return conv.conv_nhwc(x, w, (1, 1), padding)


def _close(got, want, **tol):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), got, want)


def _draw(case, dtype):
    xs, ws, padding = case
    x = jax.random.normal(jax.random.PRNGKey(0), xs, dtype)
    w = jax.random.normal(jax.random.PRNGKey(1), ws, dtype)
    return x, w, padding


# the grey case runs by default; the rest with the slow group (each case compiles ~12 float64 programs, a few
# seconds: the default suite stays under 3 minutes)
@pytest.mark.parametrize("case", [c if i == 0 else pytest.param(c, marks=pytest.mark.slow)
                                  for i, c in enumerate(CASES)])
def test_few_channel_path_gives_the_convolution_and_every_derivative(case, x64):
    x, w, padding = _draw(case, jnp.float64)
    assert conv.uses_few_channel_path(x.shape, w.shape, (1, 1), padding)
    f, g = jax.jit(functools.partial(_ours, padding=padding)), functools.partial(_oracle, padding=padding)
    tol = dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f(x, w), g(x, w), **tol)

    c = jnp.cos(jnp.arange(g(x, w).size, dtype=x.dtype)).reshape(g(x, w).shape)

    def loss(fn):  # a nonlinear scalar of the output, so that second derivatives are not zero
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w)) * c)

    for argnums in (0, 1, (0, 1)):  # reverse mode: input, weight and both gradients
        _close(jax.jit(jax.grad(loss(f), argnums))(x, w), jax.grad(loss(g), argnums)(x, w), **tol)
    tx, tw = jnp.cos(x), jnp.sin(w)  # forward mode in both arguments together
    np.testing.assert_allclose(jax.jvp(f, (x, w), (tx, tw))[1], jax.jvp(g, (x, w), (tx, tw))[1], **tol)
    # second order: an input-Hessian-vector product by forward-over-reverse, and double backpropagation (the
    # gradient with respect to the weights of the input gradient's squared norm, as gradient regularizers take it)
    hvp = lambda fn: jax.jvp(lambda v: jax.grad(loss(fn))(v, w), (x,), (tx,))[1]  # noqa: E731
    np.testing.assert_allclose(jax.jit(lambda: hvp(f))(), hvp(g), **tol)
    double = lambda fn: jax.grad(lambda k: jnp.sum(jax.grad(loss(fn))(x, k) ** 2))(w)  # noqa: E731
    np.testing.assert_allclose(jax.jit(lambda: double(f))(), double(g), **tol)


def test_few_channel_path_in_float32_and_under_vmap():
    x, w, padding = _draw(CASES[0], jnp.float32)
    # float32: each output sums 25 products in another order than XLA's convolution (a few ulps of the largest term)
    np.testing.assert_allclose(jax.jit(_ours, static_argnums=2)(x, w, padding), _oracle(x, w, padding),
                               rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(x))) * float(jnp.max(jnp.abs(w))))
    ws = jnp.stack([w, 2.0 * w, -w])  # a sweep's members: one kernel each, the same images
    got = jax.jit(jax.vmap(lambda k: jax.grad(lambda v: jnp.sum(_ours(v, k, padding) ** 2))(x)))(ws)
    want = jnp.stack([jax.grad(lambda v: jnp.sum(_oracle(v, k, padding) ** 2))(x) for k in ws])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def _ops(fn, *args, platform=None):
    lowered = jax.jit(fn).trace(*args)
    return (lowered.lower() if platform is None else lowered.lower(lowering_platforms=(platform,))).as_text()


def test_the_cpu_runs_no_convolution_for_few_input_taps_and_other_platforms_and_layers_keep_theirs(monkeypatch):
    x, w, padding = _draw(CASES[0], jnp.float32)
    input_grad = jax.grad(lambda v: jnp.sum(_ours(v, w, padding) ** 2))
    assert "convolution" not in _ops(input_grad, x)  # forward and input gradient: shifted sums and one matmul
    assert "convolution" in _ops(input_grad, x, platform="tpu")  # accelerators keep their convolutions
    wide = jnp.ones((2, 7, 6, 8))  # 8 channels x 25 taps: past MAX_TAPS, a convolution as before
    assert not conv.uses_few_channel_path(wide.shape, (5, 5, 8, 3), (1, 1), "SAME")
    assert "convolution" in _ops(lambda v: _ours(v, jnp.ones((5, 5, 8, 3)), "SAME"), wide)
    assert not conv.uses_few_channel_path(x.shape, w.shape, (2, 2), "SAME")  # strided: a convolution
    assert "convolution" in _ops(lambda v: conv.conv_nhwc(v, w, (2, 2), "SAME"), x)
    monkeypatch.setattr(conv, "FEW_CHANNEL_CONV", False)
    assert not conv.uses_few_channel_path(x.shape, w.shape, (1, 1), padding)
    assert "convolution" in _ops(lambda v: _ours(v, w, padding), x)


def test_flax_conv_layer_takes_the_path_and_keeps_flax_semantics():
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1))
    ours = layers.Conv(features=4, kernel_size=(3, 3), padding="SAME")
    variables = ours.init(jax.random.PRNGKey(1), x)
    plain = jax.lax.conv_general_dilated(x, variables["params"]["kernel"], (1, 1), "SAME", dimension_numbers=DN)
    np.testing.assert_allclose(ours.apply(variables, x), plain + variables["params"]["bias"], rtol=1e-5, atol=1e-6)
    assert "convolution" not in _ops(lambda v: ours.apply(variables, v), x)
    # anything the shifted sums do not cover goes to lax unchanged: dilation, groups
    dilated = layers.Conv(features=4, kernel_size=(3, 3), kernel_dilation=2, padding="SAME")
    vd = dilated.init(jax.random.PRNGKey(1), x)
    want = jax.lax.conv_general_dilated(x, vd["params"]["kernel"], (1, 1), "SAME", rhs_dilation=(2, 2),
                                        dimension_numbers=DN) + vd["params"]["bias"]
    np.testing.assert_allclose(dilated.apply(vd, x), want, rtol=1e-6, atol=1e-6)


def test_conv_nhwc_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="NHWC"):
        conv.conv_nhwc(jnp.ones((2, 8, 8)), jnp.ones((3, 3, 1, 2)), (1, 1), "SAME")
    with pytest.raises(ValueError, match="input channels"):
        conv.conv_nhwc(jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 1, 2)), (1, 1), "SAME")


class _Tiny(nn.Module):  # conv (1 channel, 3x3) -> softplus -> dense: a smooth model the bound walker reads
    @nn.compact
    def __call__(self, x, train=False):
        x = jax.nn.softplus(layers.Conv(features=2, kernel_size=(3, 3), name="conv")(x))
        return layers.Dense(features=3, name="head")(x.reshape(x.shape[0], -1))


def test_bounds_and_spectral_norms_read_the_convolution_through_the_fast_path(monkeypatch):
    from lcnn_jax.measures import bounds
    from lcnn_jax.nn import lcnn

    model = _Tiny()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 1)))
    spectral = lcnn.SpectralConv(features=2, kernel_size=(3, 3), n_init_iter=30)
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 5, 5, 1))

    def measure():
        res = bounds.curvature_bound(model, variables, (5, 5, 1), key=jax.random.PRNGKey(1))
        sv = spectral.init(jax.random.PRNGKey(3), x)
        return dict(res.layers)["conv/conv"], res.curvature, spectral.apply(sv, x)

    fast = measure()
    assert "convolution" not in _ops(lambda v: spectral.apply(spectral.init(jax.random.PRNGKey(3), x), v), x)
    monkeypatch.setattr(conv, "FEW_CHANNEL_CONV", False)
    plain = measure()
    # the bound walker reads lax.platform_dependent's portable branch: the very same convolution norm bound
    assert fast[0] == plain[0]
    np.testing.assert_allclose(fast[1], plain[1], rtol=1e-6)
    # the power iteration transposes through the derivative rules: the same sigma to float32 rounding
    np.testing.assert_allclose(fast[2], plain[2], rtol=1e-4, atol=1e-5)
