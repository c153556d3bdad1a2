"""Measures against independent oracles: closed-form Jacobians/Hessians (numpy float64), SVD, eigh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lcnn_jax.measures.curvature import gradient_stability, input_curvature
from lcnn_jax.measures.hessian import hessian_spectral_density, hessian_top_eigenvalues, hessian_trace
from lcnn_jax.measures.jacobian import PROBE_CHUNK, jacobian_frobenius, probe_variance
from lcnn_jax.measures.lipschitz import (
    lipschitz_pair_ascent,
    local_lipschitz,
    pair_ascent_step,
    pair_quotients,
)


# --------------------------------------------------------------------------- models and oracles


def _tanh_mlp(seed, n_in, n_hidden, n_out, dtype=None):
    """f(x) = W2 tanh(W1 vec(x) + b1) + b2 with the closed-form Jacobian W2 diag(1 - t^2) W1."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((n_hidden, n_in)) / np.sqrt(n_in)
    b1 = 0.5 * rng.standard_normal(n_hidden)
    w2 = rng.standard_normal((n_out, n_hidden)) / np.sqrt(n_hidden)
    b2 = rng.standard_normal(n_out)
    jw1, jb1, jw2, jb2 = (jnp.asarray(a, dtype) for a in (w1, b1, w2, b2))

    def f(x):
        return jw2 @ jnp.tanh(jw1 @ x.reshape(-1) + jb1) + jb2

    def jac(x):
        t = np.tanh(w1 @ np.asarray(x, np.float64).reshape(-1) + b1)
        return w2 @ ((1 - t**2)[:, None] * w1)

    return f, jac


def _softmax_regression(seed, n_in, n_cls):
    """Per-example CE of logits W vec(x) + b, with closed-form input gradient and Hessian.

    grad = W^T (p - e_y),  H = W^T (diag p - p p^T) W.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_cls, n_in))
    b = rng.standard_normal(n_cls)

    def loss_fn(x, y):
        z = jnp.asarray(w, x.dtype) @ x.reshape(-1) + jnp.asarray(b, x.dtype)
        return jax.nn.logsumexp(z) - z[y]

    def oracle(x, y):
        z = w @ np.asarray(x, np.float64).reshape(-1) + b
        p = np.exp(z - z.max())
        p /= p.sum()
        e = np.eye(n_cls)[int(y)]
        return w.T @ (p - e), w.T @ (np.diag(p) - np.outer(p, p)) @ w

    return loss_fn, oracle


def _mlp_ce(seed, n_in, n_hidden, n_cls):
    f, _ = _tanh_mlp(seed, n_in, n_hidden, n_cls)

    def loss_fn(x, y):
        z = f(x)
        return jax.nn.logsumexp(z) - z[y]

    return loss_fn


def _rng_batch(seed, shape, dtype=np.float64):
    return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, shape), dtype)


# --------------------------------------------------------------------------- Jacobian norm


@pytest.mark.parametrize("n_in,n_out,shape", [(12, 5, (3, 4)), (3, 6, (3,))])  # jacrev and jacfwd paths
def test_jacobian_frobenius_exact_matches_closed_form_x64(x64, n_in, n_out, shape):
    f, jac = _tanh_mlp(0, n_in, 8, n_out)
    xs = _rng_batch(1, (5, *shape))
    out = jacobian_frobenius(f, xs)
    expected = [np.linalg.norm(jac(x)) for x in xs]
    assert out.shape == (5,)
    np.testing.assert_allclose(out, expected, rtol=1e-10)
    np.testing.assert_allclose(jacobian_frobenius(f, xs, squared=True), np.square(expected), rtol=1e-10)


def test_jacobian_frobenius_exact_float32_and_image_shape():
    f, jac = _tanh_mlp(2, 36, 16, 10, dtype=np.float32)
    xs = _rng_batch(3, (4, 6, 6, 1), np.float32)
    out = jax.jit(lambda xs: jacobian_frobenius(f, xs))(xs)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [np.linalg.norm(jac(x)) for x in xs], rtol=1e-5)


@pytest.mark.parametrize("probes", ["sphere", "gaussian"])
def test_jacobian_frobenius_probes_are_unbiased_with_the_stated_variance(x64, probes):
    # One-probe estimates of ||J||_F^2 over many keys: their mean is the exact square (dense Jacobian) and their
    # variance the closed form of probe_variance (2 ||J J^T||_F^2 for Gaussian probes, 2K/(K+2) (||J J^T||_F^2 -
    # ||J||_F^4 / K) on the sphere); the sphere's is the smaller.
    f, jac = _tanh_mlp(4, 10, 8, 4)
    xs = _rng_batch(5, (3, 10))
    draws = 20000
    keys = jax.random.split(jax.random.key(0), draws)
    est = np.asarray(jax.jit(jax.vmap(lambda k: jacobian_frobenius(f, xs, key=k, squared=True, probes=probes)))(keys))
    for i, x in enumerate(xs):
        j = jac(x)
        var = probe_variance(j, probes)
        assert abs(est[:, i].mean() - np.sum(j**2)) < 4 * np.sqrt(var / draws)
        np.testing.assert_allclose(est[:, i].var(), var, rtol=0.15)
        assert probe_variance(j, "sphere") < probe_variance(j, "gaussian")
    many = jacobian_frobenius(f, xs, key=jax.random.key(1), num_probes=8, squared=True, probes=probes)
    root = jacobian_frobenius(f, xs, key=jax.random.key(1), num_probes=8, probes=probes)
    np.testing.assert_allclose(root, np.sqrt(many), rtol=1e-12)


def test_jacobian_frobenius_probe_chunks_bound_memory_and_keep_the_value(x64):
    # exact mode in chunks of 3 basis vectors (reverse: K = 10 > 3; forward: n = 3 < K = 6, chunks of 2)
    for (n_in, n_out, shape), chunk in (((12, 10, (3, 4)), 3), ((3, 6, (3,)), 2)):
        f, jac = _tanh_mlp(0, n_in, 8, n_out)
        xs = _rng_batch(1, (5, *shape))
        np.testing.assert_allclose(jacobian_frobenius(f, xs, probe_chunk=chunk), [np.linalg.norm(jac(x)) for x in xs],
                                   rtol=1e-10)
    # a scalar output: every unit-sphere probe is +-1, so each probe is exact; 10 probes in chunks of 3 (the last
    # one padded) must still average to the exact value, not 12/10 of it
    f, jac = _tanh_mlp(2, 5, 6, 1)
    xs = _rng_batch(3, (4, 5))
    est = jacobian_frobenius(f, xs, key=jax.random.key(0), num_probes=10, probe_chunk=3, squared=True)
    np.testing.assert_allclose(est, [np.sum(jac(x) ** 2) for x in xs], rtol=1e-10)


def test_jacobian_frobenius_memory_does_not_grow_with_the_probes():
    f, _ = _tanh_mlp(2, 300, 64, 10, dtype=np.float32)
    xs = jnp.zeros((32, 300))

    def temp_bytes(num_probes):
        fn = jax.jit(lambda x, k: jacobian_frobenius(f, x, key=k, num_probes=num_probes))
        return fn.lower(xs, jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes

    # all 1000 probes at once would need 1000 x 32 x 300 floats (38 MB) for the input cotangents alone
    assert temp_bytes(1000) < 2 * temp_bytes(PROBE_CHUNK) < 4 * 32 * 300 * PROBE_CHUNK * 4


@pytest.mark.parametrize("key", [None, jax.random.key(7)])
def test_jacobian_frobenius_chunked_uneven_batch_equals_unchunked(key):
    f, _ = _tanh_mlp(6, 5, 6, 3, dtype=np.float32)
    xs = _rng_batch(8, (7, 5), np.float32)
    full, chunked = jax.jit(lambda xs: (
        jacobian_frobenius(f, xs, key=key), jacobian_frobenius(f, xs, key=key, batch_size=4)
    ))(xs)
    np.testing.assert_allclose(chunked, full, rtol=1e-6)


def test_jacobian_frobenius_rejects_malformed_input():
    f = lambda x: x * 2.0
    with pytest.raises(ValueError, match="probes must be one of"):
        jacobian_frobenius(f, jnp.ones((2, 3)), key=jax.random.key(0), probes="rademacher")
    with pytest.raises(ValueError, match="probe_chunk"):
        jacobian_frobenius(f, jnp.ones((2, 3)), probe_chunk=0)
    with pytest.raises(ValueError, match="at least one example axis"):
        jacobian_frobenius(f, jnp.ones(3))
    with pytest.raises(ValueError, match="num_probes"):
        jacobian_frobenius(f, jnp.ones((2, 3)), key=jax.random.key(0), num_probes=0)
    with pytest.raises(ValueError, match="NaN"):
        jacobian_frobenius(f, jnp.full((2, 3), jnp.nan))


# --------------------------------------------------------------------------- input curvature


def test_input_curvature_linear_softmax_matches_closed_form(x64):
    loss_fn, oracle = _softmax_regression(0, 8, 4)
    xs = _rng_batch(1, (6, 2, 4))
    ys = jnp.array([0, 1, 2, 3, 0, 1])
    out = input_curvature(loss_fn, xs, ys, key=jax.random.key(0), num_iters=500)
    for i in range(6):
        g, h = oracle(xs[i], ys[i])
        lam = np.linalg.eigvalsh(h)
        lam_max = lam[np.argmax(np.abs(lam))]
        np.testing.assert_allclose(out["eigenvalue"][i], lam_max, rtol=1e-3)
        np.testing.assert_allclose(out["hessian_norm"][i], abs(lam_max), rtol=1e-3)
        np.testing.assert_allclose(out["grad_norm"][i], np.linalg.norm(g), rtol=1e-10)
    np.testing.assert_allclose(out["curvature"], out["hessian_norm"] / (out["grad_norm"] + 1e-6), rtol=1e-12)


def test_input_curvature_mlp_against_dense_hessian(x64):
    loss_fn = _mlp_ce(2, 10, 12, 3)
    xs = _rng_batch(3, (5, 10))
    ys = jnp.array([0, 1, 2, 0, 1])
    long, short, dense = jax.jit(lambda xs, ys: (
        input_curvature(loss_fn, xs, ys, key=jax.random.key(1), num_iters=500),
        input_curvature(loss_fn, xs, ys, key=jax.random.key(1)),  # the 10-iteration protocol
        jax.vmap(jax.hessian(loss_fn))(xs, ys),
    ))(xs, ys)
    for i in range(5):
        lam = np.linalg.eigvalsh(np.asarray(dense[i]))
        top = np.max(np.abs(lam))
        np.testing.assert_allclose(long["hessian_norm"][i], top, rtol=1e-3)
        # a Rayleigh quotient can never exceed the spectral norm
        assert 0.0 <= float(short["hessian_norm"][i]) <= top * (1 + 1e-12)


def test_input_curvature_chunked_uneven_batch_and_jit():
    loss_fn = _mlp_ce(4, 6, 8, 3)
    xs = _rng_batch(5, (7, 6), np.float32)
    ys = jnp.array([0, 1, 2, 0, 1, 2, 0])
    key = jax.random.key(2)
    full, chunked = jax.jit(lambda xs, ys, k: (
        input_curvature(loss_fn, xs, ys, key=k), input_curvature(loss_fn, xs, ys, key=k, batch_size=4)
    ))(xs, ys, key)
    for name in ("hessian_norm", "grad_norm", "curvature"):
        assert full[name].shape == (7,)
        np.testing.assert_allclose(chunked[name], full[name], rtol=1e-4)


def test_input_curvature_rejects_malformed_input():
    loss_fn = _mlp_ce(4, 6, 8, 3)
    xs, ys = jnp.ones((3, 6)), jnp.zeros(3, jnp.int32)
    with pytest.raises(ValueError, match="same leading"):
        input_curvature(loss_fn, xs, ys[:2], key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_iters"):
        input_curvature(loss_fn, xs, ys, key=jax.random.key(0), num_iters=0)
    with pytest.raises(ValueError, match="at least one example axis"):
        input_curvature(loss_fn, jnp.ones(6), ys, key=jax.random.key(0))


# --------------------------------------------------------------------------- gradient stability


def test_gradient_stability_matches_closed_form_gradients(x64):
    loss_fn, oracle = _softmax_regression(6, 5, 3)
    xs = _rng_batch(7, (4, 5))
    ys = jnp.array([0, 1, 2, 0])
    key, std = jax.random.key(3), 0.3
    out = gradient_stability(loss_fn, xs, ys, key=key, noise_std=std)
    keys = jax.random.split(key, 4)  # documented: noise of example i from split(key, B)[i]
    for i in range(4):
        noisy = xs[i] + std * jax.random.normal(keys[i], xs[i].shape, xs.dtype)
        g0, g1 = oracle(xs[i], ys[i])[0], oracle(noisy, ys[i])[0]
        np.testing.assert_allclose(out[i], g0 @ g1 / np.linalg.norm(g0) / np.linalg.norm(g1), rtol=1e-10)
    np.testing.assert_allclose(gradient_stability(loss_fn, xs, ys, key=key, noise_std=0.0), 1.0, rtol=1e-12)
    assert np.all(np.asarray(out) < 1.0)
    with pytest.raises(ValueError, match="noise_std"):
        gradient_stability(loss_fn, xs, ys, key=key, noise_std=-1.0)


# --------------------------------------------------------------------------- local Lipschitz


def test_local_lipschitz_matches_svd_and_is_lower_bound(x64):
    f, jac = _tanh_mlp(8, 6, 10, 4)
    xs = _rng_batch(9, (5, 6))
    sigma = np.array([np.linalg.svd(jac(x), compute_uv=False)[0] for x in xs])
    long, short, chunked = jax.jit(lambda xs, k: (
        local_lipschitz(f, xs, key=k, num_iters=300),
        local_lipschitz(f, xs, key=k, num_iters=2),
        local_lipschitz(f, xs, key=k, num_iters=2, batch_size=2),
    ))(xs, jax.random.key(0))
    np.testing.assert_allclose(long, sigma, rtol=1e-8)
    assert np.all(np.asarray(short) <= sigma * (1 + 1e-12))
    np.testing.assert_allclose(chunked, short, rtol=1e-12)


def test_local_lipschitz_tol_reaches_the_svd_where_a_fixed_count_falls_short(x64):
    # a linear map whose top singular values are close (1 and 0.97): 20 power iterations read low and say so, a
    # tolerance on the relative residual iterates on to sigma_max and reports convergence
    rng = np.random.default_rng(13)
    u, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    v, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    w = (u * np.array([1.0, 0.97, 0.6, 0.4, 0.2, 0.1])) @ v[:6]
    f = lambda x: jnp.asarray(w) @ x  # noqa: E731
    xs = _rng_batch(14, (8, 9))
    fixed, tight = jax.jit(lambda k: (
        local_lipschitz(f, xs, key=k, num_iters=20, return_info=True),
        local_lipschitz(f, xs, key=k, num_iters=3000, tol=1e-7, return_info=True)))(jax.random.key(3))
    assert fixed.converged is None and np.all(np.asarray(fixed.num_iters) == 20)
    assert np.max(1 - np.asarray(fixed.value)) > 1e-3  # some example reads low after 20 iterations...
    worst = np.argmax(1 - np.asarray(fixed.value))
    assert float(fixed.relative_residual[worst]) > 1e-3  # ...and its residual says it has not converged
    assert np.all(np.asarray(tight.converged)) and np.all(np.asarray(tight.relative_residual) <= 1e-7)
    assert np.all(np.asarray(tight.num_iters) < 3000)
    np.testing.assert_allclose(tight.value, 1.0, rtol=1e-9)
    assert np.all(np.asarray(tight.value) <= 1 + 1e-12)
    # the residual is the true ||A u - lam u|| / lam of A = J^T J (checked on the plain value: lam = value^2)
    plain = local_lipschitz(f, xs, key=jax.random.key(3), num_iters=3000, tol=1e-7)
    np.testing.assert_allclose(plain, tight.value, rtol=1e-12)
    with pytest.raises(ValueError, match="tol"):
        local_lipschitz(f, xs, key=jax.random.key(3), tol=0.0)


def test_local_lipschitz_float32_default_iterations_close():
    f, jac = _tanh_mlp(10, 12, 16, 10, dtype=np.float32)
    xs = _rng_batch(11, (3, 3, 4), np.float32)
    sigma = np.array([np.linalg.svd(jac(x), compute_uv=False)[0] for x in xs])
    out = local_lipschitz(f, xs, key=jax.random.key(1))
    assert np.all(np.asarray(out) <= sigma * (1 + 1e-5))
    np.testing.assert_allclose(out, sigma, rtol=0.05)


# --------------------------------------------------------------------------- CLIP pair ascent


def _affine(seed, n_in=8, n_out=5, dtype=np.float32):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n_out, n_out)))
    v, _ = np.linalg.qr(rng.standard_normal((n_in, n_in)))
    s = np.array([3.0, 1.5, 1.0, 0.5, 0.2])[:n_out]
    w = (u * s) @ v[:n_out]
    b = rng.standard_normal(n_out)
    return (lambda xs: xs @ jnp.asarray(w.T, dtype) + jnp.asarray(b, dtype)), w


def test_pair_ascent_affine_converges_to_spectral_norm_and_never_exceeds_it():
    f_batched, w = _affine(0)
    sigma = np.linalg.svd(w, compute_uv=False)[0]
    xs = _rng_batch(1, (12, 8), np.float32)
    u, v = xs[:6], xs[6:]
    quotients0 = np.asarray(pair_quotients(f_batched, u, v))
    res = jax.jit(lambda u, v: lipschitz_pair_ascent(f_batched, u, v, num_steps=150, init_step=0.1))(u, v)
    max_q, quotients, u1, v1 = res
    assert np.all(np.asarray(quotients) <= sigma * (1 + 1e-5))
    assert np.all(np.asarray(quotients) >= quotients0 - 1e-6)  # accepted steps only: never decreases
    np.testing.assert_allclose(max_q, sigma, rtol=1e-3)
    np.testing.assert_allclose(quotients, pair_quotients(f_batched, u1, v1), rtol=1e-6)


def test_pair_ascent_step_accepts_only_improvements_and_adapts_step():
    f_batched, _ = _affine(1)
    xs = _rng_batch(2, (8, 8), np.float32)
    u, v = xs[:4], xs[4:]
    step = jnp.array([1e-3, 0.1, 1.0, 1e4], jnp.float32)  # the huge step overshoots far (affine: no gain possible?)
    q0 = pair_quotients(f_batched, u, v)
    u1, v1, step1, q1 = pair_ascent_step(f_batched, u, v, step)
    grew = np.asarray(q1) > np.asarray(q0)
    np.testing.assert_allclose(np.asarray(step1), np.where(grew, step * 1.3, step / 1.3), rtol=1e-6)
    # rejected pairs are unchanged; accepted pairs moved
    for i in range(4):
        moved = not np.allclose(u1[i], u[i])
        assert moved == grew[i]
    assert np.all(np.asarray(q1) >= np.asarray(q0))
    assert grew[1]  # a moderate step on an affine map improves the quotient


def test_pair_ascent_identical_members_and_validation():
    f_batched, _ = _affine(2)
    xs = _rng_batch(3, (3, 8), np.float32)
    q = pair_quotients(f_batched, xs, xs)
    np.testing.assert_array_equal(q, 0.0)
    g = jax.grad(lambda u: jnp.sum(pair_quotients(f_batched, u, xs)))(xs)
    assert np.all(np.isfinite(np.asarray(g)))
    with pytest.raises(ValueError, match="same shape"):
        lipschitz_pair_ascent(f_batched, xs, xs[:2], num_steps=1)
    with pytest.raises(ValueError, match="num_steps"):
        lipschitz_pair_ascent(f_batched, xs, xs, num_steps=-1)
    with pytest.raises(ValueError, match="init_step"):
        lipschitz_pair_ascent(f_batched, xs, xs, num_steps=1, init_step=0.0)


# --------------------------------------------------------------------------- parameter Hessian


def _param_problem():
    """A 3-4-2 tanh MLP (26 parameters) with a CE loss on 10 fixed points, and its dense Hessian."""
    rng = np.random.default_rng(12)
    params = {
        "w1": jnp.asarray(rng.standard_normal((3, 4))), "b1": jnp.asarray(rng.standard_normal(4)),
        "w2": jnp.asarray(rng.standard_normal((4, 2))), "b2": jnp.asarray(rng.standard_normal(2)),
    }
    xs = jnp.asarray(rng.standard_normal((10, 3)))
    ys = jnp.asarray(rng.integers(0, 2, 10))

    def loss_fn(p):
        z = jnp.tanh(xs @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, ys[:, None], 1)[:, 0])

    flat, unravel = ravel_pytree(params)
    dense = np.asarray(jax.jit(jax.hessian(lambda v: loss_fn(unravel(v))))(flat))
    return loss_fn, params, dense


def test_hessian_trace_top_eigenvalues_and_density_match_dense(x64):
    loss_fn, params, dense = _param_problem()
    eig = np.linalg.eigvalsh(dense)

    @jax.jit
    def measure(p):
        trace = hessian_trace(loss_fn, p, key=jax.random.key(0), num_probes=400)
        top = hessian_top_eigenvalues(loss_fn, p, key=jax.random.key(1), k=3, num_iters=26)
        sd = hessian_spectral_density(loss_fn, p, key=jax.random.key(2), num_iters=26, num_runs=2, grid=4000)
        return trace, top, sd

    (est, se), top, sd = measure(params)
    assert float(se) > 0 and abs(float(est) - np.trace(dense)) < 3 * float(se)

    np.testing.assert_allclose(top.eigenvalues, np.sort(eig)[::-1][:3], rtol=1e-8, atol=1e-10)
    vec0 = ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], top.eigenvectors))[0]
    np.testing.assert_allclose(dense @ vec0, eig.max() * vec0, atol=1e-8)

    np.testing.assert_allclose(np.trapezoid(sd.density, sd.grid), 1.0, atol=1e-3)
    assert np.all(np.min(np.abs(np.asarray(sd.nodes)[..., None] - eig), axis=-1) < 1e-8)


def test_pair_ascent_float32_estimate_is_not_a_rounding_artefact():
    # f(x) = a + b tanh(x) has Lipschitz constant exactly b. Without a separation floor the ascent shrinks pairs
    # towards the steepest point until ||u - v|| is a few float32 ulps, where the quotient is a ratio of rounding
    # errors and the accept-if-larger rule keeps the largest of them (an estimate above b).
    b = np.float32(0.05)
    f_batched = lambda xs: 0.25 + b * jnp.tanh(xs)  # noqa: E731
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    u = jax.random.uniform(k1, (100, 1), minval=-4.0, maxval=4.0)
    v = u + 0.1 * jax.random.normal(k2, u.shape)
    run = jax.jit(lambda u, v, floor: lipschitz_pair_ascent(f_batched, u, v, num_steps=400, min_separation=floor))
    res = run(u, v, None)
    assert 0.995 * b <= float(res.max_quotient) <= float(b) * (1 + 1e-3), float(res.max_quotient)
    sep = np.linalg.norm(np.asarray(res.u - res.v).reshape(100, -1), axis=1)
    # with the floor switched off (0.0) the same ascent collapses the pairs (what CLIP's training step does)
    loose = run(u, v, 0.0)
    sep0 = np.linalg.norm(np.asarray(loose.u - loose.v).reshape(100, -1), axis=1)
    assert sep0.min() < 0.1 * sep.min()
