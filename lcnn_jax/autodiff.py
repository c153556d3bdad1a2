"""Matrix-free derivative products with respect to inputs and parameters.

Every product here costs a small constant number of forward/backward passes and never forms a
Jacobian or Hessian. Conventions:

* ``f(x) -> output`` maps ONE example (any shape) to an output array; ``loss(x) -> scalar``.
* ``loss_fn(params) -> scalar`` for parameter-space products; ``params`` and ``v`` are pytrees.
* ``per_example(fn)`` maps a per-example function over the leading axis of all its arguments
  (``jax.vmap``), or in memory-bounded chunks with ``batch_size`` (``lax.map``; the remainder chunk
  is handled, so any batch size works).

Example::

    import jax, jax.numpy as jnp
    from lcnn_jax import autodiff

    loss = lambda x: jnp.sum(jnp.tanh(x) ** 2)
    x = jnp.ones((28, 28, 1)); v = jnp.zeros_like(x).at[0, 0, 0].set(1.0)
    hv = autodiff.input_hvp(loss, x, v)                       # H(x) v, one forward-over-reverse pass
    g, hvp = autodiff.linearized_input_hvp(loss, x)            # reuse one linearisation for many v
    xs, ys = jnp.ones((7, 3)), jnp.arange(7.0)
    hvs = autodiff.batched_input_hvp(lambda x, y: y * loss(x), xs, ys, xs, batch_size=4)  # (7, 3)
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.types import Array, PyTree

__all__ = [
    "input_jvp",
    "input_vjp",
    "input_hvp",
    "input_hvp_xy",
    "linearized_input_hvp",
    "param_hvp",
    "linearized_param_hvp",
    "per_example",
    "batched_input_hvp",
    "safe_norm",
    "check_example_batch",
    "check_labels",
    "check_positive_int",
]


def input_jvp(f: Callable[[Array], Array], x: Array, v: Array) -> Array:
    """Jacobian-vector product ``J(x) v`` with ``J = df/dx``. Cost: one forward-mode pass (~1-2 forwards)."""
    return jax.jvp(f, (x,), (v,))[1]


def input_vjp(f: Callable[[Array], Array], x: Array, u: Array) -> Array:
    """Vector-Jacobian product ``J(x)^T u``. Cost: one forward + one backward pass."""
    _, pullback = jax.vjp(f, x)
    return pullback(u)[0]


def input_hvp(loss: Callable[[Array], Array], x: Array, v: Array) -> Array:
    """Hessian-vector product ``H(x) v`` of a scalar ``loss`` in its input, forward-over-reverse.

    ``jax.jvp(jax.grad(loss), (x,), (v,))[1]``: one forward-mode pass through the backward pass,
    about 2-4 gradient costs, and the memory of one gradient.
    """
    return jax.jvp(jax.grad(loss), (x,), (v,))[1]


def input_hvp_xy(loss_fn: Callable[[Array, Array], Array]) -> Callable[[Array, Array, Array], Array]:
    """Turn ``loss_fn(x, y)`` into ``hvp(x, y, v) = d^2 loss_fn(., y)/dx^2 (x) v`` (for ``per_example``)."""

    def hvp(x: Array, y: Array, v: Array) -> Array:
        return input_hvp(lambda x_: loss_fn(x_, y), x, v)

    return hvp


def linearized_input_hvp(loss: Callable[[Array], Array], x: Array) -> tuple[Array, Callable[[Array], Array]]:
    """Return ``(grad loss(x), v -> H(x) v)`` from one ``jax.linearize`` of the gradient.

    The forward and backward pass run once; each later product evaluates only the linear
    (tangent) part, which is cheaper than a fresh ``input_hvp`` when the same point is multiplied
    many times (power iteration). Memory: the residuals of one forward-over-reverse pass.
    """
    return jax.linearize(jax.grad(loss), x)


def param_hvp(loss_fn: Callable[[PyTree], Array], params: PyTree, v: PyTree) -> PyTree:
    """Parameter-space Hessian-vector product ``H(params) v`` over pytrees (forward-over-reverse)."""
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def linearized_param_hvp(
    loss_fn: Callable[[PyTree], Array], params: PyTree
) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """Return ``(grad, v -> H v)`` in parameter space from one ``jax.linearize`` of the gradient."""
    return jax.linearize(jax.grad(loss_fn), params)


def per_example(fn: Callable[..., Any], *, batch_size: int | None = None) -> Callable[..., Any]:
    """Map ``fn`` over the leading axis of every argument.

    ``batch_size=None`` vectorises the whole batch with ``jax.vmap``; an integer processes
    ``batch_size`` examples at a time with ``lax.map`` (sequential chunks, each vmapped; a batch
    that is not a multiple of ``batch_size`` is fine). Both are jittable.
    """
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
    if batch_size is None:
        return jax.vmap(fn)

    def mapped(*args):
        return jax.lax.map(lambda a: fn(*a), args, batch_size=int(batch_size))

    return mapped


def batched_input_hvp(
    loss_fn: Callable[[Array, Array], Array], xs: Array, ys: Array, vs: Array, *, batch_size: int | None = None
) -> Array:
    """Per-example input HVPs ``H_i v_i`` of ``loss_fn(x_i, y_i)``, shape of ``xs``."""
    return per_example(input_hvp_xy(loss_fn), batch_size=batch_size)(xs, ys, vs)


def safe_norm(x: Array, axis: Any = None, keepdims: bool = False) -> Array:
    """Euclidean norm whose gradient is 0 (not NaN) at ``x = 0``."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


# ----------------------------------------------------------------------------------------------
# Validation shared by the measures, attacks and regularizers (static shape checks at public
# boundaries; value checks only where the array is concrete, since traced values cannot be read).
# ----------------------------------------------------------------------------------------------


def check_example_batch(xs: Array, name: str = "xs") -> None:
    """``xs`` must be a finite floating array of shape (batch, *example_shape), example_shape non-empty."""
    shape = jnp.shape(xs)
    if len(shape) < 2:
        raise ValueError(
            f"{name} must have shape (batch, *example_shape) with at least one example axis, got shape {shape}. "
            f"For a single example add a batch axis ({name}[None]); for scalar examples add a trailing axis "
            f"({name}[:, None])."
        )
    if shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {shape}); pass at least one example.")
    if not jnp.issubdtype(jnp.result_type(xs), jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {jnp.result_type(xs)}; cast it (e.g. xs / 255.0).")
    if not isinstance(xs, jax.core.Tracer) and not bool(np.all(np.isfinite(np.asarray(xs)))):
        raise ValueError(f"{name} contains NaN or inf values; clean the inputs first.")


def check_labels(xs: Array, ys: Array, name: str = "ys") -> None:
    """``ys`` must have one entry per example of ``xs`` along the leading axis."""
    if jnp.ndim(ys) < 1 or jnp.shape(ys)[0] != jnp.shape(xs)[0]:
        raise ValueError(
            f"xs and {name} must have the same leading (batch) length, "
            f"got xs {jnp.shape(xs)} and {name} {jnp.shape(ys)}."
        )


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    """Return ``int(value)`` if it is a positive integer (or None when allowed), else raise ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")
    return int(value)
