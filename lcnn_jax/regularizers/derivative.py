"""Smoothness from the definition of the derivative (IEEE Access 2022), **as reconstructed by us**.

.. warning::
   The paper's method section was not available to us. This module is OUR RECONSTRUCTION from the paper's
   abstract ("built on the definition of the derivative", "the network's derivative tends to its theoretical
   value in the vicinity of training samples", "no hyperparameters"). It is not a verified re-implementation;
   results obtained with it are results of this reconstruction, not of the paper's method.

For each example ``x`` draw a direction ``u`` uniform on the unit sphere of the input space (a normalised
Gaussian) and compare the derivative with its definition at the data's own resolution ``delta``:

    secant   s = (f(x + delta u) - f(x)) / delta
    tangent  t = J(x) u                                  (one jax.jvp, which also yields f(x))
    penalty  = mean_i ||s_i - t_i||^2 / (||t_i||^2 + ||s_i||^2 + tiny)

``f`` is the logits. The quotient is scale free and lies in ``[0, 2]``; it is 0 exactly when ``f`` is affine along
``delta u`` (the derivative agrees with its definition), and the term is added to the loss with weight 1.
``delta`` is not a tuning knob: it is one intensity level of the data (``1/255`` for 8-bit images in [0, 1]), passed
in from the dataset description. ``tiny`` is a numerical guard (``eps(dtype)**2``) so a function constant along
``u`` gives 0 and a finite gradient, not 0/0; it is far below any slope a trained network has.
``x + delta u`` is not clipped to the data range: the derivative's definition needs the two-sided neighbourhood.

Cost: one JVP (about 2 forward passes) + one forward pass, then the backward pass of the training step.
With batch norm in training mode the perturbed batch gets its own batch statistics, so ``s`` also contains the
change in statistics; use eval-mode (running statistics) ``apply_fn`` if that matters.

Example::

    reg = derivative(resolution=1 / 255)             # no coefficient: weight 1 by construction
    state = reg.init(key, params, batch)             # {"coeff": Array(1.0)} for uniform plumbing
    value, state, metrics = reg.loss(params, state, batch, jax.random.fold_in(key, step), apply_fn)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lcnn_jax.regularizers.base import Regularizer
from lcnn_jax.regularizers.gradient import penalty_regularizer
from lcnn_jax.types import Array, ApplyFn, Batch, Params, PRNGKey

__all__ = ["derivative", "unit_directions", "derivative_penalty"]


def unit_directions(key: PRNGKey, shape: tuple, dtype=jnp.float32) -> Array:
    """One direction per example (leading axis), uniform on the unit sphere: a normalised Gaussian draw."""
    g = jax.random.normal(key, shape, dtype)
    norms = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)), keepdims=True))
    # a zero Gaussian draw has probability 0; the floor only keeps the division defined
    return g / jnp.maximum(norms, jnp.finfo(dtype).tiny)


def derivative_penalty(params: Params, batch: Batch, key: PRNGKey, apply_fn: ApplyFn, resolution: float) -> Array:
    """``mean_i ||s_i - t_i||^2 / (||t_i||^2 + ||s_i||^2 + tiny)`` (see the module docstring). 1 JVP + 1 forward."""
    if key is None:
        raise ValueError("derivative draws random directions: pass a PRNG key (fold the step in for freshness).")
    if "image" not in batch or batch["image"].ndim < 2:
        raise ValueError("batch needs an 'image' entry of shape (B, ...) with at least one feature axis.")
    xs = batch["image"]
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise ValueError(f"batch['image'] must be floating point (scaled to [0, 1]), got {xs.dtype}.")
    u = unit_directions(key, xs.shape, xs.dtype)
    delta = jnp.asarray(resolution, xs.dtype)

    def f(inputs):
        return apply_fn(params, inputs)

    logits, tangent = jax.jvp(f, (xs,), (u,))
    if logits.ndim != 2 or logits.shape[0] != xs.shape[0]:
        raise ValueError(f"apply_fn must return logits of shape (B, K), got {logits.shape}.")
    secant = (f(xs + delta * u) - logits) / delta
    gap = jnp.sum(jnp.square(secant - tangent), axis=-1)
    scale = jnp.sum(jnp.square(tangent), axis=-1) + jnp.sum(jnp.square(secant), axis=-1)
    tiny = jnp.finfo(gap.dtype).eps ** 2
    return jnp.mean(gap / (scale + tiny))


def derivative(resolution: float) -> Regularizer:
    """The derivative-definition penalty at the data's resolution, weight 1, no hyperparameter.

    Args:
      resolution: the data's intensity quantum in input units, e.g. ``1/255`` for 8-bit images scaled to
        [0, 1]. Take it from the dataset description, never tune it.

    Returns a :class:`Regularizer` named ``"derivative"``; ``state["coeff"]`` is 1 (kept as an array only so the
    training step treats every regularizer alike) and ``metrics["derivative"]`` is the penalty.
    """
    try:
        delta = float(resolution)
    except (TypeError, ValueError):
        raise ValueError(f"resolution must be a positive number (e.g. 1/255), got {resolution!r}.") from None
    if not math.isfinite(delta) or delta <= 0:
        raise ValueError(
            f"resolution must be finite and > 0 (the data's intensity quantum, 1/255 for 8-bit images), got {delta}."
        )

    def penalty(params, batch, key, apply_fn):
        return derivative_penalty(params, batch, key, apply_fn, delta)

    return penalty_regularizer("derivative", 1.0, penalty)
