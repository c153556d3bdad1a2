"""Estimators against dense oracles (numpy.linalg.eigh, exact traces) on small symmetric matrices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax import estimators as est


def _sym_matrix(seed, eigenvalues):
    """Q diag(eigenvalues) Q^T with a random orthogonal Q (float64 numpy)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (q * np.asarray(eigenvalues, np.float64)) @ q.T


def _block_operator(a):
    """The matrix ``a`` acting on a pytree {"w": (2, 3), "b": (n - 6,)} through its flattening."""
    n = a.shape[0]
    like = {"b": jnp.zeros((n - 6,)), "w": jnp.zeros((2, 3))}

    def to_flat(t):  # jax.flatten_util order is sorted keys: b then w
        return jnp.concatenate([t["b"], t["w"].reshape(-1)])

    def from_flat(v):
        return {"b": v[: n - 6], "w": v[n - 6:].reshape(2, 3)}

    a = jnp.asarray(a)
    return (lambda t: from_flat(a @ to_flat(t))), like, to_flat


# --------------------------------------------------------------------------- power iteration


def test_power_iteration_matches_eigh_on_pytree(x64):
    a = _sym_matrix(0, [5.0, -3.0, 2.0, 1.0, 0.5, 0.1, -0.2, 0.05, 0.0, 1e-3])
    matvec, like, to_flat = _block_operator(a)
    v0 = est.tree_rademacher(jax.random.key(1), jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), like))
    res = est.power_iteration(matvec, v0, 200)
    w, vecs = np.linalg.eigh(a)
    top = np.argmax(np.abs(w))
    np.testing.assert_allclose(res.eigenvalue, w[top], rtol=1e-10)
    u = np.asarray(to_flat(res.vector))
    assert abs(abs(u @ vecs[:, top]) - 1.0) < 1e-10
    assert int(res.num_iters_run) == 200
    assert float(res.residual) < 1e-8


def test_power_iteration_signed_negative_dominant(x64):
    a = _sym_matrix(1, [-4.0, 2.0, 1.0, 0.5])
    res = est.power_iteration(lambda v: jnp.asarray(a) @ v, jnp.ones(4, jnp.float64), 300)
    np.testing.assert_allclose(res.eigenvalue, -4.0, rtol=1e-10)


def test_power_iteration_rayleigh_bound_and_tolerance(x64):
    eig = np.array([3.0, 2.9, 1.0, -0.5, 0.2])
    a = jnp.asarray(_sym_matrix(2, eig))
    for iters in (1, 2, 5):
        lam = est.power_iteration(lambda v: a @ v, jnp.arange(1.0, 6.0), iters).eigenvalue
        assert abs(float(lam)) <= 3.0 + 1e-12
    rolled = est.power_iteration(lambda v: a @ v, jnp.arange(1.0, 6.0), 7)
    unrolled = est.power_iteration(lambda v: a @ v, jnp.arange(1.0, 6.0), 7, unroll=True)
    np.testing.assert_allclose(unrolled.eigenvalue, rolled.eigenvalue, rtol=1e-12)
    res = est.power_iteration(lambda v: a @ v, jnp.arange(1.0, 6.0), 10_000, tol=1e-6)
    assert 1 < int(res.num_iters_run) < 10_000
    assert float(res.residual) <= 1e-6 * abs(float(res.eigenvalue)) * 1.5 + 1e-12
    # residual bound: some eigenvalue lies within `residual` of the estimate
    assert np.min(np.abs(eig - float(res.eigenvalue))) <= float(res.residual) + 1e-12


def test_power_iteration_zero_operator_and_zero_start_give_zero_not_nan():
    res = est.power_iteration(lambda v: 0.0 * v, jnp.ones(3), 5)
    assert float(res.eigenvalue) == 0.0 and np.isfinite(np.asarray(res.vector)).all()
    res = est.power_iteration(lambda v: 2.0 * v, jnp.zeros(3), 5)
    assert float(res.eigenvalue) == 0.0 and np.isfinite(np.asarray(res.vector)).all()


@pytest.mark.parametrize("tol", [None, 1e-9])
def test_power_iteration_eigenvalue_gradient_hellmann_feynman(x64, tol):
    b = jnp.asarray(_sym_matrix(3, [2.0, 1.0, 0.5]))
    c = jnp.asarray(_sym_matrix(4, [1.0, -1.0, 0.3]))

    def top(t):  # lambda_max(b + t c); derivative = u^T c u at the top eigenvector u
        return est.power_iteration(lambda v: (b + t * c) @ v, jnp.ones(3), 400, tol=tol).eigenvalue

    g = jax.grad(top)(0.1)
    w, vecs = np.linalg.eigh(np.asarray(b + 0.1 * c))
    u = vecs[:, np.argmax(np.abs(w))]
    np.testing.assert_allclose(g, u @ np.asarray(c) @ u, rtol=1e-7)


def test_power_iteration_jit_and_validation():
    f = jax.jit(lambda v: est.power_iteration(lambda x: 2.0 * x, v, 3).eigenvalue)
    np.testing.assert_allclose(f(jnp.ones(4)), 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="num_iters"):
        est.power_iteration(lambda x: x, jnp.ones(3), 0)
    with pytest.raises(ValueError, match="floating"):
        est.power_iteration(lambda x: x, jnp.ones(3, jnp.int32), 3)
    with pytest.raises(ValueError, match="tol"):
        est.power_iteration(lambda x: x, jnp.ones(3), 3, tol=-1.0)


# --------------------------------------------------------------------------- Hutchinson


def test_hutchinson_exact_on_diagonal():
    # z^T D z = tr D for every Rademacher z: the estimate is exact and its standard error is 0.
    d = jnp.arange(1.0, 8.0)
    mean, se = est.hutchinson_trace(lambda v: d * v, jax.random.key(0), jnp.zeros(7), 10)
    np.testing.assert_allclose(mean, 28.0, rtol=1e-6)
    assert float(se) < 1e-5


def test_hutchinson_within_three_standard_errors_on_pytree(x64):
    rng = np.random.default_rng(5)
    m = rng.standard_normal((12, 12))
    a = m + m.T
    matvec, like, _ = _block_operator(a)
    like = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), like)
    mean, se = est.hutchinson_trace(matvec, jax.random.key(1), like, 2000, batch_size=100)
    assert float(se) > 0
    assert abs(float(mean) - np.trace(a)) < 3 * float(se)
    # standard error agrees with the closed-form Rademacher variance 2 * sum_{i != j} a_ij^2
    var = 2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2))
    np.testing.assert_allclose(float(se), np.sqrt(var / 2000), rtol=0.1)


def test_hutchinson_validation():
    with pytest.raises(ValueError, match="num_probes"):
        est.hutchinson_trace(lambda v: v, jax.random.key(0), jnp.zeros(3), 0)
    for bad in (0.0, -1e-3, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="tol"):
            est.hutchinson_trace(lambda v: v, jax.random.key(0), jnp.zeros(3), 10, tol=bad)


def _first_converged_count(samples, tol, floor):
    """Oracle of the stopping rule: the first P >= floor whose standard error is <= tol * |mean|, else None."""
    for p in range(floor, len(samples) + 1):
        head = samples[:p]
        if np.std(head, ddof=1) / np.sqrt(p) <= tol * abs(head.mean()):
            return p
    return None


def _tol_trace_problem():
    rng = np.random.default_rng(3)
    m = rng.standard_normal((12, 12))
    a = np.diag(np.full(12, 4.0)) + 0.5 * (m + m.T)
    matvec, like, _ = _block_operator(a)
    return matvec, jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), like), jax.random.key(4)


def test_hutchinson_tol_stops_at_the_first_probe_count_within_tol(x64):
    matvec, like, key = _tol_trace_problem()
    samples = np.asarray(est.hutchinson_samples(matvec, key, like, 200))  # the same probes as every run below
    p = _first_converged_count(samples, 0.05, est.MIN_TOL_PROBES)
    assert p is not None and est.MIN_TOL_PROBES < p < 200
    res, capped, fixed = jax.jit(lambda: (est.hutchinson_trace(matvec, key, like, 200, tol=0.05),
                                          est.hutchinson_trace(matvec, key, like, 30, tol=1e-9),
                                          est.hutchinson_trace(matvec, key, like, 30)))()
    assert int(res.num_probes) == p and bool(res.converged)
    np.testing.assert_allclose(res.estimate, samples[:p].mean(), rtol=1e-12)
    np.testing.assert_allclose(res.standard_error, np.std(samples[:p], ddof=1) / np.sqrt(p), rtol=1e-10)
    mean, se = res  # still unpacks as (estimate, standard_error)
    assert float(se) <= 0.05 * abs(float(mean))
    # a tolerance out of reach runs to the cap and says so; without tol nothing is claimed
    assert int(capped.num_probes) == 30 and not bool(capped.converged)
    np.testing.assert_allclose(capped.estimate, samples[:30].mean(), rtol=1e-12)
    assert fixed.converged is None and int(fixed.num_probes) == 30
    np.testing.assert_allclose(fixed.estimate, capped.estimate, rtol=1e-12)


# --------------------------------------------------------------------------- Lanczos


def test_lanczos_basis_orthonormal_and_tridiagonal(x64):
    a = _sym_matrix(6, np.linspace(-1.0, 4.0, 15))
    res = est.lanczos(lambda v: jnp.asarray(a) @ v, jax.random.key(0), jnp.zeros(15, jnp.float64), 8)
    q = np.asarray(res.basis)
    np.testing.assert_allclose(q @ q.T, np.eye(8), atol=1e-12)
    np.testing.assert_allclose(q @ a @ q.T, np.asarray(res.tridiagonal()), atol=1e-12)


def test_lanczos_top_k_match_eigh(x64):
    eig = np.concatenate([[10.0, 8.0, 6.0], np.linspace(-1.0, 1.0, 37)])
    a = _sym_matrix(7, eig)
    matvec, like, to_flat = _block_operator(a)
    like = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), like)
    res = est.lanczos_top_eigenvalues(matvec, jax.random.key(2), like, k=3, num_iters=25)
    np.testing.assert_allclose(res.eigenvalues, [10.0, 8.0, 6.0], rtol=1e-8)
    assert np.all(np.asarray(res.residuals) < 1e-6)
    w, vecs = np.linalg.eigh(a)
    for i, idx in enumerate(np.argsort(-w)[:3]):
        y = np.asarray(to_flat(jax.tree_util.tree_map(lambda x: x[i], res.eigenvectors)))
        assert abs(abs(y @ vecs[:, idx]) - 1.0) < 1e-8


def test_lanczos_more_steps_than_dimension_has_no_ghosts(x64):
    eig = np.array([3.0, 1.0, -2.0, 0.5, 0.25])
    a = jnp.asarray(_sym_matrix(8, eig))
    res = est.lanczos_top_eigenvalues(lambda v: a @ v, jax.random.key(0), jnp.zeros(5, jnp.float64), 5, 9)
    np.testing.assert_allclose(np.sort(np.asarray(res.eigenvalues)), np.sort(eig), atol=1e-10)
    mag = est.lanczos_top_eigenvalues(lambda v: a @ v, jax.random.key(0), jnp.zeros(5), 2, 5, which="magnitude")
    np.testing.assert_allclose(mag.eigenvalues, [3.0, -2.0], rtol=1e-4)


def _tol_lanczos_problem():
    eig = np.concatenate([[10.0, 8.0, 6.0], np.linspace(-1.0, 1.0, 37)])
    a = _sym_matrix(7, eig)
    matvec, like, to_flat = _block_operator(a)
    return a, matvec, jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), like), to_flat, jax.random.key(2)


def test_lanczos_tol_stops_early_and_its_residual_bounds_the_error(x64):
    a, matvec, like, to_flat, key = _tol_lanczos_problem()
    res = jax.jit(lambda: est.lanczos_top_eigenvalues(matvec, key, like, k=2, num_iters=40, tol=1e-6))()
    steps = int(res.num_iters)
    assert bool(res.converged) and 2 <= steps < 40
    # Oracle of the rule from a plain run of the same steps: the Ritz pairs of its tridiagonal T (numpy eigh) equal
    # the result, and those of its leading (steps - 1) block miss the tolerance (it stopped at the first step)
    plain = jax.jit(lambda: est.lanczos(matvec, key, like, steps, unroll=1))()
    t = np.asarray(plain.tridiagonal())
    for m, last_beta in ((steps, float(plain.last_beta)), (steps - 1, float(plain.betas[steps - 2]))):
        theta, vecs = np.linalg.eigh(t[:m, :m])
        top = np.argsort(-theta)[:2]
        within = np.abs(last_beta * vecs[m - 1, top]) <= 1e-6 * np.abs(theta[top])
        assert within.all() == (m == steps)
        if m == steps:
            np.testing.assert_allclose(res.eigenvalues, theta[top], rtol=1e-10)
    # the residual is the true ||A y - theta y|| (dense oracle), within tol, and bounds the distance to 10 and 8
    for i, true in enumerate((10.0, 8.0)):
        y = np.asarray(to_flat(jax.tree_util.tree_map(lambda x: x[i], res.eigenvectors)))
        theta = float(res.eigenvalues[i])
        np.testing.assert_allclose(np.linalg.norm(a @ y - theta * y), float(res.residuals[i]), rtol=1e-5, atol=1e-13)
        assert float(res.residuals[i]) <= 1e-6 * abs(theta)
        assert abs(theta - true) <= float(res.residuals[i]) + 1e-12


def test_host_lanczos_equals_the_traced_one(x64):
    # the host loop converts rows and products between flat vectors and pytrees with NumPy; same arithmetic as the
    # traced loop, and the same first vector (one flat Rademacher draw equals the raveled tree draw)
    a, matvec, like, to_flat, key = _tol_lanczos_problem()
    traced = jax.jit(lambda: est.lanczos_top_eigenvalues(matvec, key, like, k=2, num_iters=12))()
    host = est.lanczos_top_eigenvalues(jax.jit(matvec), key, like, k=2, num_iters=12, host_loop=True)
    np.testing.assert_allclose(host.eigenvalues, traced.eigenvalues, rtol=1e-12)
    for i in range(2):
        y_host, y_traced = (to_flat(jax.tree_util.tree_map(lambda x: x[i], r.eigenvectors)) for r in (host, traced))
        np.testing.assert_allclose(y_host, y_traced, atol=1e-10)
    assert jax.tree_util.tree_structure(host.eigenvectors) == jax.tree_util.tree_structure(like)
    first = est.lanczos(matvec, key, like, 1).basis[0]
    np.testing.assert_allclose(first * np.sqrt(a.shape[0]), to_flat(est.tree_rademacher(key, like)), atol=1e-12)


@pytest.mark.slow
def test_tol_in_host_loops_matches_the_traced_loops(x64):
    # the host loops (for a matvec that cannot be traced, e.g. a data set) stop at the same probe / step
    matvec, like, key = _tol_trace_problem()
    traced = jax.jit(lambda: est.hutchinson_trace(matvec, key, like, 200, tol=0.05))()
    host = est.hutchinson_trace(jax.jit(matvec), key, like, 200, tol=0.05, host_loop=True)
    assert int(host.num_probes) == int(traced.num_probes) and bool(host.converged)
    np.testing.assert_allclose(host.estimate, traced.estimate, rtol=1e-12)
    _, matvec, like, _, key = _tol_lanczos_problem()
    traced = jax.jit(lambda: est.lanczos_top_eigenvalues(matvec, key, like, k=2, num_iters=40, tol=1e-6))()
    host = est.lanczos_top_eigenvalues(jax.jit(matvec), key, like, k=2, num_iters=40, tol=1e-6, host_loop=True)
    assert int(host.num_iters) == int(traced.num_iters) and bool(host.converged)
    np.testing.assert_allclose(host.eigenvalues, traced.eigenvalues, rtol=1e-12)


def test_lanczos_validation():
    with pytest.raises(ValueError, match="num_iters >= k"):
        est.lanczos_top_eigenvalues(lambda v: v, jax.random.key(0), jnp.zeros(4), 5, 3)
    with pytest.raises(ValueError, match="which"):
        est.lanczos_top_eigenvalues(lambda v: v, jax.random.key(0), jnp.zeros(4), 1, 3, which="smallest")
    with pytest.raises(ValueError, match="tol"):
        est.lanczos_top_eigenvalues(lambda v: v, jax.random.key(0), jnp.zeros(4), 1, 3, tol=-1.0)


# --------------------------------------------------------------------------- spectral density


def test_spectral_density_integrates_to_one_and_has_mean_trace_over_n(x64):
    n = 60
    eig = np.concatenate([np.full(30, 1.0), np.full(30, 10.0)]) + np.linspace(0, 0.1, n)
    a = jnp.asarray(_sym_matrix(9, eig))
    sd = est.spectral_density(lambda v: a @ v, jax.random.key(3), jnp.zeros(n, jnp.float64),
                              num_iters=20, num_runs=30, grid=2000, sigma=0.2)
    grid, dens = np.asarray(sd.grid), np.asarray(sd.density)
    assert np.all(dens >= 0)
    np.testing.assert_allclose(np.trapezoid(dens, grid), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(sd.weights).sum(-1), 1.0, atol=1e-10)
    # each run's quadrature mean is v^T A v / ||v||^2 for a Rademacher v: unbiased for tr(A)/n
    run_means = (np.asarray(sd.weights) * np.asarray(sd.nodes)).sum(-1)
    se = run_means.std(ddof=1) / np.sqrt(len(run_means))
    assert abs(run_means.mean() - eig.sum() / n) < 3 * se + 1e-9
    np.testing.assert_allclose(np.trapezoid(grid * dens, grid), run_means.mean(), rtol=1e-3)
    # half the mass sits in each cluster
    low = grid < 5.5
    np.testing.assert_allclose(np.trapezoid(dens[low], grid[low]), 0.5, atol=0.1)
    # the cluster locations are resolved: the density peaks near 1.05 and 10.05
    assert abs(grid[low][np.argmax(dens[low])] - 1.05) < 0.2
    assert abs(grid[~low][np.argmax(dens[~low])] - 10.05) < 0.2


def test_spectral_density_full_lanczos_nodes_are_eigenvalues(x64):
    eig = np.array([-1.0, 0.5, 2.0, 4.0])
    a = jnp.asarray(_sym_matrix(10, eig))
    grid = jnp.linspace(-3.0, 6.0, 500)
    sd = est.spectral_density(lambda v: a @ v, jax.random.key(0), jnp.zeros(4, jnp.float64), 4, 2, grid, 0.1)
    np.testing.assert_allclose(np.sort(np.asarray(sd.nodes), -1), np.tile(eig, (2, 1)), atol=1e-10)
    np.testing.assert_allclose(sd.grid, grid)
