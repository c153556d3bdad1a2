"""lcnn_jax.loops: the one place that decides how loops run per backend, and the host-driven parameter-Hessian
estimates it selects (the same values as the one-program path, from one compiled HVP)."""
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax import loops, report
from lcnn_jax.errors import ConfigError
from lcnn_jax.measures import hessian_top_eigenvalues, hessian_trace
from lcnn_jax.nn import make_model


def _conv_loss():
    kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 1, 2), jnp.float64)
    xs = jax.random.uniform(jax.random.PRNGKey(1), (4, 6, 6, 1), jnp.float64)

    def loss(p):
        h = jax.lax.conv_general_dilated(xs, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean(jnp.tanh(h) ** 2) + 0.1 * jnp.sum(p["w"] ** 2 * jnp.sin(p["w"]))

    return loss, {"k": kernel, "w": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64)}


def test_auto_unroll_and_member_loop_rules(monkeypatch):
    monkeypatch.setattr(loops, "MAX_AUTO_UNROLL", 20)
    assert loops.auto_unroll(20) is True and loops.auto_unroll(21) is False and loops.auto_unroll(50, 5) == 5
    kw = dict(member_shards=1, num_members=4, convolves=True)
    assert loops.member_loop("auto", platform="cpu", **kw) == "unroll"
    assert loops.member_loop("auto", platform="gpu", **kw) == "vmap"
    assert loops.member_loop("auto", platform="cpu", **{**kw, "convolves": lambda: False}) == "vmap"
    assert loops.member_loop("auto", platform="cpu", **{**kw, "num_members": 17}) == "vmap"
    assert loops.member_loop("vmap", platform="cpu", **kw) == "vmap"
    with pytest.raises(ConfigError, match="member_loop='loop' is unknown"):
        loops.member_loop("loop", platform="cpu", **kw)


def test_host_loop_rule(x64):
    loss, params = _conv_loss()
    assert loops.host_loop(None, loss, params) == (loops.default_platform() == "cpu")
    assert loops.host_loop(None, lambda p: jnp.sum(p["w"] ** 3), params) is False  # no convolution
    assert loops.host_loop(False, loss, params) is False and loops.host_loop(True, lambda p: 0.0, params) is True
    seen = []
    jax.jit(lambda p: seen.append(loops.host_loop(None, loss, p)) or 0.0)(params)  # inside a trace: no host loop
    assert seen == [False]


@pytest.mark.slow  # a long oracle test: CI runs it with -m slow (the default suite stays < 3 min)
def test_host_driven_hessian_estimates_equal_the_traced_ones(x64):
    loss, params = _conv_loss()
    key = jax.random.PRNGKey(3)
    for kw in ({}, {"tol": 0.05}):
        a = hessian_trace(loss, params, key=key, num_probes=12, host_loop=True, **kw)
        b = hessian_trace(loss, params, key=key, num_probes=12, host_loop=False, **kw)
        np.testing.assert_allclose([a.estimate, a.standard_error], [b.estimate, b.standard_error], rtol=1e-10)
        assert int(a.num_probes) == int(b.num_probes)
    a = hessian_top_eigenvalues(loss, params, key=key, k=2, num_iters=12, host_loop=True)
    b = hessian_top_eigenvalues(loss, params, key=key, k=2, num_iters=12, host_loop=False)
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9)
    # and both against the dense Hessian (Lanczos with 12 steps on 23 parameters: the top eigenvalue is exact)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    dense = jax.hessian(lambda f: loss(unravel(f)))(flat)
    np.testing.assert_allclose(a.eigenvalues[0], np.linalg.eigvalsh(np.asarray(dense))[-1], rtol=1e-6)


@pytest.mark.slow  # a long oracle test: CI runs it with -m slow (the default suite stays < 3 min)
def test_report_parameter_hessian_host_path_equals_the_one_program_path():
    model = make_model("small_cnn", 10, width_mult=0.125)
    xs = jax.random.uniform(jax.random.PRNGKey(0), (8, 28, 28, 1))
    ys = jnp.arange(8) % 10
    variables = model.init(jax.random.PRNGKey(1), xs)
    cfg = report.measure_defaults()
    cfg.hessian_probes, cfg.hessian_lanczos_iters = 3, 4
    out = {}
    for host in (True, False):
        cfg.hessian_host_loop = host
        out[host] = report.parameter_hessian(model, variables, xs, ys, cfg, jax.random.PRNGKey(2))
    for item in ("hessian_trace", "hessian_top_eigenvalue"):
        np.testing.assert_allclose(out[True][item]["mean"], out[False][item]["mean"], rtol=2e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ materialize
def test_materialize_is_the_identity_in_value_and_every_derivative(x64):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4), jnp.float64)

    def f(v, store):
        h = jnp.tanh(1.5 * v) * v
        return jnp.sum(jnp.sin(loops.materialize(h) if store else h) ** 3)

    np.testing.assert_array_equal(jax.jit(lambda v: loops.materialize(jnp.exp(v)))(x), jnp.exp(x))
    np.testing.assert_array_equal(jax.jit(jax.vmap(loops.materialize))(x), x)
    odd = x.at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
    np.testing.assert_array_equal(jax.jit(loops.materialize)(odd), odd)
    for transform in (jax.grad, jax.hessian):  # oracle: the same function without it (float64; fusion may reorder)
        np.testing.assert_allclose(jax.jit(transform(lambda v: f(v, True)))(x), transform(lambda v: f(v, False))(x),
                                   rtol=1e-12, atol=1e-14)
    t = jnp.ones_like(x)
    np.testing.assert_array_equal(jax.jvp(lambda v: f(v, True), (x,), (t,))[1],
                                  jax.jvp(lambda v: f(v, False), (x,), (t,))[1])
    ints = jnp.arange(3)
    assert loops.materialize(ints) is ints  # only inexact arrays are stored


def test_materialize_stores_on_the_cpu_only(monkeypatch):
    x = jnp.ones((2, 3))
    lowered = jax.jit(loops.materialize).trace(x)
    assert "while" in lowered.lower().as_text()
    assert "while" not in lowered.lower(lowering_platforms=("tpu",)).as_text()  # nothing at all elsewhere
    monkeypatch.setattr(loops, "MATERIALIZE", False)
    assert loops.materialize(x) is x


def _forward_ops_in_transposes(monkeypatch, materialize: bool) -> int:
    """Activation-shaped forward-pass operations that XLA:CPU fused into the transposes of a ResNet's gradient."""
    import re
    monkeypatch.setattr(loops, "MATERIALIZE", materialize)
    from lcnn_jax.nn import layers, models
    model = models.ResNet(num_classes=10, stage_sizes=(2, 1), width_mult=1 / 16,
                          act=layers.activation("softplus", beta=5.0))
    x = jnp.zeros((4, 8, 8, 3))
    variables = model.init(jax.random.PRNGKey(0), x)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(out ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
    return sum(len(re.findall(r'= f32\[4,\d+,\d+,\d+\]\S* \w+\(.*op_name="jit\(loss\)/jvp\(', block))
               for block in hlo.split("\n\n") if block.startswith("%fused") and "transpose(" in block)


@pytest.mark.slow  # two optimised ResNet compilations (~5 s): CI runs it with -m slow (default suite < 3 min)
def test_resnet_blocks_are_not_recomputed_inside_the_backward_transposes(monkeypatch):
    # The plain ResNet block stores its input (loops.materialize); without it XLA:CPU recomputed the residual chain
    # (batch norms, softplus) inside the strided transposes of the weight gradients (bench_resnet.py's _fused rows).
    fused = _forward_ops_in_transposes(monkeypatch, False)
    if fused == 0:
        pytest.skip("this XLA does not fuse the forward pass into the transposes; nothing to check")
    assert _forward_ops_in_transposes(monkeypatch, True) <= fused / 2
