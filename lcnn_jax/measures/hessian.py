"""Parameter-space Hessian of a loss: trace, top eigenvalues and spectral density (PyHessian in JAX).

``loss_fn(params) -> scalar`` is the loss on a fixed batch (or data set) as a function of the
parameter pytree alone, e.g. ``lambda p: mean_ce(model.apply({"params": p}, xs), ys)``. All
products are forward-over-reverse Hessian-vector products through one ``jax.linearize`` of the
gradient, so the forward and backward pass run once and each HVP evaluates the tangent program only.
The functions are pure and traceable (jit them with ``loss_fn`` closed over)::

    import jax
    from lcnn_jax.measures.hessian import hessian_trace, hessian_top_eigenvalues, hessian_spectral_density

    trace, stderr = hessian_trace(loss_fn, params, key=jax.random.key(0), num_probes=100)
    top = hessian_top_eigenvalues(loss_fn, params, key=jax.random.key(1), k=5)     # .eigenvalues (5,)
    sd = hessian_spectral_density(loss_fn, params, key=jax.random.key(2))         # .grid, .density
"""
from __future__ import annotations

from typing import Callable

import jax

from lcnn_jax.autodiff import check_positive_int, linearized_param_hvp
from lcnn_jax.estimators import (
    EigenResult,
    SpectralDensity,
    hutchinson_trace,
    lanczos_top_eigenvalues,
    spectral_density,
)
from lcnn_jax.types import Array, Params, PRNGKey

__all__ = ["hessian_trace", "hessian_top_eigenvalues", "hessian_spectral_density"]


def _hvp(loss_fn: Callable[[Params], Array], params: Params) -> Callable[[Params], Params]:
    if not jax.tree_util.tree_leaves(params):
        raise ValueError("params has no array leaves; pass the parameter pytree the loss depends on.")
    _, hvp = linearized_param_hvp(loss_fn, params)
    return hvp


def hessian_trace(
    loss_fn: Callable[[Params], Array],
    params: Params,
    *,
    key: PRNGKey,
    num_probes: int = 100,
    batch_size: int | None = None,
    unroll: int | bool | None = None,
) -> tuple[Array, Array]:
    """Hutchinson estimate of ``tr(d^2 loss / d params^2)``: returns ``(estimate, standard_error)``.

    Mean of ``z^T H z`` over ``num_probes`` Rademacher probes ``z`` shaped like ``params``; the
    standard error is ``std / sqrt(num_probes)``. Probes run sequentially (``batch_size`` at a time),
    so memory is one linearisation plus ``batch_size`` HVPs. Cost: ``num_probes`` HVPs.
    """
    num_probes = check_positive_int(num_probes, "num_probes")
    return hutchinson_trace(_hvp(loss_fn, params), key, params, num_probes, batch_size=batch_size, unroll=unroll)


def hessian_top_eigenvalues(
    loss_fn: Callable[[Params], Array],
    params: Params,
    *,
    key: PRNGKey,
    k: int = 1,
    num_iters: int | None = None,
    which: str = "largest",
    unroll: int | bool | None = None,
) -> EigenResult:
    """Top-``k`` Hessian eigenpairs by Lanczos with full reorthogonalisation.

    Returns :class:`~lcnn_jax.estimators.EigenResult` ``(eigenvalues (k,) descending, eigenvectors
    (pytree with leading k axis), residuals (k,))``; ``which="magnitude"`` ranks by ``|lambda|``.
    ``num_iters`` defaults to ``max(2k + 20, 30)`` Lanczos steps (= HVPs); check ``residuals``
    (``||H y - lambda y||``) and raise it if they are not small. Memory: ``num_iters`` copies of the
    parameters (the Lanczos basis).
    """
    k = check_positive_int(k, "k")
    num_iters = max(2 * k + 20, 30) if num_iters is None else check_positive_int(num_iters, "num_iters")
    return lanczos_top_eigenvalues(_hvp(loss_fn, params), key, params, k, num_iters, which=which, unroll=unroll)


def hessian_spectral_density(
    loss_fn: Callable[[Params], Array],
    params: Params,
    *,
    key: PRNGKey,
    num_iters: int = 80,
    num_runs: int = 1,
    grid: int | Array = 1000,
    sigma: float | None = None,
) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019; PyHessian).

    ``num_runs`` independent Lanczos runs of ``num_iters`` steps each, Gaussian broadening of width
    ``sigma`` (default 1% of the Ritz-value range); see :func:`lcnn_jax.estimators.spectral_density`.
    Returns ``(grid, density, nodes, weights)``; the density integrates to ~1. Cost:
    ``num_runs * num_iters`` HVPs; memory one Lanczos basis (``num_iters`` parameter copies).
    """
    return spectral_density(_hvp(loss_fn, params), key, params, num_iters, num_runs, grid, sigma)
