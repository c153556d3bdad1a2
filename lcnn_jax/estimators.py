"""Matrix-free spectral estimators over pytrees: power iteration, Hutchinson, Lanczos, SLQ density.

Each estimator takes ``matvec: v -> A v`` for a symmetric linear operator ``A`` acting on pytrees
shaped like a template (``like`` or ``v0``), and returns the estimate with diagnostics. Loops are
``lax.fori_loop``/``lax.while_loop`` (or ``lax.map`` over probes), so everything is jittable and the
cost is a known number of matvecs. These are the JAX counterparts of what PyHessian offers for
PyTorch (top eigenvalues, Hutchinson trace, stochastic Lanczos quadrature density).

Example::

    import jax, jax.numpy as jnp
    from lcnn_jax import estimators as est

    A = jnp.diag(jnp.arange(1.0, 6.0))
    mv = lambda v: A @ v
    est.power_iteration(mv, jnp.ones(5), 200).eigenvalue           # ~5.0
    est.hutchinson_trace(mv, jax.random.key(0), jnp.zeros(5), 100)  # (~15.0, standard error)
    est.lanczos_top_eigenvalues(mv, jax.random.key(0), jnp.zeros(5), k=2, num_iters=5).eigenvalues  # [5, 4]
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from lcnn_jax.loops import auto_unroll  # noqa: F401  (re-exported)
from lcnn_jax.autodiff import check_positive_int as _check_positive_int
from lcnn_jax.types import Array, PRNGKey, PyTree

__all__ = [
    "PowerIterationResult",
    "LanczosResult",
    "EigenResult",
    "SpectralDensity",
    "TraceEstimate",
    "tree_vdot",
    "tree_norm",
    "tree_normalize",
    "tree_rademacher",
    "power_iteration",
    "auto_unroll",
    "hutchinson_samples",
    "hutchinson_summary",
    "hutchinson_trace",
    "lanczos",
    "lanczos_top_eigenvalues",
    "spectral_density",
]

MatVec = Callable[[PyTree], PyTree]


# ----------------------------------------------------------------------------------------------
# Pytree vector helpers
# ----------------------------------------------------------------------------------------------


def tree_vdot(a: PyTree, b: PyTree) -> Array:
    """Real inner product ``sum_leaves <a, b>`` of two pytrees with the same structure."""
    parts = jax.tree_util.tree_map(lambda x, y: jnp.vdot(x, y).real, a, b)
    return sum(jax.tree_util.tree_leaves(parts), jnp.zeros((), jnp.result_type(*jax.tree_util.tree_leaves(a))))


def tree_norm(a: PyTree) -> Array:
    """Euclidean norm of a pytree; its gradient is 0 (not NaN) at 0."""
    sq = tree_vdot(a, a)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def tree_normalize(a: PyTree) -> tuple[PyTree, Array]:
    """Return ``(a / ||a||, ||a||)``; a zero input stays zero instead of becoming NaN."""
    norm = tree_norm(a)
    inv = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
    return jax.tree_util.tree_map(lambda x: x * inv.astype(x.dtype), a), norm


def _tree_axpy(alpha: Array, x: PyTree, y: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda a, b: alpha.astype(a.dtype) * a + b, x, y)


def tree_rademacher(key: PRNGKey, like: PyTree) -> PyTree:
    """Independent +-1 entries with the structure, shapes and float dtypes of ``like``.

    One draw of ``sum(leaf sizes)`` entries from ``key``, cut into the leaves in flattening order. One random
    draw, not one per leaf: XLA:CPU compiles each threefry draw separately, and ResNet-18's 62 parameter leaves
    took 8.4 s to compile as 62 draws (more than its HVP) against about half a second as one. (Before 2026-12-07
    each leaf had its own draw from ``split(key, num_leaves)``: the same distribution, other values.)"""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = [int(np.prod(jnp.shape(leaf), dtype=np.int64)) for leaf in leaves]
    flat = jax.random.rademacher(key, (sum(sizes),), dtype=jnp.int32)
    out, start = [], 0
    for leaf, n in zip(leaves, sizes):
        out.append(flat[start:start + n].reshape(jnp.shape(leaf)).astype(jnp.result_type(leaf)))
        start += n
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_float_tree(like: PyTree, name: str) -> None:
    leaves = jax.tree_util.tree_leaves(like)
    if not leaves:
        raise ValueError(f"{name} has no array leaves; pass a pytree shaped like the operator's input.")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"{name} must have floating-point leaves, got dtype {jnp.result_type(leaf)}; "
                "cast integer parameters/inputs to float first."
            )


# ----------------------------------------------------------------------------------------------
# Power iteration
# ----------------------------------------------------------------------------------------------


class PowerIterationResult(NamedTuple):
    """Result of :func:`power_iteration`.

    eigenvalue: Rayleigh quotient ``u^T A u`` of the returned unit vector (signed).
    vector: the unit vector ``u`` (same pytree structure as ``v0``), under ``stop_gradient``.
    num_iters_run: number of matvecs performed (``<= num_iters``).
    residual: ``||A u - eigenvalue * u||``, an a-posteriori error bound for the eigenvalue.
    """

    eigenvalue: Array
    vector: PyTree
    num_iters_run: Array
    residual: Array


def power_iteration(
    matvec: MatVec, v0: PyTree, num_iters: int, *, tol: float | None = None, unroll: int | bool = 1
) -> PowerIterationResult:
    """Power iteration for the largest-magnitude eigenvalue of a symmetric operator.

    ``u_0 = v0 / ||v0||``; ``u_{t+1} = A u_t / ||A u_t||``. The returned eigenvalue is the Rayleigh
    quotient ``u^T A u`` of the last vector that was multiplied, so ``|eigenvalue| <= max |lambda|``
    always holds, and ``residual = ||A u - eigenvalue u||`` bounds the distance to the spectrum.

    Cost: at most ``num_iters`` matvecs. With ``tol`` the loop (``lax.while_loop``) stops once
    ``residual <= tol * |eigenvalue|`` (relative residual); without it a ``lax.fori_loop`` runs
    exactly ``num_iters`` matvecs. The vectors are under ``stop_gradient``; the final matvec is
    outside the loop, so ``eigenvalue`` is differentiable through ``matvec`` (e.g. as a penalty)
    with the eigenvector treated as a constant (correct by the Hellmann-Feynman theorem).

    ``unroll`` is passed to ``lax.fori_loop`` (ignored with ``tol``): on XLA:CPU, convolutions inside
    a rolled loop run several times slower per matvec than unrolled (:mod:`lcnn_jax.loops`; figures in
    ``experiments/results/loops.md``), so callers with few iterations may unroll fully (``unroll=True``) at the
    price of a longer compilation.

    A zero start vector, or ``A u = 0``, gives eigenvalue 0 instead of NaN. Converges to the
    eigenvector of the largest ``|lambda|`` at rate ``|lambda_2 / lambda_1|`` per matvec.
    """
    num_iters = _check_positive_int(num_iters, "num_iters")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be None or a non-negative float, got {tol!r}.")
    _check_float_tree(v0, "v0")
    u0, _ = tree_normalize(lax.stop_gradient(v0))

    def step(u):
        w = lax.stop_gradient(matvec(u))
        lam = tree_vdot(u, w)
        res = tree_norm(_tree_axpy(-lam, u, w))
        w_unit, w_norm = tree_normalize(w)
        # If A u = 0, keep u: it is an exact eigenvector with eigenvalue 0.
        u_next = jax.tree_util.tree_map(lambda a, b: jnp.where(w_norm > 0, a, b), w_unit, u)
        return u_next, lam, res

    dtype = jnp.result_type(*jax.tree_util.tree_leaves(u0))
    if tol is None:
        u = lax.fori_loop(0, num_iters - 1, lambda _, u: step(u)[0], u0, unroll=unroll)
        iters_in_loop = jnp.asarray(num_iters - 1, jnp.int32)
    else:
        tol_arr = jnp.asarray(tol, dtype)

        def cond(carry):
            i, _, lam, res = carry
            return (i < num_iters - 1) & (res > tol_arr * jnp.abs(lam))

        def body(carry):
            i, u, _, _ = carry
            u, lam, res = step(u)
            return i + 1, u, lam, res

        init = (jnp.asarray(0, jnp.int32), u0, jnp.zeros((), dtype), jnp.full((), jnp.inf, dtype))
        iters_in_loop, u, _, _ = lax.while_loop(cond, body, init)

    u = lax.stop_gradient(u)
    w = matvec(u)
    lam = tree_vdot(u, w)
    res = lax.stop_gradient(tree_norm(_tree_axpy(-lam, u, w)))
    return PowerIterationResult(eigenvalue=lam, vector=u, num_iters_run=iters_in_loop + 1, residual=res)


# How long a loop runs rolled or unrolled is decided in lcnn_jax.loops (re-exported here for the measures).


# ----------------------------------------------------------------------------------------------
# Hutchinson trace
# ----------------------------------------------------------------------------------------------


class TraceEstimate(tuple):
    """A Hutchinson trace estimate that unpacks as ``(estimate, standard_error)`` and also says how converged it is.

    ``estimate``: the mean of the probe samples ``z^T A z``.  ``standard_error``: their ``std(ddof=1) / sqrt(P)``
    (0 for one probe, where it is unknown).  ``num_probes``: ``P``, the probes used (an int32 array; with ``tol``
    at most the cap).  ``converged``: whether ``standard_error <= tol * |estimate|`` (None without ``tol``,
    where nothing was asked).  A pytree (jit can return it); ``trace, se = result`` still works, the
    extra fields are attributes, as in SciPy's result objects.
    """

    def __new__(cls, estimate, standard_error, num_probes=None, converged=None):
        self = super().__new__(cls, (estimate, standard_error))
        self.num_probes, self.converged = num_probes, converged
        return self

    @property
    def estimate(self):
        return self[0]

    @property
    def standard_error(self):
        return self[1]

    def __repr__(self) -> str:
        return (f"TraceEstimate(estimate={self[0]!r}, standard_error={self[1]!r}, num_probes={self.num_probes!r}, "
                f"converged={self.converged!r})")


jax.tree_util.register_pytree_node(
    TraceEstimate, lambda t: ((t[0], t[1], t.num_probes, t.converged), None), lambda _, c: TraceEstimate(*c))


#: Hutchinson with ``tol`` never stops before this many probes: a standard error from fewer samples is itself too
#: noisy to stop on (with 2 probes it is 0 whenever the two samples happen to agree).
MIN_TOL_PROBES = 10


def hutchinson_samples(
    matvec: MatVec, key: PRNGKey, like: PyTree, num_probes: int, *, batch_size: int | None = None,
    unroll: int | bool | None = None, host_loop: bool = False, start: int | Array = 0,
) -> Array:
    """The ``num_probes`` Hutchinson samples ``z_i^T A z_i`` (shape ``(num_probes,)``), with Rademacher probes
    ``z_i`` drawn with the structure of ``like`` from ``fold_in(key, start + i)``; see :func:`hutchinson_trace`.
    Summing the samples of several operators with the same ``key`` gives the samples of their sum (the same
    probes), which is how the data-set mode of :func:`lcnn_jax.measures.hessian_trace` adds up batches.

    The probe loop is a ``lax.scan`` unrolled by ``auto_unroll(num_probes, unroll)``; ``batch_size`` runs that
    many probes at once (``lax.map`` with ``batch_size``: memory of ``batch_size`` matvecs)."""
    num_probes = _check_positive_int(num_probes, "num_probes")
    batch_size = _check_positive_int(batch_size, "batch_size", allow_none=True)
    _check_float_tree(like, "like")

    def sample(i):
        z = tree_rademacher(jax.random.fold_in(key, start + i), like)
        return tree_vdot(z, matvec(z))

    if host_loop:
        return jnp.stack([_host_sample(matvec, key, like, start + i) for i in range(num_probes)])
    if num_probes == 1:  # a length-1 scan still becomes a rolled loop on XLA:CPU
        return sample(0)[None]
    if batch_size is None:
        _, samples = lax.scan(lambda c, i: (c, sample(i)), None, jnp.arange(num_probes),
                              unroll=auto_unroll(num_probes, unroll))
        return samples
    return lax.map(sample, jnp.arange(num_probes), batch_size=batch_size)


# The host loop's probe: the flat draw of tree_rademacher as one compiled program, cut into leaves and the product
# raveled on the host (see _unravel_rows: compiled, that is a kernel per leaf on XLA:CPU).
_flat_probe_jit = jax.jit(lambda key, i, n, dtype: jax.random.rademacher(
    jax.random.fold_in(key, i), (n,), dtype=jnp.int32).astype(dtype), static_argnums=(2, 3))
_dot_jit = jax.jit(jnp.dot)


def _host_sample(matvec: MatVec, key: PRNGKey, like: PyTree, i) -> Array:
    """``z^T A z`` for the probe ``z = tree_rademacher(fold_in(key, i), like)``, outside a trace (the host loop's
    probe), in the dtype ``ravel_pytree`` gives ``like``."""
    leaves = jax.tree_util.tree_leaves(like)
    dtype = jnp.result_type(*leaves)
    n = sum(int(np.prod(jnp.shape(leaf), dtype=np.int64)) for leaf in leaves)
    z = _flat_probe_jit(key, jnp.asarray(i, jnp.uint32), n, dtype)
    az = _ravel_host(matvec(_unravel_rows(z, like)), dtype)
    return _dot_jit(z, az)


def hutchinson_summary(samples: Array) -> tuple[Array, Array]:
    """``(mean, standard_error)`` of Hutchinson samples; the standard error is ``std(ddof=1) / sqrt(P)``,
    0 for a single sample (where it is unknown)."""
    estimate = jnp.mean(samples)
    if samples.shape[0] == 1:
        return estimate, jnp.zeros_like(estimate)
    return estimate, jnp.std(samples, ddof=1) / jnp.sqrt(samples.shape[0])


def _check_tol(tol, name: str = "tol") -> None:
    if tol is None or isinstance(tol, jax.core.Tracer):
        return
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)) or not 0 < tol < np.inf:
        raise ValueError(f"{name} must be None or a positive finite float (a relative tolerance, e.g. 1e-2), "
                         f"got {tol!r}.")


def hutchinson_trace(
    matvec: MatVec, key: PRNGKey, like: PyTree, num_probes: int, *, batch_size: int | None = None,
    unroll: int | bool | None = None, host_loop: bool = False, tol: float | None = None,
    min_probes: int = MIN_TOL_PROBES,
) -> TraceEstimate:
    """Hutchinson estimate of ``tr(A)``: mean of ``z^T A z`` over Rademacher probes ``z``.

    Each probe is unbiased (``E[z z^T] = I``); returns a :class:`TraceEstimate`, which unpacks as
    ``(estimate, standard_error)`` with ``standard_error = std(samples, ddof=1) / sqrt(P)`` (0 for one probe,
    where it is unknown) and has ``num_probes`` and ``converged``. Probes are drawn with the pytree structure of
    ``like`` from ``fold_in(key, i)`` and evaluated sequentially, so memory is that of one matvec (``batch_size``
    at a time if given), not ``num_probes``. Cost: ``num_probes`` matvecs.

    ``tol`` (relative): stop at the first ``P >= min_probes`` (default 10) where the running standard error is at
    most ``tol * |estimate|``, or at ``num_probes``, which is then a cap (a ``lax.while_loop``, one matvec
    compiled; ``batch_size`` and ``unroll`` do not apply). The probes are the same as without ``tol``, so the
    estimate is the mean of the first ``P`` samples of the fixed-count run. Stopping on the estimated error is
    slightly optimistic (a run stops more easily where its samples happen to agree); the cap bounds the cost.

    Without ``tol`` the probe loop is a ``lax.scan`` unrolled by ``auto_unroll(num_probes, unroll)``: on XLA:CPU a
    convolutional network's HVP runs many times slower inside a rolled loop than unrolled
    (``experiments/results/loops.md``).
    ``host_loop=True`` runs the probes in a Python loop instead, for a ``matvec`` that cannot be traced (one
    that loops over a data set on the host); the probes and the result are the same (``tol`` then stops the
    Python loop).
    """
    num_probes = _check_positive_int(num_probes, "num_probes")
    _check_tol(tol)
    if tol is None:
        est, se = hutchinson_summary(hutchinson_samples(matvec, key, like, num_probes, batch_size=batch_size,
                                                        unroll=unroll, host_loop=host_loop))
        return TraceEstimate(est, se, jnp.asarray(num_probes, jnp.int32), None)
    min_probes = _check_positive_int(min_probes, "min_probes")
    _check_float_tree(like, "like")

    def sample(i):
        z = tree_rademacher(jax.random.fold_in(key, i), like)
        return tree_vdot(z, matvec(z))

    dtype = jnp.result_type(*jax.tree_util.tree_leaves(like))
    floor = min(max(min_probes, 2), num_probes)
    tol_arr = jnp.asarray(tol, dtype)

    def stats(n, mean, m2):
        se = jnp.where(n > 1, jnp.sqrt(m2 / jnp.maximum(n - 1, 1) / n), 0.0)
        return se, (n >= floor) & (se <= tol_arr * jnp.abs(mean))

    def update(carry, x):
        # Welford's running mean and sum of squared deviations (stable in float32)
        n, mean, m2 = carry
        n1 = n + 1
        delta = x - mean
        mean = mean + delta / n1.astype(dtype)
        return n1, mean, m2 + delta * (x - mean)

    init = (jnp.asarray(0, jnp.int32), jnp.zeros((), dtype), jnp.zeros((), dtype))
    if host_loop:
        carry = init
        for i in range(num_probes):
            carry = update(carry, _host_sample(matvec, key, like, i))
            if bool(stats(*carry)[1]):
                break
    else:
        def cond(carry):
            n = carry[0]
            return (n < num_probes) & ~stats(*carry)[1]

        carry = lax.while_loop(cond, lambda c: update(c, sample(c[0])), init)
    n, mean, m2 = carry
    se, done = stats(n, mean, m2)
    return TraceEstimate(mean, se, n, done)


# ----------------------------------------------------------------------------------------------
# Lanczos
# ----------------------------------------------------------------------------------------------


class LanczosResult(NamedTuple):
    """Tridiagonal ``T = Q^T A Q`` from :func:`lanczos`.

    alphas: (m,) diagonal of T.  betas: (m-1,) off-diagonal of T.
    last_beta: () norm of the part of ``A q_m`` outside the Krylov space; the residual of Ritz pair
    ``(theta_i, Q s_i)`` is ``|last_beta * s_{m,i}|`` (an a-posteriori accuracy bound, free of charge).
    basis: (m, n) orthonormal Lanczos vectors as rows, flattened in ``jax.flatten_util.ravel_pytree``
    order of ``like``; rows after a breakdown are zero.
    """

    alphas: Array
    betas: Array
    last_beta: Array
    basis: Array

    def tridiagonal(self) -> Array:
        """The dense (m, m) tridiagonal matrix ``T``."""
        return jnp.diag(self.alphas) + jnp.diag(self.betas, 1) + jnp.diag(self.betas, -1)


def _lanczos_step(j, basis, alphas, betas, w, breakdown_tol):
    """One Lanczos step after the matvec ``w = A q_j``: reorthogonalise, store ``alpha_j``, ``beta_j``, ``q_{j+1}``."""
    q = basis[j]
    w = lax.stop_gradient(w)
    w_scale = jnp.linalg.norm(w)
    alpha = jnp.dot(q, w)
    # Full reorthogonalisation against every stored row (unfilled rows are zero, so harmless);
    # it subsumes the three-term recurrence w -= alpha q_j + beta q_{j-1}.
    w = w - basis.T @ (basis @ w)
    w = w - basis.T @ (basis @ w)
    beta = jnp.linalg.norm(w)
    broke = beta <= breakdown_tol * w_scale
    beta = jnp.where(broke, 0.0, beta)
    q_next = jnp.where(broke, 0.0, w / jnp.where(broke, 1.0, beta))
    alphas = alphas.at[j].set(alpha)
    betas = betas.at[j].set(beta)
    # On the last step j = m-1 the index is out of range and the update is dropped.
    basis = basis.at[j + 1].set(q_next, mode="drop")
    return basis, alphas, betas


def _lanczos_init(key, like, v0, num_iters):
    """The empty basis with ``q_1 = v0 / ||v0||`` in its first row, the alphas, betas and breakdown tolerance."""
    flat_like, _ = ravel_pytree(like)
    n, dtype = flat_like.shape[0], flat_like.dtype
    if v0 is None:  # the same values as ravel_pytree(tree_rademacher(key, like)), without the round trip via leaves
        q0 = jax.random.rademacher(key, (n,), dtype=jnp.int32)
    else:
        q0, _ = ravel_pytree(v0)
    q0 = lax.stop_gradient(q0.astype(dtype))
    q0 = q0 / jnp.maximum(jnp.linalg.norm(q0), jnp.finfo(dtype).tiny)
    # Rounding left after two Gram-Schmidt passes against j <= m vectors is ~ sqrt(m) eps ||A q||;
    # a beta below that is noise (the Krylov space is invariant to working precision).
    breakdown_tol = 10 * jnp.sqrt(jnp.asarray(num_iters, dtype)) * jnp.finfo(dtype).eps
    basis = jnp.zeros((num_iters, n), dtype).at[0].set(q0)
    alphas = jnp.zeros((num_iters,), dtype)
    betas = jnp.zeros((num_iters,), dtype)  # betas[j] couples q_j and q_{j+1}; betas[m-1] is last_beta
    return basis, alphas, betas, breakdown_tol


# The glue around the matvecs as cached programs (keyed by shapes): a host-loop Lanczos compiles a fixed handful
# of programs besides the matvec however many steps it runs, and an eager call does not run op by op.
# Inside an outer jit they are simply inlined.
_lanczos_init_jit = jax.jit(_lanczos_init, static_argnums=3)
# The host loop converts between the flat basis rows and the matvec's pytrees on the host (NumPy), not in compiled
# programs: on XLA:CPU each leaf is a kernel of its own, and for ResNet-18's 62 leaves the two conversions took
# longer to compile than its HVP (the host loop is the CPU's choice; a copy there is a memcpy).
_row_jit = jax.jit(lambda basis, j: basis[j])
_lanczos_step_jit = jax.jit(lambda j, basis, alphas, betas, w, tol: _lanczos_step(
    j, basis, alphas, betas, w.astype(basis.dtype), tol))


def lanczos(
    matvec: MatVec, key: PRNGKey, like: PyTree, num_iters: int, *, v0: PyTree | None = None,
    unroll: int | bool | None = None, host_loop: bool = False, stop: Callable | None = None,
) -> LanczosResult:
    """Lanczos tridiagonalisation with full reorthogonalisation.

    Starting from ``q_1 = v0 / ||v0||`` (Rademacher from ``key`` if ``v0`` is None) builds an
    orthonormal basis ``Q = [q_1..q_m]`` of the Krylov space and ``T = Q^T A Q`` (tridiagonal).
    Every new vector is orthogonalised against all previous ones (twice, classical Gram-Schmidt),
    which prevents the spurious "ghost" eigenvalues of plain Lanczos in floating point. If the Krylov
    space becomes invariant (``beta ~ 0``, e.g. ``m > n``) the remaining rows are zero and decouple
    from T, so they add eigenvalue 0 with zero quadrature weight.

    Cost: ``m = num_iters`` matvecs plus ``O(m^2 n)`` flops; memory ``m * n`` floats for the basis.
    Vectors are under ``stop_gradient`` (no gradients flow through the result). The loop is unrolled
    by ``auto_unroll(num_iters, unroll)`` (see :func:`hutchinson_trace` for why). ``host_loop=True``
    runs the ``m`` steps in a Python loop (everything but the matvec in cached jitted programs), for a
    ``matvec`` that cannot be traced, e.g. one that loops over a data set on the host; same arithmetic.

    ``stop(alphas, betas, s) -> bool``, evaluated after each step with ``s`` steps done (``alphas[:s]``,
    ``betas[:s]`` filled; ``betas[s - 1]`` couples the Krylov space to the next vector), ends the iteration early
    (a ``lax.while_loop``; ``unroll`` does not apply). The result is then that of ``s`` steps padded to ``m``:
    rows ``>= s`` of the basis are zero and decouple, and ``last_beta`` is ``betas[s - 1]``.
    """
    num_iters = _check_positive_int(num_iters, "num_iters")
    _check_float_tree(like, "like")
    m = num_iters
    basis, alphas, betas, tol = _lanczos_init_jit(key, like, v0, m)
    if host_loop:
        steps = m
        for j in range(m):
            w = _ravel_host(matvec(_unravel_rows(_row_jit(basis, j), like)), basis.dtype)
            basis, alphas, betas = _lanczos_step_jit(j, basis, alphas, betas, w, tol)
            if stop is not None and bool(stop(alphas, betas, j + 1)):
                steps = j + 1
                break
        return _truncate_jit(basis, alphas, betas, steps)
    _, unravel = ravel_pytree(like)

    def body(j, carry):
        basis, alphas, betas = carry
        w = ravel_pytree(matvec(unravel(basis[j])))[0].astype(basis.dtype)
        return _lanczos_step(j, basis, alphas, betas, w, tol)

    if stop is None:
        basis, alphas, betas = lax.fori_loop(0, m, body, (basis, alphas, betas), unroll=auto_unroll(m, unroll))
        return _truncate_jit(basis, alphas, betas, m)

    def cond(carry):
        j, _, alphas, betas, done = carry
        return (j < m) & ~done

    def while_body(carry):
        j, basis, alphas, betas, _ = carry
        basis, alphas, betas = body(j, (basis, alphas, betas))
        return j + 1, basis, alphas, betas, jnp.asarray(stop(alphas, betas, j + 1))

    steps, basis, alphas, betas, _ = lax.while_loop(
        cond, while_body, (jnp.asarray(0, jnp.int32), basis, alphas, betas, jnp.asarray(False)))
    return _truncate_jit(basis, alphas, betas, steps)


def _truncate(basis, alphas, betas, steps) -> LanczosResult:
    """The result of ``steps`` Lanczos steps in arrays of ``m``: later rows zeroed, ``betas[steps - 1]`` last."""
    m = alphas.shape[0]
    idx = jnp.arange(m)
    basis = jnp.where((idx < steps)[:, None], basis, 0.0)
    last_beta = betas[steps - 1]
    betas = jnp.where(idx < steps - 1, betas, 0.0)
    return LanczosResult(alphas=jnp.where(idx < steps, alphas, 0.0), betas=betas[:-1], last_beta=last_beta,
                         basis=basis)


_truncate_jit = jax.jit(_truncate)


def _ritz_rows(alphas: Array, offdiag: Array, row_live: Array) -> tuple[Array, Array, Array]:
    """Eigen-decomposition of the tridiagonal ``T``, with a mask of the Ritz pairs that belong to the live rows.

    Dead rows (after a breakdown or an early stop) are decoupled and their diagonal is moved below every genuine
    Ritz value (a Gershgorin bound), so that they never mix with a genuine zero eigenvalue inside ``eigh``;
    ``live`` then marks the pairs whose vector lives on genuine rows.
    """
    offdiag = jnp.where(row_live[:-1] & row_live[1:], offdiag, 0.0)
    bound = jnp.sum(jnp.abs(alphas)) + 2 * jnp.sum(jnp.abs(offdiag)) + 1.0
    t = jnp.diag(jnp.where(row_live, alphas, -bound)) + jnp.diag(offdiag, 1) + jnp.diag(offdiag, -1)
    theta, s = jnp.linalg.eigh(t)
    live_mass = jnp.sum(jnp.where(row_live[:, None], jnp.square(s), 0.0), axis=0)
    live = live_mass > 0.5
    return jnp.where(live, theta, 0.0), s, live


def _ritz(res: LanczosResult) -> tuple[Array, Array, Array]:
    """:func:`_ritz_rows` of a finished run (live rows: the non-zero rows of the basis)."""
    return _ritz_rows(res.alphas, res.betas, jnp.any(res.basis != 0, axis=1))


def _select(theta: Array, live: Array, k: int, which: str) -> Array:
    score = jnp.where(live, theta if which == "largest" else jnp.abs(theta), -jnp.inf)
    return jnp.argsort(-score)[:k]


def _top_k_converged(alphas: Array, betas: Array, steps, k: int, which: str, tol) -> Array:
    """Whether the top-``k`` Ritz pairs of the first ``steps`` Lanczos steps have residuals
    ``|beta_s s_{s,i}| <= tol |theta_i|`` (never before ``k`` steps)."""
    m = alphas.shape[0]
    row_live = jnp.arange(m) < steps
    theta, s, live = _ritz_rows(alphas, betas[:-1], row_live)
    order = _select(theta, live, k, which)
    last_row = s[jnp.maximum(steps - 1, 0)]
    residuals = jnp.abs(betas[jnp.maximum(steps - 1, 0)] * last_row[order])
    return (steps >= k) & jnp.all(residuals <= tol * jnp.abs(theta[order]))


class EigenResult(NamedTuple):
    """eigenvalues: (k,) sorted descending by the selection criterion.  eigenvectors: pytree like the
    operator's input whose leaves have a leading k axis (unit Ritz vectors).  residuals: (k,)
    Lanczos a-posteriori bounds ``||A y_i - theta_i y_i|| = |last_beta * s_{m,i}|``: each eigenvalue is within
    its residual of an eigenvalue of ``A``.  num_iters: the Lanczos steps run (matvecs).  converged: with ``tol``,
    whether every ``residuals[i] <= tol * |eigenvalues[i]|`` (None without ``tol``)."""

    eigenvalues: Array
    eigenvectors: PyTree
    residuals: Array
    num_iters: Array = None
    converged: Array = None


def lanczos_top_eigenvalues(
    matvec: MatVec,
    key: PRNGKey,
    like: PyTree,
    k: int,
    num_iters: int,
    *,
    which: str = "largest",
    v0: PyTree | None = None,
    unroll: int | bool | None = None,
    host_loop: bool = False,
    tol: float | None = None,
) -> EigenResult:
    """Top-``k`` eigenpairs of a symmetric operator from ``num_iters`` Lanczos steps (Ritz pairs).

    ``which="largest"`` returns the ``k`` largest (algebraic) eigenvalues, ``"magnitude"`` the ``k``
    of largest ``|lambda|``. Extreme eigenvalues converge first; use ``num_iters`` several times
    ``k`` (e.g. ``>= 2k + 10``) and check ``residuals``. Cost: ``num_iters`` matvecs. ``host_loop``: see
    :func:`lanczos`.

    ``tol`` (relative): stop after the first step where each of the top-``k`` Ritz pairs has residual
    ``<= tol * |theta|``; ``num_iters`` is then a cap, ``num_iters`` and ``converged`` of the result say where
    it stopped (each step adds an ``eigh`` of the ``num_iters``-square tridiagonal matrix, negligible next to a
    matvec of a network). The residual bounds the eigenvalue's distance to the spectrum of ``A``; the error of a
    well-separated Ritz value is smaller still, of order ``residual^2 / gap``.
    """
    k = _check_positive_int(k, "k")
    num_iters = _check_positive_int(num_iters, "num_iters")
    if k > num_iters:
        raise ValueError(f"k={k} eigenvalues need num_iters >= k Lanczos steps, got num_iters={num_iters}.")
    if which not in ("largest", "magnitude"):
        raise ValueError(f"which must be 'largest' or 'magnitude', got {which!r}.")
    _check_tol(tol)
    stop = None
    if tol is not None:
        stop = lambda alphas, betas, steps: _top_k_converged_jit(alphas, betas, steps, k, which, tol)  # noqa: E731
    res = lanczos(matvec, key, like, num_iters, v0=v0, unroll=unroll, host_loop=host_loop, stop=stop)
    out = _top_ritz_pairs_jit(res, k, which)
    out = out._replace(eigenvectors=_unravel_rows(out.eigenvectors, like))
    if tol is None:
        return out
    converged = jnp.all(out.residuals <= tol * jnp.abs(out.eigenvalues))
    return out._replace(converged=converged)


def _unravel_rows(rows: Array, like: PyTree) -> PyTree:
    """``rows`` (k, n) as a pytree shaped like ``like`` with a leading k axis, or one flat vector (n,) as a pytree
    shaped like ``like``. Traced: inside the caller's program. Concrete: cut on the host (NumPy views, then one
    transfer per leaf), because a compiled unravel is a kernel per leaf on XLA:CPU (0.4-0.8 s of compilation for
    ResNet-18's 62 leaves, for one call)."""
    if isinstance(rows, jax.core.Tracer):
        unravel = ravel_pytree(like)[1]
        return jax.vmap(unravel)(rows) if rows.ndim == 2 else unravel(rows)
    leaves, treedef = jax.tree_util.tree_flatten(like)
    host = np.asarray(rows)
    lead = host.shape[:-1]  # (k,) or ()
    out, start = [], 0
    for leaf in leaves:
        shape, size = jnp.shape(leaf), int(np.prod(jnp.shape(leaf), dtype=np.int64))
        out.append(jnp.asarray(host[..., start:start + size].reshape(lead + shape), dtype=jnp.result_type(leaf)))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


def _ravel_host(tree: PyTree, dtype) -> Array:
    """``ravel_pytree(tree)[0]`` in ``dtype``, concatenated on the host (see :func:`_unravel_rows`)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.asarray(np.concatenate([np.asarray(leaf, dtype=dtype).ravel() for leaf in leaves]))


def _top_ritz_pairs(res: LanczosResult, k: int, which: str) -> EigenResult:
    """The top-``k`` Ritz pairs, the eigenvectors as flat rows (k, n)."""
    theta, s, live = _ritz(res)
    order = _select(theta, live, k, which)
    theta = jnp.where(live, theta, jnp.nan)  # only if k exceeds the dimension of the Krylov space
    theta_k, s_k = theta[order], s[:, order]
    eigvecs = (res.basis.T @ s_k).T
    # the residual couples the last live row (the last step run) to the next Lanczos vector
    steps = jnp.sum(jnp.any(res.basis != 0, axis=1))
    residuals = jnp.abs(res.last_beta * s_k[jnp.maximum(steps - 1, 0), :])
    return EigenResult(eigenvalues=theta_k, eigenvectors=eigvecs, residuals=residuals,
                       num_iters=steps.astype(jnp.int32))


_top_ritz_pairs_jit = jax.jit(_top_ritz_pairs, static_argnums=(1, 2))
_top_k_converged_jit = jax.jit(_top_k_converged, static_argnums=(3, 4))


# ----------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature
# ----------------------------------------------------------------------------------------------


class SpectralDensity(NamedTuple):
    """Result of :func:`spectral_density`.

    grid: (G,) evaluation points.  density: (G,) estimated eigenvalue density (integrates to ~1).
    nodes, weights: (num_runs, m) Ritz values and Gauss quadrature weights of each run (the weights
    of a run sum to 1; nodes beyond a Lanczos breakdown are 0 with weight 0).
    ``n * mean(sum(weights * nodes, -1))`` is itself a Hutchinson-type estimate of the trace.
    """

    grid: Array
    density: Array
    nodes: Array
    weights: Array


def spectral_density(
    matvec: MatVec,
    key: PRNGKey,
    like: PyTree,
    num_iters: int,
    num_runs: int = 1,
    grid: int | Array = 1000,
    sigma: float | None = None,
    *,
    host_loop: bool = False,
) -> SpectralDensity:
    """Eigenvalue density by stochastic Lanczos quadrature (SLQ) with Gaussian broadening.

    For each run, a random unit vector ``v`` (Rademacher / sqrt(n)) and ``num_iters`` Lanczos steps give
    ``T = S diag(theta) S^T``; the spectral measure ``v^T delta(A - t) v`` is approximated by Gauss
    quadrature with nodes ``theta_i`` and weights ``w_i = S_{1i}^2`` (sum 1). The density is the run
    average of ``sum_i w_i N(t; theta_i, sigma^2)``, so it integrates to 1 when the grid covers the
    spectrum and its mean ``sum_i w_i theta_i = v^T A v`` is an unbiased estimate of ``tr(A) / n``.

    ``grid``: an array of evaluation points, or a number of points spread over the Ritz-value range
    padded by ``3 sigma`` (then G is static). ``sigma``: broadening width; default 1% of that range
    (at least ``1e-6``, scale-free). Runs are evaluated sequentially (``lax.map``), so memory is one
    Lanczos basis (``num_iters * n`` floats). Cost: ``num_runs * num_iters`` matvecs. ``host_loop``: runs and
    steps in Python loops, for a ``matvec`` that cannot be traced (see :func:`lanczos`).
    """
    num_iters = _check_positive_int(num_iters, "num_iters")
    num_runs = _check_positive_int(num_runs, "num_runs")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be a positive float or None, got {sigma!r}.")
    if isinstance(grid, int) and grid < 2:
        raise ValueError(f"grid must be an array of points or an integer >= 2, got {grid!r}.")
    _check_float_tree(like, "like")

    def one_run(i):
        res = lanczos(matvec, jax.random.fold_in(key, i), like, num_iters, host_loop=host_loop)
        return _quadrature_jit(res)

    if host_loop:
        nodes, weights, live = (jnp.stack(a) for a in zip(*[one_run(i) for i in range(num_runs)]))
    else:
        nodes, weights, live = lax.map(one_run, jnp.arange(num_runs))
    num_points = grid if isinstance(grid, int) else None
    return _broadening_jit(nodes, weights, live, None if num_points else grid, sigma, num_points=num_points)


def _quadrature(res: LanczosResult) -> tuple[Array, Array, Array]:
    """Gauss quadrature nodes (Ritz values), weights (squared first components) and the live mask of one run."""
    theta, s, live = _ritz(res)
    return theta, jnp.where(live, jnp.square(s[0, :]), 0.0), live


def _broadening(nodes, weights, live, grid, sigma, num_points: int | None = None) -> SpectralDensity:
    """Gaussian broadening of the quadrature rules of all runs on ``grid`` (or ``num_points`` points)."""
    lo = jnp.min(jnp.where(live, nodes, jnp.inf))
    hi = jnp.max(jnp.where(live, nodes, -jnp.inf))
    span = hi - lo
    if sigma is None:
        sig = jnp.maximum(0.01 * span, 1e-6 * jnp.maximum(jnp.max(jnp.abs(nodes)), 1.0))
    else:
        sig = jnp.asarray(sigma, nodes.dtype)
    if num_points is not None:
        pts = jnp.linspace(lo - 3 * sig, hi + 3 * sig, num_points).astype(nodes.dtype)
    else:
        pts = jnp.asarray(grid, nodes.dtype)
        if pts.ndim != 1:
            raise ValueError(f"grid must be 1-D, got shape {pts.shape}.")
    z = (pts[None, None, :] - nodes[..., None]) / sig
    gauss = jnp.exp(-0.5 * z * z) / (sig * jnp.sqrt(2 * jnp.pi))
    density = jnp.mean(jnp.sum(weights[..., None] * gauss, axis=1), axis=0)
    return SpectralDensity(grid=pts, density=density, nodes=nodes, weights=weights)


_quadrature_jit = jax.jit(_quadrature)
_broadening_jit = jax.jit(_broadening, static_argnames="num_points")
