"""Certified robust accuracy (lcnn_jax.measures.certified) and the pairwise margin bounds it reads from
lcnn_jax.measures.bounds.

Oracles: for a linear classifier the exact L2 distance to the nearest decision boundary (``min_j g_j / ||w_y - w_j||``,
float64); the exact head matrix (NumPy SVD / column differences) for the pairwise bounds; and attacks: a certificate
that APGD breaks, or a bound below a local Lipschitz estimate measured on data, would be a bug.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax import attacks
from lcnn_jax.measures import certified, function_bound

SQRT2 = math.sqrt(2.0)


def _tanh_mlp(seed, n_in=16, n_hidden=12, n_cls=4, spectral_head=False):
    """A smooth two-layer network and its weights: logits = tanh(x W1 + b1) W2 (/ sigma) + b2."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((n_in, n_hidden)) / np.sqrt(n_in) * 3.0
    b1 = rng.standard_normal(n_hidden) * 0.1
    w2 = rng.standard_normal((n_hidden, n_cls)) * 1.5
    b2 = rng.standard_normal(n_cls) * 0.1
    sigma = np.linalg.norm(w2, 2) if spectral_head else 1.0
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731

    def logits_fn(xs):
        h = jnp.tanh(xs.reshape(xs.shape[0], -1) @ f32(w1) + f32(b1))
        return (h @ f32(w2)) / f32(sigma) + f32(b2)

    as_used = lambda a: np.asarray(np.float32(a), np.float64)  # noqa: E731  (the weights the model computes with)
    return logits_fn, (as_used(w1), as_used(w2) / as_used(sigma))


def _images(seed, n, shape=(4, 4, 1)):
    return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (n, *shape)), jnp.float32)


# ------------------------------------------------------------------------------------------- pairwise bounds
@pytest.mark.parametrize("spectral_head", [False, True])
def test_pairwise_bounds_are_the_head_column_differences_times_the_feature_bound(spectral_head):
    logits_fn, (w1, w2) = _tanh_mlp(0, spectral_head=spectral_head)
    res = function_bound(logits_fn, jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32))
    l_h = np.linalg.norm(w1, 2)  # tanh is 1-Lipschitz: the head's input has slope <= ||W1||_2
    assert res.head_input.lipschitz == pytest.approx(l_h, rel=1e-5) and res.head_input.lipschitz >= l_h
    k = w2.shape[1]
    diff = np.array([[np.linalg.norm(w2[:, i] - w2[:, j]) for j in range(k)] for i in range(k)])
    pair = np.asarray(res.pairwise_lipschitz, np.float64)
    expected = np.minimum(diff * l_h, SQRT2 * res.network.lipschitz)
    np.testing.assert_allclose(pair, expected, rtol=5e-5)  # the safety factors (1 + 64 eps32) per factor
    assert np.all(pair >= expected * (1 - 1e-7))  # an upper bound, never below the exact product
    assert np.all(np.diag(pair) == 0) and np.allclose(pair, pair.T)
    # the curvature of each difference: ||w_i - w_j|| times the features' curvature, tanh's 4/(3 sqrt3) ||W1||^2
    k_h = 4 / (3 * math.sqrt(3)) * l_h ** 2
    np.testing.assert_allclose(np.asarray(res.pairwise_curvature),
                               np.minimum(diff * k_h, SQRT2 * res.network.curvature), rtol=5e-5)


def test_pairwise_bounds_are_exact_for_a_linear_classifier_and_absent_without_a_dense_head():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((10, 5)).astype(np.float32).astype(np.float64)
    res = function_bound(lambda x: x @ jnp.asarray(w, jnp.float32) * 2.0 + 1.0,
                         jax.ShapeDtypeStruct((1, 10), jnp.float32))
    diff = 2.0 * np.array([[np.linalg.norm(w[:, i] - w[:, j]) for j in range(5)] for i in range(5)])
    np.testing.assert_allclose(np.asarray(res.pairwise_lipschitz), diff, rtol=5e-5)
    assert np.all(np.asarray(res.pairwise_lipschitz) >= diff * (1 - 1e-7))
    assert float(np.max(np.asarray(res.pairwise_curvature))) == 0.0
    # ends in a nonlinearity: no affine head, no pairwise bounds (certificates fall back to sqrt(2) L)
    res2 = function_bound(lambda x: jnp.tanh(x @ jnp.asarray(w, jnp.float32)),
                          jax.ShapeDtypeStruct((1, 10), jnp.float32))
    assert res2.pairwise_lipschitz is None


# ------------------------------------------------------------------------------------------- certificates
def test_certified_radius_of_a_linear_classifier_is_the_exact_distance_to_the_boundary():
    rng = np.random.default_rng(2)
    w, b = (rng.standard_normal(s).astype(np.float32).astype(np.float64) for s in ((12, 4), (4,)))
    logits_fn = lambda xs: xs.reshape(len(xs), -1) @ jnp.asarray(w, jnp.float32) + jnp.asarray(b, jnp.float32)  # noqa
    xs = jnp.asarray(rng.uniform(0, 1, (64, 12)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 4, 64))
    bound = function_bound(lambda x: logits_fn(x), jax.ShapeDtypeStruct((1, 12), jnp.float32))
    cert = certified.certify(logits_fn, xs, ys, bound, batch_size=24)
    z = np.asarray(xs, np.float64) @ w + b
    y = np.asarray(ys)
    exact = np.zeros(64)
    for n in range(64):
        g = z[n, y[n]] - z[n]
        dist = [g[j] / np.linalg.norm(w[:, y[n]] - w[:, j]) for j in range(4) if j != y[n]]
        exact[n] = max(min(dist), 0.0)
    np.testing.assert_allclose(cert.radius, exact, rtol=1e-4, atol=1e-5)
    assert np.all(cert.radius <= exact * (1 + 1e-4) + 1e-6)
    # the global sqrt(2) L certificate is the weaker one; both are zero exactly on the misclassified examples
    assert np.all(cert.lipschitz_radius <= cert.radius + 1e-7)
    np.testing.assert_array_equal(cert.radius > 0, np.argmax(z, 1) == y)
    assert cert.accuracy(0.0) == pytest.approx(np.mean(np.argmax(z, 1) == y))
    eps = float(np.median(exact[exact > 0]))
    assert cert.accuracy(eps) == pytest.approx(np.mean(cert.radius > eps))


def test_curvature_radius_solves_the_second_order_condition():
    rng = np.random.default_rng(3)
    g, grad, k = rng.uniform(0.1, 3, 200), rng.uniform(0, 4, 200), rng.uniform(0, 50, 200)
    k[:20] = 0.0
    r = certified.curvature_radius(g, grad, k)
    np.testing.assert_allclose(g - grad * r - 0.5 * k * r ** 2, 0.0, atol=1e-9)
    np.testing.assert_allclose(r[:20], g[:20] / grad[:20])
    assert np.all(certified.curvature_radius(-g, grad, k) == 0.0)


def test_certificates_are_never_broken_by_apgd_and_bounds_exceed_local_estimates():
    """On a smooth network: every example certified at eps (Lipschitz or curvature certificate) survives APGD-L2
    (CE and DLR, the worst case) at eps; the Lipschitz bounds used exceed the local estimates on the data and on
    the adversarial points APGD found."""
    logits_fn, _ = _tanh_mlp(4, spectral_head=True)
    xs = _images(5, 48)
    ys = jnp.argmax(logits_fn(xs), axis=-1)  # every example correct: the certificates decide
    ys = ys.at[:4].set((ys[:4] + 1) % 4)  # ... but for four
    bound = function_bound(logits_fn, jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32))
    cert = certified.certify(logits_fn, xs, ys, bound, batch_size=48)
    assert cert.curvature_radius is not None and np.all(cert.radius[:4] == 0)
    assert np.any(cert.curvature_radius > cert.lipschitz_radius)  # the second-order certificate helps somewhere
    # eps is an argument: one compilation per loss for both radii
    attack = {loss: jax.jit(lambda x, y, k, eps, loss=loss: attacks.apgd(logits_fn, x, y, norm="l2", eps=eps,
                                                                          num_steps=25, loss=loss, key=k))
              for loss in ("ce", "dlr")}
    correct = lambda x: np.array(jnp.argmax(logits_fn(x), axis=-1) == ys)  # noqa: E731
    adv_points = []
    for i, eps in enumerate(np.quantile(cert.radius[cert.radius > 0], [0.25, 0.75])):
        robust = correct(xs)
        for loss, run in attack.items():
            x_adv = run(xs, ys, jax.random.key(i), jnp.float32(eps))
            robust &= correct(x_adv)
            adv_points.append(x_adv)
        certified_here = cert.radius > eps
        assert 0 < certified_here.sum() < len(xs) and robust.sum() > certified_here.sum()
        assert np.all(robust[certified_here]), "an attack broke a certificate"
        assert cert.accuracy(float(eps)) <= robust.mean()
    # the local Lipschitz constant at each point, ||J(x)||_2 from the exact Jacobian (measures.local_lipschitz
    # estimates it from below), on the data and on every adversarial point
    f = lambda x: logits_fn(x[None])[0]  # noqa: E731
    pts = jnp.concatenate([xs] + adv_points)
    jac = np.asarray(jax.jit(jax.vmap(jax.jacrev(f)))(pts), np.float64).reshape(len(pts), 4, -1)
    local = np.linalg.norm(jac, ord=2, axis=(1, 2))
    assert local.max() <= float(bound.network.lipschitz)
    # pairwise: the gradient norm of every margin z_i - z_j at every point stays below its bound
    grad_diff = np.linalg.norm(jac[:, :, None, :] - jac[:, None, :, :], axis=-1)
    pair = np.asarray(bound.pairwise_lipschitz, np.float64)
    assert np.all(grad_diff <= pair[None] * (1 + 1e-5))
    assert grad_diff.max() > 0.2 * pair.max()  # the bound is not vacuous here


def test_certify_rejects_misuse():
    logits_fn, _ = _tanh_mlp(6)
    xs, ys = _images(7, 4), jnp.array([0, 1, 2, 3])
    bound = function_bound(logits_fn, jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32))
    with pytest.raises(ValueError, match="CurvatureBound"):
        certified.certify(logits_fn, xs, ys, {"lipschitz": 1.0})
    with pytest.raises(ValueError, match="curvature"):
        certified.certify(logits_fn, xs, ys, bound, curvature="yes")
    with pytest.raises(ValueError, match="classes"):
        certified.certify(lambda x: logits_fn(x)[:, :3], xs, ys, bound)
    cert = certified.certify(logits_fn, xs, ys, bound, curvature=False)
    assert cert.curvature_radius is None
    with pytest.raises(ValueError, match="eps"):
        cert.accuracy(-1.0)
