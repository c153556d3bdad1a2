"""Parameter-space Hessian of a loss: trace, top eigenvalues and spectral density (PyHessian in JAX).

Two modes, as in PyHessian (one batch, or a whole data loader):

* **one batch** (closure): ``loss_fn(params) -> scalar`` is the loss on a fixed batch as a function of the
  parameter pytree alone, e.g. ``lambda p: mean_ce(model.apply({"params": p}, xs), ys)``. All products are
  forward-over-reverse Hessian-vector products through one ``jax.linearize`` of the gradient, so the forward
  and backward pass run once and each HVP evaluates the tangent program only. The functions are pure and
  traceable. Jit them with the parameters AND the batch as arguments of the jitted function, building
  ``loss_fn`` inside it (as below): arrays a jitted function closes over become constants of the XLA program,
  which lengthens compilation (and with the parameters among them XLA may fold the forward pass into constants),
  and a new batch or new weights would compile again.
* **data set** (``data=``): ``loss_fn(params, batch) -> (B,)`` returns the PER-EXAMPLE losses of one batch,
  and the measured loss is the mean over all ``N`` examples of the data set,
  ``L(theta) = (1/N) sum_i l_i(theta)``, so ``H v = (1/N) sum_batches sum_{i in batch} hess(l_i) v``: every
  example weighs ``1/N`` and a smaller last batch counts in proportion to its size (PyHessian's dataloader
  convention; NOT the plain mean of batch means). ``data`` is an iterable of batches (a list, a re-iterable
  loader, or a zero-argument function returning a fresh iterator; pytrees of arrays with the examples on the
  leading axis), or arrays such as ``(xs, ys)`` split into chunks of ``chunk_size``. Batches are split or
  padded (masked) to one chunk size, the first batch's (capped by ``chunk_size``), and the per-chunk
  function is jitted with ``params`` and the batch as arguments, so it compiles ONCE and device memory holds
  one chunk at a time. These calls loop over the data on the host and are not themselves jittable; arrays
  closed over by ``loss_fn`` (e.g. ``batch_stats``) are baked into the program as constants, so keep them small.

Example::

    import jax, jax.numpy as jnp, numpy as np
    from lcnn_jax.measures import hessian_trace, hessian_top_eigenvalues, hessian_spectral_density

    params = {"w": jnp.ones((3, 2)) / 3, "b": jnp.zeros(2)}
    xs, ys = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32), np.arange(100) % 2
    def per_example_ce(p, batch):                                  # (B,) losses of one batch
        x, y = batch
        z = x @ p["w"] + p["b"]
        return jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], 1)[:, 0]

    # one batch: parameters and batch are arguments of the jitted function; 100 probes, 10 at a time
    @jax.jit
    def trace_of(p, x, y, k):
        return hessian_trace(lambda q: per_example_ce(q, (x, y)).mean(), p, key=k, num_probes=100, batch_size=10)

    trace, stderr = trace_of(params, xs, ys, jax.random.key(0))   # compiled once: new weights or data reuse it
    # stop once the standard error is 1 % of the trace (at most 500 probes); says where it stopped
    res = jax.jit(lambda p, x, y, k: hessian_trace(lambda q: per_example_ce(q, (x, y)).mean(), p, key=k,
                                                   num_probes=500, tol=0.01))(params, xs, ys, jax.random.key(0))
    res.num_probes, res.converged
    # the data set, 32 examples at a time (or data=[batch, ...], or data=a loader / iterator factory);
    # hessian_trace(per_example_ce, params, key=..., data=(xs, ys), chunk_size=32) likewise
    top = hessian_top_eigenvalues(per_example_ce, params, key=jax.random.key(1), k=2,
                                  data=(xs, ys), chunk_size=32)          # .eigenvalues (2,), .residuals
    sd = hessian_spectral_density(per_example_ce, params, key=jax.random.key(2), num_iters=30,
                                  data=(xs, ys), chunk_size=32)          # .grid, .density

Cost of the data-set mode: Hutchinson makes ONE pass, each chunk one linearisation
(a forward and a backward pass) plus ``num_probes`` tangent evaluations; Lanczos makes ``num_iters`` passes and
SLQ ``num_runs * num_iters`` passes, each chunk one forward-over-reverse HVP (about 2-3 gradient evaluations).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lcnn_jax import loops
from lcnn_jax.autodiff import check_positive_int, linearized_param_hvp
from lcnn_jax.estimators import (
    MIN_TOL_PROBES,
    EigenResult,
    SpectralDensity,
    TraceEstimate,
    hutchinson_samples,
    hutchinson_summary,
    hutchinson_trace,
    lanczos_top_eigenvalues,
    spectral_density,
)
from lcnn_jax.measures._dataset import Batches
from lcnn_jax.types import Array, Params, PRNGKey

__all__ = ["hessian_trace", "hessian_top_eigenvalues", "hessian_spectral_density", "dataset_hvp", "DatasetHVP"]


def _check_params(params: Params) -> None:
    if not jax.tree_util.tree_leaves(params):
        raise ValueError("params has no array leaves; pass the parameter pytree the loss depends on.")


def _hvp(loss_fn: Callable[[Params], Array], params: Params) -> Callable[[Params], Params]:
    _check_params(params)
    _, hvp = linearized_param_hvp(loss_fn, params)
    return hvp


def _jitted_hvp(loss_fn: Callable[[Params], Array], params: Params) -> Callable[[Params], Params]:
    """``v -> H v`` as ONE compiled program (forward-over-reverse), for loops driven from the host; compiled once
    per ``loss_fn`` object among the last few used (a second measure of the same loss reuses it)."""
    _check_params(params)
    hvp = _compiled_hvp(loss_fn)
    return lambda v: hvp(params, v)


@functools.lru_cache(maxsize=8)  # bounded: a loss closure holds its batch, and the cache keeps it alive
def _compiled_hvp(loss_fn: Callable[[Params], Array]):
    return jax.jit(lambda p, v: jax.jvp(jax.grad(loss_fn), (p,), (v,))[1])


# ----------------------------------------------------------------------------------------------
# Data-set mode
# ----------------------------------------------------------------------------------------------


def _check_data_mode(loss_fn: Callable, params: Params, data: Any, chunk_size: int | None) -> None:
    _check_params(params)
    if data is None:
        if chunk_size is not None:
            raise ValueError("chunk_size splits the arrays of data= into batches; pass data= too, or drop chunk_size.")
        return
    try:
        inspect.signature(loss_fn).bind(params, None)
    except TypeError:
        raise ValueError("with data=, loss_fn(params, batch) must take the parameters and one batch and return the "
                         "per-example losses (B,); without data=, loss_fn(params) is the loss of a fixed batch."
                         ) from None
    except ValueError:  # no signature available (a builtin or C function): let the call decide
        pass


def _masked_sum(loss_fn: Callable, params: Params, batch: Any, mask: Array) -> Array:
    losses = loss_fn(params, batch)
    if jnp.shape(losses) != mask.shape:
        raise ValueError(
            f"with data=, loss_fn(params, batch) must return the per-example losses, shape ({mask.shape[0]},) for a "
            f"chunk of {mask.shape[0]} examples; got shape {jnp.shape(losses)}. Drop the final .mean(): the mean "
            "over the whole data set is taken here (every example weighs 1/N).")
    return jnp.sum(jnp.where(mask, losses, jnp.zeros_like(losses)))


@functools.partial(jax.jit, static_argnums=0)
def _hvp_sum(loss_fn, params, batch, mask, v, acc):
    """``acc + sum_{i in chunk, real} hess(l_i) v`` (forward-over-reverse; params and batch are arguments)."""
    hv = jax.jvp(jax.grad(lambda p: _masked_sum(loss_fn, p, batch, mask)), (params,), (v,))[1]
    return jax.tree_util.tree_map(jnp.add, acc, hv)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_probes", "batch_size", "unroll"))
def _trace_samples(loss_fn, params, batch, mask, key, start, *, num_probes, batch_size, unroll):
    """Hutchinson samples ``z_p^T (sum_{i in chunk} hess(l_i)) z_p`` with the probes of ``fold_in(key, p)``,
    ``p = start .. start + num_probes - 1``."""
    _, hvp = jax.linearize(jax.grad(lambda p: _masked_sum(loss_fn, p, batch, mask)), params)
    return hutchinson_samples(hvp, key, params, num_probes, batch_size=batch_size, unroll=unroll, start=start)


# Host-side glue as cached programs (a handful of compilations in all, not one per eager operation).
_zeros_like_jit = jax.jit(lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree))
_divide_jit = jax.jit(lambda tree, n: jax.tree_util.tree_map(lambda a: a / n.astype(a.dtype), tree))
_add_jit = jax.jit(jnp.add)
_scale_jit = jax.jit(lambda total, n: total / n.astype(total.dtype))


class DatasetHVP:
    """``v -> H v`` for the Hessian of the mean per-example loss over a data set (see :func:`dataset_hvp`).

    Attributes: ``num_examples`` (``N``, known after the first product), ``chunk_size`` (examples per compiled
    call, known after the first product), ``num_passes`` (products computed so far = passes over the data).
    """

    def __init__(self, loss_fn: Callable, params: Params, data: Any, *, chunk_size: int | None = None,
                 multi_pass: bool = True):
        _check_data_mode(loss_fn, params, data, chunk_size)
        self.loss_fn, self.params = loss_fn, params
        self._batches = Batches(data, chunk_size, multi_pass=multi_pass)
        self.num_passes = 0

    @property
    def num_examples(self) -> int | None:
        return self._batches.num_examples

    @property
    def chunk_size(self) -> int | None:
        return self._batches.size

    def __call__(self, v: Params) -> Params:
        acc = _zeros_like_jit(self.params)
        for batch, mask in self._batches.chunks():
            acc = _hvp_sum(self.loss_fn, self.params, batch, mask, v, acc)
        self.num_passes += 1
        return _divide_jit(acc, self._batches.num_examples)


def dataset_hvp(loss_fn: Callable[[Params, Any], Array], params: Params, data: Any, *,
                chunk_size: int | None = None) -> DatasetHVP:
    """The Hessian-vector product of the mean loss over a data set, ``v -> H v`` (curvlinops' / PyHessian's
    data-loader operator).

    ``H v = (1/N) sum_batches sum_{i in batch} d^2 l_i / d params^2 v`` with ``l = loss_fn(params, batch)`` the
    per-example losses ``(B,)``; ``data`` and ``chunk_size`` as in the module docstring. Each call is one pass
    over the data: per chunk one forward-over-reverse HVP in a program compiled once. The result is a
    :class:`DatasetHVP`; plug it into :mod:`lcnn_jax.estimators` with ``host_loop=True`` (it loops on the host,
    so it cannot be traced).
    """
    return DatasetHVP(loss_fn, params, data, chunk_size=chunk_size)


def hessian_trace(
    loss_fn: Callable[[Params], Array],
    params: Params,
    *,
    key: PRNGKey,
    num_probes: int = 100,
    batch_size: int | None = None,
    unroll: int | bool | None = None,
    data: Any = None,
    chunk_size: int | None = None,
    tol: float | None = None,
    min_probes: int = MIN_TOL_PROBES,
    host_loop: bool | None = None,
) -> TraceEstimate:
    """Hutchinson estimate of ``tr(d^2 loss / d params^2)``: a :class:`~lcnn_jax.estimators.TraceEstimate`, which
    unpacks as ``(estimate, standard_error)`` and has ``num_probes`` and ``converged``.

    Mean of ``z^T H z`` over ``num_probes`` Rademacher probes ``z`` shaped like ``params``; the standard error
    is that of the mean, ``std(samples, ddof=1) / sqrt(num_probes)`` (0 for one probe). Probes run sequentially
    (``batch_size`` at a time), so memory is one linearisation plus ``batch_size`` HVPs. Cost: ``num_probes`` HVPs.

    ``tol`` (relative): stop at the first ``P >= min_probes`` (default 10) probes whose running standard error is
    ``<= tol * |estimate|`` (PyHessian stops on the relative change of the mean instead), ``num_probes`` being
    the cap; see :func:`lcnn_jax.estimators.hutchinson_trace`. The probes are those of the fixed-count run.

    ``host_loop``: run the probes from the host, one compiled HVP called per probe (the same probes and values).
    ``None`` decides by :func:`lcnn_jax.loops.host_loop`: on the CPU, called outside ``jit`` on a loss that
    convolves, so that a one-shot call compiles one HVP instead of ``num_probes`` unrolled ones.

    With ``data=`` (the data-set mode of the module docstring, ``loss_fn(params, batch) -> (B,)``): the same
    probes ``z_p`` (``fold_in(key, p)``) for every chunk, ``z_p^T H z_p = (1/N) sum_chunks z_p^T H_chunk z_p``,
    so ONE pass over the data (a generator is fine), each chunk one linearisation and ``num_probes`` HVPs. With
    ``tol`` the probes run in rounds of ``min_probes``, one pass over the data per round (so ``data`` must be
    re-iterable), and the test is made after each round.
    """
    num_probes = check_positive_int(num_probes, "num_probes")
    min_probes = check_positive_int(min_probes, "min_probes")
    _check_data_mode(loss_fn, params, data, chunk_size)
    if data is None:
        if loops.host_loop(host_loop, loss_fn, params):
            return hutchinson_trace(_jitted_hvp(loss_fn, params), key, params, num_probes, host_loop=True, tol=tol,
                                    min_probes=min_probes)
        return hutchinson_trace(_hvp(loss_fn, params), key, params, num_probes, batch_size=batch_size,
                                unroll=unroll, tol=tol, min_probes=min_probes)
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
    rounds = [(0, num_probes)] if tol is None else [
        (start, min(min_probes, num_probes - start)) for start in range(0, num_probes, min_probes)]
    batches = Batches(data, chunk_size, multi_pass=len(rounds) > 1)
    samples = None
    for start, count in rounds:
        total = None
        for batch, mask in batches.chunks():
            part = _trace_samples(loss_fn, params, batch, mask, key, start, num_probes=count,
                                  batch_size=batch_size, unroll=unroll)
            total = part if total is None else _add_jit(total, part)
        part = _scale_jit(total, batches.num_examples)
        samples = part if samples is None else jnp.concatenate([samples, part])
        if tol is not None:
            result = _summary_with_tol(samples, tol, min(max(min_probes, 2), num_probes))
            if bool(result.converged):
                return result
    if tol is not None:
        return result
    est, se = _summary_jit(samples)
    return TraceEstimate(est, se, jnp.asarray(samples.shape[0], jnp.int32), None)


_summary_jit = jax.jit(hutchinson_summary)


def _summary_with_tol(samples: Array, tol: float, floor: int) -> TraceEstimate:
    """The estimate of the samples so far, converged when there are ``floor`` or more and the standard error is
    within ``tol`` of the estimate (the rule of :func:`lcnn_jax.estimators.hutchinson_trace`)."""
    est, se = _summary_jit(samples)
    n = samples.shape[0]
    return TraceEstimate(est, se, jnp.asarray(n, jnp.int32), jnp.asarray(n >= floor and bool(se <= tol * abs(est))))


def hessian_top_eigenvalues(
    loss_fn: Callable[[Params], Array],
    params: Params,
    *,
    key: PRNGKey,
    k: int = 1,
    num_iters: int | None = None,
    which: str = "largest",
    unroll: int | bool | None = None,
    data: Any = None,
    chunk_size: int | None = None,
    tol: float | None = None,
    host_loop: bool | None = None,
) -> EigenResult:
    """Top-``k`` Hessian eigenpairs by Lanczos with full reorthogonalisation.

    Returns :class:`~lcnn_jax.estimators.EigenResult` ``(eigenvalues (k,) descending, eigenvectors
    (pytree with leading k axis), residuals (k,), num_iters, converged)``; ``which="magnitude"`` ranks by
    ``|lambda|``. ``num_iters`` defaults to ``max(2k + 20, 30)`` Lanczos steps (= HVPs); check ``residuals``
    (``||H y - lambda y||``) and raise it if they are not small. Memory: ``num_iters`` copies of the
    parameters (the Lanczos basis).

    ``tol`` (relative): stop at the first step where every one of the ``k`` Ritz pairs has residual
    ``<= tol * |lambda|`` (``num_iters`` is then the cap; ``converged`` says whether it was reached). PyHessian
    stops its power iteration on the relative change of the eigenvalue; the residual is a bound, not a change.

    ``host_loop``: the Lanczos steps from the host, one compiled HVP called per step; ``None`` decides as for
    :func:`hessian_trace`.

    With ``data=`` (data-set mode, ``loss_fn(params, batch) -> (B,)``): ``num_iters`` passes over the data,
    one :func:`dataset_hvp` product each; the Lanczos steps run in a host loop (``unroll`` is ignored).
    """
    k = check_positive_int(k, "k")
    num_iters = max(2 * k + 20, 30) if num_iters is None else check_positive_int(num_iters, "num_iters")
    _check_data_mode(loss_fn, params, data, chunk_size)
    if data is None:
        if loops.host_loop(host_loop, loss_fn, params):
            return lanczos_top_eigenvalues(_jitted_hvp(loss_fn, params), key, params, k, num_iters, which=which,
                                           host_loop=True, tol=tol)
        return lanczos_top_eigenvalues(_hvp(loss_fn, params), key, params, k, num_iters, which=which,
                                       unroll=unroll, tol=tol)
    return lanczos_top_eigenvalues(DatasetHVP(loss_fn, params, data, chunk_size=chunk_size), key, params, k,
                                   num_iters, which=which, host_loop=True, tol=tol)


def hessian_spectral_density(
    loss_fn: Callable[[Params], Array],
    params: Params,
    *,
    key: PRNGKey,
    num_iters: int = 80,
    num_runs: int = 1,
    grid: int | Array = 1000,
    sigma: float | None = None,
    data: Any = None,
    chunk_size: int | None = None,
) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019; PyHessian).

    ``num_runs`` independent Lanczos runs of ``num_iters`` steps each, Gaussian broadening of width
    ``sigma`` (default 1% of the Ritz-value range); see :func:`lcnn_jax.estimators.spectral_density`.
    Returns ``(grid, density, nodes, weights)``; the density integrates to ~1. Cost:
    ``num_runs * num_iters`` HVPs; memory one Lanczos basis (``num_iters`` parameter copies).

    With ``data=`` (data-set mode, ``loss_fn(params, batch) -> (B,)``): ``num_runs * num_iters`` passes over
    the data, one :func:`dataset_hvp` product each, in host loops.
    """
    _check_data_mode(loss_fn, params, data, chunk_size)
    if data is None:
        return spectral_density(_hvp(loss_fn, params), key, params, num_iters, num_runs, grid, sigma)
    return spectral_density(DatasetHVP(loss_fn, params, data, chunk_size=chunk_size), key, params, num_iters,
                            num_runs, grid, sigma, host_loop=True)
