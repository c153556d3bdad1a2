"""Frobenius norm of the input Jacobian, per example: exact or by random projections.

``f(x)`` maps ONE example (any shape, e.g. (28, 28, 1)) to an output array (e.g. 10 logits);
``jacobian_frobenius`` maps it over a batch. The function is pure and traceable: jit it with ``f``
closed over (``f`` is a Python callable, so it cannot be a traced argument)::

    import jax
    from lcnn_jax.measures.jacobian import jacobian_frobenius

    f = lambda x: model.apply(variables, x[None])[0]               # one image -> 10 logits
    exact = jax.jit(lambda xs: jacobian_frobenius(f, xs))(xs)     # (B,), 10 VJPs per example
    approx = jax.jit(lambda xs, k: jacobian_frobenius(f, xs, key=k))(xs, key)  # (B,), 1 VJP
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from lcnn_jax.autodiff import check_example_batch, check_positive_int, per_example
from lcnn_jax.types import Array, PRNGKey

__all__ = ["jacobian_frobenius"]


def _safe_sqrt(x: Array) -> Array:
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def jacobian_frobenius(
    f: Callable[[Array], Array],
    xs: Array,
    *,
    key: PRNGKey | None = None,
    num_probes: int = 1,
    squared: bool = False,
    batch_size: int | None = None,
) -> Array:
    """Per-example ``||J(x_i)||_F`` with ``J = df/dx``; shape (B,).

    * ``key=None``: exact. Uses ``jax.jacfwd`` (``n`` JVPs) when the input size ``n`` is at most the
      output size ``K``, otherwise ``jax.jacrev`` (one forward pass and ``K`` VJPs, e.g. 10 for an
      MNIST classifier with 784 inputs).
    * ``key`` given: random projections. With ``r ~ N(0, I_K)``, ``E ||J^T r||^2 = ||J||_F^2``; the
      mean over ``num_probes`` probes (one forward pass, ``num_probes`` VJPs) is an **unbiased
      estimate of the squared norm**. Its square root (returned unless ``squared=True``) is a
      consistent but slightly low-biased estimate of the norm (Jensen).

    ``squared=True`` returns ``||J||_F^2`` (or its unbiased estimate). ``batch_size`` evaluates the
    batch in chunks (``lax.map``) to bound memory; any batch length works. Probes for example ``i``
    come from ``jax.random.split(key, B)[i]``, so results do not depend on ``batch_size``.
    """
    check_example_batch(xs)
    num_probes = check_positive_int(num_probes, "num_probes")
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
    x_shape = xs.shape[1:]
    out = jax.eval_shape(f, jax.ShapeDtypeStruct(x_shape, xs.dtype))
    n_in, n_out = math.prod(x_shape), math.prod(out.shape)
    finish = (lambda s: s) if squared else _safe_sqrt

    if key is None:
        jac = jax.jacfwd(f) if n_in <= n_out else jax.jacrev(f)

        def exact(x):
            return finish(jnp.sum(jnp.square(jac(x))))

        return per_example(exact, batch_size=batch_size)(xs)

    def estimate(x, k):
        _, pullback = jax.vjp(f, x)
        r = jax.random.normal(k, (num_probes, *out.shape), out.dtype)
        jtr = jax.vmap(lambda r_: pullback(r_)[0])(r)  # one forward pass shared by all probes
        return finish(jnp.mean(jnp.sum(jnp.square(jtr).reshape(num_probes, -1), axis=1)))

    keys = jax.random.split(key, xs.shape[0])
    return per_example(estimate, batch_size=batch_size)(xs, keys)
