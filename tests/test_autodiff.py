"""Matrix-free products against closed-form Jacobians and Hessians (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax import autodiff as ad


def _mlp_and_jacobian(seed, n_in, n_hidden, n_out):
    """f(x) = W2 tanh(W1 x + b1) + b2 and its closed-form Jacobian W2 diag(1 - tanh^2) W1 (numpy)."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((n_hidden, n_in)), rng.standard_normal(n_hidden)
    w2, b2 = rng.standard_normal((n_out, n_hidden)), rng.standard_normal(n_out)

    def f(x):
        return jnp.asarray(w2) @ jnp.tanh(jnp.asarray(w1) @ x.reshape(-1) + b1) + b2

    def jac(x):
        t = np.tanh(w1 @ np.asarray(x).reshape(-1) + b1)
        return w2 @ ((1 - t**2)[:, None] * w1)

    return f, jac


def _quadratic_cosine_loss(seed, n):
    """loss(x) = 0.5 x^T Q x + sum(cos x): gradient Q x - sin x, Hessian Q - diag(cos x)."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n))
    q = m + m.T

    def loss(x):
        return 0.5 * x @ (jnp.asarray(q) @ x) + jnp.sum(jnp.cos(x))

    def hess(x):
        return q - np.diag(np.cos(np.asarray(x)))

    return loss, hess


def test_input_jvp_and_vjp_match_closed_form_jacobian(x64):
    f, jac = _mlp_and_jacobian(0, 12, 7, 5)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 4)))  # non-flat example shape
    v = jnp.asarray(rng.standard_normal((3, 4)))
    u = jnp.asarray(rng.standard_normal(5))
    j = jac(x)
    np.testing.assert_allclose(ad.input_jvp(f, x, v), j @ np.asarray(v).reshape(-1), rtol=1e-12)
    vjp = ad.input_vjp(f, x, u)
    assert vjp.shape == (3, 4)
    np.testing.assert_allclose(np.asarray(vjp).reshape(-1), j.T @ np.asarray(u), rtol=1e-12)


def test_input_hvp_matches_closed_form_hessian(x64):
    loss, hess = _quadratic_cosine_loss(2, 6)
    rng = np.random.default_rng(3)
    x, v = jnp.asarray(rng.standard_normal(6)), jnp.asarray(rng.standard_normal(6))
    expected = hess(x) @ np.asarray(v)
    np.testing.assert_allclose(ad.input_hvp(loss, x, v), expected, rtol=1e-12)
    g, hvp = ad.linearized_input_hvp(loss, x)
    np.testing.assert_allclose(hvp(v), expected, rtol=1e-12)
    np.testing.assert_allclose(hvp(2 * v), 2 * expected, rtol=1e-12)  # reused linearisation
    np.testing.assert_allclose(g, np.asarray(jnp.asarray(hess(x) + np.diag(np.cos(x))) @ x) - np.sin(x), rtol=1e-12)


def test_param_hvp_on_pytree_matches_closed_form(x64):
    rng = np.random.default_rng(4)
    b = jnp.asarray(rng.standard_normal((3, 2)))
    params = {"a": jnp.asarray(rng.standard_normal(3)), "c": jnp.asarray(rng.standard_normal(2))}
    v = {"a": jnp.asarray(rng.standard_normal(3)), "c": jnp.asarray(rng.standard_normal(2))}

    def loss(p):  # H = [[diag(6a), B], [B^T, 0]]
        return jnp.sum(p["a"] ** 3) + p["a"] @ (b @ p["c"])

    hv = ad.param_hvp(loss, params, v)
    np.testing.assert_allclose(hv["a"], 6 * params["a"] * v["a"] + b @ v["c"], rtol=1e-12)
    np.testing.assert_allclose(hv["c"], b.T @ v["a"], rtol=1e-12)
    _, hvp = ad.linearized_param_hvp(loss, params)
    jax.tree_util.tree_map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-12), hvp(v), hv)


@pytest.mark.parametrize("batch_size", [None, 4, 7, 10])
def test_batched_input_hvp_per_example_with_uneven_chunks(x64, batch_size):
    loss, hess = _quadratic_cosine_loss(5, 4)
    rng = np.random.default_rng(6)
    xs, vs = jnp.asarray(rng.standard_normal((7, 4))), jnp.asarray(rng.standard_normal((7, 4)))
    ys = jnp.arange(1.0, 8.0)
    out = ad.batched_input_hvp(lambda x, y: y * loss(x), xs, ys, vs, batch_size=batch_size)
    expected = np.stack([ys[i] * hess(xs[i]) @ np.asarray(vs[i]) for i in range(7)])
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_per_example_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        ad.per_example(lambda x: x, batch_size=0)


def test_safe_norm_value_and_gradient_at_zero():
    np.testing.assert_allclose(ad.safe_norm(jnp.array([3.0, 4.0])), 5.0)
    g = jax.grad(ad.safe_norm)(jnp.zeros(3))
    assert np.all(np.asarray(g) == 0.0)
    np.testing.assert_allclose(jax.grad(ad.safe_norm)(jnp.array([3.0, 4.0])), [0.6, 0.8], rtol=1e-6)


def test_validation_helpers():
    with pytest.raises(ValueError, match="at least one example axis"):
        ad.check_example_batch(jnp.ones(5))
    with pytest.raises(ValueError, match="floating"):
        ad.check_example_batch(jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="NaN"):
        ad.check_example_batch(jnp.array([[1.0, jnp.nan]]))
    with pytest.raises(ValueError, match="same leading"):
        ad.check_labels(jnp.ones((3, 2)), jnp.ones(4))
    with pytest.raises(ValueError, match="positive integer"):
        ad.check_positive_int(0, "num_iters")
    assert ad.check_positive_int(None, "batch_size", allow_none=True) is None
