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
