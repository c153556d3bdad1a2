"""Smoothness from the definition of the derivative (IEEE Access 2022), **as reconstructed by us**.

.. warning::
   The paper's method section was not available to us. This module is OUR RECONSTRUCTION from the paper's
   abstract ("built on the definition of the derivative", "the network's derivative tends to its theoretical
   value in the vicinity of training samples", "no hyperparameters"). It is not a verified re-implementation;
   results obtained with it are results of this reconstruction, not of the paper's method.

Two readings of the abstract, both weight 1 with no coefficient; ``derivative(resolution)`` uses reading B, which
supported the abstract's claims on our data where reading A supported none
(``experiments/results/smalldata/claims.md``).

Reading A (``reading="secant_tangent"``). For each example ``x`` draw a direction ``u`` uniform on the unit sphere of
the input space (a normalised Gaussian) and compare the derivative with its definition at the data's own resolution
``delta``:

    secant   s = (f(x + delta u) - f(x)) / delta
    tangent  t = J(x) u                                  (one jax.jvp)
    penalty  = mean_i ||s_i - t_i||^2 / (||t_i||^2 + ||s_i||^2 + tiny)

``f`` is the logits. The quotient is scale free and lies in ``[0, 2]``; it is 0 exactly when ``f`` is affine along
``delta u`` (the derivative agrees with its definition), and the term is added to the loss with weight 1.
``delta`` is not a tuning knob: it is one intensity level of the data (``1/255`` for 8-bit images in [0, 1]), passed
in from the dataset description. ``tiny`` is a numerical guard (``eps(dtype)**2``) so a function constant along
``u`` gives 0 and a finite gradient, not 0/0; it is far below any slope a trained network has.
``x + delta u`` is not clipped to the data range: the derivative's definition needs the two-sided neighbourhood.

How the secant is computed (float32). Written as a difference quotient, ``s`` cancels: ``f(x + delta u)`` and
``f(x)`` agree to ~``delta``, so their float32 difference carries an absolute error ~``eps |f|``, and dividing by
``delta = 1/255`` amplifies it to ~``255 eps |f|``. For a smooth network the true gap ``s - t`` is ~``delta f''/2``,
far below that: on a 784-256-256-10 tanh MLP the float32 difference quotient gave a penalty 73-80x the float64
value (softplus: ~3800x), i.e. the term was rounding noise. We therefore compute THE SAME secant without the
subtraction, from the fundamental theorem of calculus,

    s = integral_0^1 J(x + tau delta u) u dtau  ~=  sum_j w_j J(x + tau_j delta u) u,

with ``QUADRATURE_ORDER = 2`` Gauss-Legendre nodes ``tau_j = (1 -+ 1/sqrt 3) / 2``, ``w_j = 1/2`` (one JVP each).
It is exact when ``f`` is a polynomial of degree <= 4 along the segment, so for smooth networks it equals the
difference quotient to O(delta^4), and in float32 it is accurate to the rounding of a JVP (measured: 0.1 % of the
float64 penalty on the tanh MLP, 0.3 % on softplus). For piecewise-linear networks (ReLU, max-pool) the slope
``J(x + tau delta u) u`` is piecewise constant in ``tau``: a kink AT ``x`` (ReLU pre-activation exactly 0, tied
max-pool windows: MNIST's constant background produces both) is handled exactly, because no node sits at
``tau = 0``; a kink strictly inside the segment is located only to the nearest node (measured on a 784-256-256-10 ReLU MLP: batch penalty 0.86x the exact
secant's over 64 examples, 1.03x over 512; few examples cross a kink, so the ratio is noisy; for ReLU nets the
float32 difference quotient was accurate, 1.00x, as their penalty is dominated by kinks, not rounding). We chose the quadrature because it is right for every
network we measured, while the difference quotient is useless for smooth ones. The measurement script is
``experiments/bench_regularizers.py --derivative_accuracy``.

Reading B: the target derivative (``reading="target"``)
-------------------------------------------------------
Reading A is nearly vacuous for piecewise-linear networks: their secant equals their tangent except across a kink,
so the penalty starts near 0 and leaves a ReLU network unchanged (our small-data study showed exactly that). The
second reading takes the "theoretical value" of the derivative near a training sample to be the *target
function's*: the label does not change within the data's resolution, so the target is constant there and its
derivative is 0. The secant at the data's resolution is driven toward it:

    penalty_B = mean_i ||f(x_i + delta u_i) - f(x_i)||^2 / delta^2 = mean_i ||s_i||^2,

weight 1, the same ``delta`` and ``u`` as reading A, the secant by the same quadrature, so no float32 cancellation
(``s`` never subtracts two nearly equal outputs: its float32 error is that of the JVPs, ~eps ||s||, whereas the
difference quotient's is ~255 eps |f|). At first order ``s = J u`` and ``E_u ||J u||^2 = ||J||_F^2 / d`` (``u``
uniform on the sphere of ``R^d``): a Jacobian penalty whose weight, ``1/d``, comes from the definition and is not
tuned. For a ReLU network the secant averages the slopes along the segment, so reading B acts on it too.

``output`` chooses ``f``: ``"logits"`` (default) or ``"softmax"``. The softmax probabilities are the classifier's
function, but near a well-classified sample they saturate, so their derivative is already ~0 and the penalty
vanishes exactly where it should act (and it can be lowered by growing the logits, i.e. by a *steeper* logit
map); the logits are what the network computes before that saturation, and their Jacobian is what the claims
(a lower input-Jacobian Frobenius norm) are measured on. We measured both on the small-data MLP (README, SPEC 1.4
section: on the softmax outputs reading B changed nothing measurable, on the logits it halved the Jacobian norm)
and default to the logits.

Cost: reading A ``QUADRATURE_ORDER + 1`` JVPs (each ~2-3 forward passes; the one at ``x`` gives the tangent),
reading B ``QUADRATURE_ORDER`` JVPs; then the backward pass of the training step through all of them. The difference quotient cost one JVP and one forward pass
(measured train step on the small CNN: ~3.9x the plain step against ~3.2-3.6x).
With batch norm in training mode each evaluation point gets its own batch statistics, so ``s`` also contains the
change in statistics; use eval-mode (running statistics) ``apply_fn`` if that matters.

Example::

    reg = derivative(resolution=1 / 255)             # reading B; no coefficient: weight 1 by construction
    reg_a = derivative(resolution=1 / 255, reading="secant_tangent")
    state = reg.init(key, params, batch)             # {"coeff": Array(1.0)} for uniform plumbing
    value, state, metrics = reg.loss(params, state, batch, jax.random.fold_in(key, step), apply_fn)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.regularizers.base import Regularizer
from lcnn_jax.regularizers.gradient import penalty_regularizer
from lcnn_jax.types import Array, ApplyFn, Batch, Params, PRNGKey

__all__ = ["derivative", "unit_directions", "derivative_penalty", "target_derivative_penalty", "secant_slope",
           "QUADRATURE_ORDER", "READINGS"]

#: The two readings of SPEC 1.4: ``"secant_tangent"`` (A) and ``"target"`` (B).
READINGS = ("secant_tangent", "target")
_OUTPUTS = ("logits", "softmax")

#: Gauss-Legendre nodes of the secant integral (a fixed numerical choice, not a hyperparameter; see the docstring).
QUADRATURE_ORDER = 2
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(QUADRATURE_ORDER)
_NODES, _WEIGHTS = (_NODES + 1.0) / 2.0, _WEIGHTS / 2.0  # from [-1, 1] to [0, 1]


def unit_directions(key: PRNGKey, shape: tuple, dtype=jnp.float32) -> Array:
    """One direction per example (leading axis), uniform on the unit sphere: a normalised Gaussian draw."""
    g = jax.random.normal(key, shape, dtype)
    norms = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)), keepdims=True))
    # a zero Gaussian draw has probability 0; the floor only keeps the division defined
    return g / jnp.maximum(norms, jnp.finfo(dtype).tiny)


def secant_slope(f, xs: Array, u: Array, delta) -> Array:
    """``(f(x + delta u) - f(x)) / delta`` without the subtraction: ``sum_j w_j J(x + tau_j delta u) u``
    (Gauss-Legendre, :data:`QUADRATURE_ORDER` JVPs). ``f`` maps the batch ``xs`` to ``(B, K)``."""
    out = 0.0
    for tau, w in zip(_NODES, _WEIGHTS):
        step = jnp.asarray(tau * delta, xs.dtype)
        out = out + jnp.asarray(w, xs.dtype) * jax.jvp(f, (xs + step * u,), (u,))[1]
    return out


def _images_and_directions(batch: Batch, key: PRNGKey) -> tuple[Array, Array]:
    if key is None:
        raise ValueError("derivative draws random directions: pass a PRNG key (fold the step in for freshness).")
    if "image" not in batch or batch["image"].ndim < 2:
        raise ValueError("batch needs an 'image' entry of shape (B, ...) with at least one feature axis.")
    xs = batch["image"]
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise ValueError(f"batch['image'] must be floating point (scaled to [0, 1]), got {xs.dtype}.")
    return xs, unit_directions(key, xs.shape, xs.dtype)


def derivative_penalty(params: Params, batch: Batch, key: PRNGKey, apply_fn: ApplyFn, resolution: float) -> Array:
    """Reading A: ``mean_i ||s_i - t_i||^2 / (||t_i||^2 + ||s_i||^2 + tiny)`` (see the module docstring).
    Cost: ``QUADRATURE_ORDER + 1`` JVPs."""
    xs, u = _images_and_directions(batch, key)

    def f(inputs):
        return apply_fn(params, inputs)

    logits, tangent = jax.jvp(f, (xs,), (u,))
    if logits.ndim != 2 or logits.shape[0] != xs.shape[0]:
        raise ValueError(f"apply_fn must return logits of shape (B, K), got {logits.shape}.")
    secant = secant_slope(f, xs, u, resolution)
    gap = jnp.sum(jnp.square(secant - tangent), axis=-1)
    scale = jnp.sum(jnp.square(tangent), axis=-1) + jnp.sum(jnp.square(secant), axis=-1)
    tiny = jnp.finfo(gap.dtype).eps ** 2
    return jnp.mean(gap / (scale + tiny))


def target_derivative_penalty(params: Params, batch: Batch, key: PRNGKey, apply_fn: ApplyFn, resolution: float,
                              output: str = "logits") -> Array:
    """Reading B: ``mean_i ||f(x_i + delta u_i) - f(x_i)||^2 / delta^2`` with the secant by quadrature (no
    subtraction); ``f`` the logits or their softmax (``output``). Cost: ``QUADRATURE_ORDER`` JVPs."""
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
    xs, u = _images_and_directions(batch, key)

    def f(inputs):
        logits = apply_fn(params, inputs)
        return jax.nn.softmax(logits, axis=-1) if output == "softmax" else logits

    out_shape = jax.eval_shape(f, xs).shape
    if len(out_shape) != 2 or out_shape[0] != xs.shape[0]:
        raise ValueError(f"apply_fn must return logits of shape (B, K), got {out_shape}.")
    secant = secant_slope(f, xs, u, resolution)
    return jnp.mean(jnp.sum(jnp.square(secant), axis=-1))


def derivative(resolution: float, reading: str = "target", output: str = "logits") -> Regularizer:
    """The derivative-definition penalty at the data's resolution, weight 1, no hyperparameter.

    Args:
      resolution: the data's intensity quantum in input units, e.g. ``1/255`` for 8-bit images scaled to
        [0, 1]. Take it from the dataset description, never tune it.
      reading: ``"target"`` (B, the default: the secant is driven to the target function's derivative, 0) or
        ``"secant_tangent"`` (A: the derivative agrees with its definition); see the module docstring. B is the
        default because on our small-data study it supports the paper's claims (lower input-Jacobian norm at
        training and test points, higher accuracy, more PGD robustness on the MLPs) and A supports none
        (``experiments/results/smalldata/claims.md``).
      output: for reading B, ``"logits"`` or ``"softmax"`` (reading A uses the logits; its quotient is scale free).

    Returns a :class:`Regularizer` named ``"derivative"`` (A) or ``"derivative_target"`` (B); ``state["coeff"]``
    is 1 (kept as an array only so the training step treats every regularizer alike) and the metric of that name
    is the penalty.
    """
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS} (A: secant vs tangent, B: target derivative 0), "
                         f"got {reading!r}")
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
    if reading == "secant_tangent" and output != "logits":
        raise ValueError("reading 'secant_tangent' compares slopes of the logits; output applies to reading 'target'")
    try:
        delta = float(resolution)
    except (TypeError, ValueError):
        raise ValueError(f"resolution must be a positive number (e.g. 1/255), got {resolution!r}.") from None
    if not math.isfinite(delta) or delta <= 0:
        raise ValueError(
            f"resolution must be finite and > 0 (the data's intensity quantum, 1/255 for 8-bit images), got {delta}."
        )

    if reading == "target":
        def penalty(params, batch, key, apply_fn):
            return target_derivative_penalty(params, batch, key, apply_fn, delta, output)

        return penalty_regularizer("derivative_target", 1.0, penalty)

    def penalty(params, batch, key, apply_fn):
        return derivative_penalty(params, batch, key, apply_fn, delta)

    return penalty_regularizer("derivative", 1.0, penalty)
