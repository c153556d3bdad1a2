"""The LCNN training penalties (Srinivas et al. 2022) and the CURE baseline of the LCNN paper's table.

* ``lcnn_penalty``: ``lam_beta * sum_sites b + lam_gamma * sum_sites |log gamma|`` (reads parameters only);
* ``lcnn_gradnorm``: ``lam_g * scale / B^2 * mean_i ||grad_x CE_i||^2`` (1 forward + 1 backward pass);
* ``cure``: ``lam * scale / B^2 * mean_i ||grad_x CE_i(x_i + h z_i) - grad_x CE_i(x_i)||^2`` (2 forward +
  2 backward passes),

each then differentiated by the training step (double backprop for the gradient penalties).

``b = exp(log_beta) + 1e-3`` of every :class:`~lcnn_jax.nn.lcnn.CenteredSoftplus` and ``log gamma`` of every
:class:`~lcnn_jax.nn.lcnn.LipschitzBatchNorm`: every leaf named ``log_beta`` / ``log_gamma`` in ``params``. The
reference sums ``exp(log_beta)``; summing ``b`` differs by the constant ``1e-3`` per site and has the same
gradient, and it is the ``b`` that enters the curvature bound ``b / 4``.

Gradient norm as in the reference code (``kylematoba/lcnn``, ``GradNormRegularizedLoss``): it takes the gradient
of the *batch-mean* cross-entropy with respect to the input batch, ``G = (1/B) [g_1 .. g_B]``, and uses
``1e5 * ||G||^2 / B = 1e5 / B^2 * mean_i ||g_i||^2``. That is the DataGrad penalty of
:mod:`lcnn_jax.regularizers.gradient` (``||J^T (p - e_y)||^2``) with cotangents scaled by ``sqrt(scale) / B``,
so it reuses that template. ``batch_size=None`` uses the actual batch ``B`` (the reference, exactly); pass the
batch size of the protocol (128) to keep the per-example strength fixed when the batch changes. With
``B = 128`` the effective weight of ``mean_i ||g_i||^2`` is ``1e-3 * 1e5 / 128^2 = 6.1e-3``.

CURE (Moosavi-Dezfooli et al., CVPR 2019) as the LCNN reference code implements it (``CURERegularizedLoss``):
``z_i = sign(g_i) / ||sign(g_i)||`` (stop-gradient), step ``h = 1`` (an L2 step of 1 in [0, 1] pixel units),
``1e3 * ||G(x + h z) - G(x)||^2 / B`` with ``G`` the batch-mean gradient again, i.e.
``1e3 / B^2 * mean_i ||Delta g_i||^2``, weighted by ``1e-3`` (the reference passes its ``reg_gnorm``). The CURE
authors' own code uses other constants (a step ``h`` that grows during training, a weight of order 1, its own
input scaling); ``h``, ``coeff``, ``scale`` and ``batch_size`` reproduce either. Both gradients are
differentiated (double backprop), as in the reference.

In training mode the model sees the whole batch (batch norm couples examples), and these gradients are those
of the batch loss, as in the reference; see :mod:`lcnn_jax.regularizers.gradient`.

Example::

    from lcnn_jax.regularizers.lcnn import lcnn_penalty, lcnn_gradnorm
    regs = [lcnn_penalty(1e-2, 1e-2), lcnn_gradnorm(1e-3)]       # the "LCNN + GradReg" row
    state = regs[0].init(key, params, batch)                      # {"beta_coeff": 0.01, "gamma_coeff": 0.01}
    value, state, metrics = regs[0].loss(params, state, batch, key, apply_fn)
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from lcnn_jax.nn.lcnn import beta_from_log
from lcnn_jax.regularizers.base import (Regularizer, batch_images, batch_labels, check_coeff, check_logits,
                                        per_example_sq_norm)
from lcnn_jax.regularizers.gradient import datagrad_cotangents, jacobian_penalty, penalty_regularizer
from lcnn_jax.types import ApplyFn, Array, Batch, Params, PRNGKey

__all__ = ["LOG_BETA", "LOG_GAMMA", "lcnn_terms", "lcnn_penalty", "lcnn_gradnorm", "cure"]

LOG_BETA = "log_beta"
LOG_GAMMA = "log_gamma"
#: The reference's constant factors in front of the gradient-norm and CURE terms.
GRADNORM_SCALE = 1e5
CURE_SCALE = 1e3


def _leaves_named(params: Params, name: str) -> list:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [leaf for path, leaf in flat
            if path and str(getattr(path[-1], "key", getattr(path[-1], "name", ""))) == name]


def lcnn_terms(params: Params) -> dict:
    """``{"beta_sum": sum b, "abs_log_gamma_sum": sum |log gamma|, "beta_max": max b}`` over all sites.

    Sums over every leaf named ``log_beta`` (``b = exp(log_beta) + 1e-3``) / ``log_gamma``; 0 where none.
    """
    betas = [jnp.sum(beta_from_log(x)) for x in _leaves_named(params, LOG_BETA)]
    gammas = [jnp.sum(jnp.abs(x)) for x in _leaves_named(params, LOG_GAMMA)]
    zero = jnp.zeros((), jnp.float32)
    return {"beta_sum": sum(betas, zero), "abs_log_gamma_sum": sum(gammas, zero),
            "beta_max": jnp.max(jnp.stack(betas)) if betas else zero}


def lcnn_penalty(beta_coeff: Any = 1e-2, gamma_coeff: Any = 1e-2) -> Regularizer:
    """The LCNN penalty ``beta_coeff * sum b + gamma_coeff * sum |log gamma|`` (name ``"lcnn"``).

    Pushes every centred-softplus ``b`` down (curvature ``b/4``) and every Lipschitz-BN ``gamma`` toward 1.
    State ``{"beta_coeff", "gamma_coeff"}`` (float32 arrays, so a grid can be vmapped); metrics
    ``beta_sum``, ``abs_log_gamma_sum``, ``beta_max`` (unweighted). ``init`` raises ``ValueError`` when the
    parameters contain no ``log_beta``/``log_gamma`` leaf (the model has no LCNN layers). Cost: none beyond
    reading the parameters. Defaults as in the reference's final code (its older default was 1e-3).
    """
    check_coeff(beta_coeff)
    check_coeff(gamma_coeff)

    def init(key: PRNGKey, params: Params, batch: Batch) -> dict:
        del key, batch
        if not (_leaves_named(params, LOG_BETA) or _leaves_named(params, LOG_GAMMA)):
            raise ValueError("lcnn penalty: the parameters have no 'log_beta' or 'log_gamma' leaf; build the model "
                             "with LCNN layers (lcnn_jax.nn.lcnn.CenteredSoftplus / LipschitzBatchNorm, e.g. "
                             "make_lcnn_model) or drop this regularizer.")
        return {"beta_coeff": jnp.asarray(beta_coeff, jnp.float32),
                "gamma_coeff": jnp.asarray(gamma_coeff, jnp.float32)}

    def loss(params: Params, state: dict, batch: Batch, key: PRNGKey, apply_fn: ApplyFn):
        del batch, key, apply_fn
        if "beta_coeff" not in state or "gamma_coeff" not in state:
            raise ValueError("lcnn penalty: state needs 'beta_coeff' and 'gamma_coeff'; build it with reg.init().")
        terms = lcnn_terms(params)
        value = state["beta_coeff"] * terms["beta_sum"] + state["gamma_coeff"] * terms["abs_log_gamma_sum"]
        return value, state, terms

    return Regularizer(name="lcnn", init=init, loss=loss)


def _check_scale(scale: Any, batch_size: Optional[int], name: str) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}: scale must be a finite number > 0, got {scale!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"{name}: batch_size must be None (use the actual batch) or a positive int, "
                         f"got {batch_size!r}")


def lcnn_gradnorm(coeff: Any = 1e-3, *, scale: float = GRADNORM_SCALE,
                  batch_size: Optional[int] = None) -> Regularizer:
    """The reference's gradient-norm penalty ``coeff * scale / B^2 * mean_i ||grad_x CE(f(x_i), y_i)||^2``.

    ``B = batch_size`` or, when None, the actual batch: then it equals ``coeff * scale * ||grad_X mean CE||^2 / B``
    exactly as in ``kylematoba/lcnn``. Name ``"lcnn_gradnorm"``; ``metrics["lcnn_gradnorm"]`` is the unweighted
    (scaled) penalty. Cost: 1 forward + 1 backward pass (then differentiated by the step).
    """
    _check_scale(scale, batch_size, "lcnn_gradnorm")

    def cotangents(key: PRNGKey, logits: Array, labels: Array) -> Array:
        b = batch_size or logits.shape[0]
        return datagrad_cotangents(key, logits, labels) * (math.sqrt(scale) / b)

    return jacobian_penalty(cotangents, coeff, name="lcnn_gradnorm")


def _input_grads(apply_fn: ApplyFn, params: Params, xs: Array, labels: Array) -> Array:
    """Per-example ``grad_x CE_i`` stacked, i.e. ``J^T (p - e_y)`` (one forward + one backward pass)."""
    logits, vjp_fn = jax.vjp(lambda inputs: apply_fn(params, inputs), xs)
    check_logits(logits, xs)
    (g,) = vjp_fn(datagrad_cotangents(None, logits, labels)[0])
    return g


def cure(coeff: Any = 1e-3, *, h: float = 1.0, scale: float = CURE_SCALE,
         batch_size: Optional[int] = None) -> Regularizer:
    """CURE as in the LCNN reference: ``coeff * scale / B^2 * mean_i ||g_i(x_i + h z_i) - g_i(x_i)||^2``.

    ``g_i = grad_x CE_i``, ``z_i = sign(g_i) / ||sign(g_i)||_2`` under stop-gradient (a zero gradient gives
    ``z_i = 0``). ``B`` as in :func:`lcnn_gradnorm`. Name ``"cure"``. Cost: 2 forward + 2 backward passes
    (then differentiated by the step).
    """
    _check_scale(scale, batch_size, "cure")
    if not (isinstance(h, (int, float)) and math.isfinite(h) and h > 0):
        raise ValueError(f"cure: h must be a finite number > 0, got {h!r}")

    def penalty(params: Params, batch: Batch, key: PRNGKey, apply_fn: ApplyFn) -> Array:
        del key
        xs = batch_images(batch)
        labels = batch_labels(batch, xs.shape[0])
        g = _input_grads(apply_fn, params, xs, labels)
        z = jnp.sign(lax.stop_gradient(g))
        axes = tuple(range(1, z.ndim))
        norm = jnp.sqrt(jnp.sum(z * z, axis=axes, keepdims=True))
        z = z / jnp.where(norm > 0, norm, 1.0)
        g_far = _input_grads(apply_fn, params, xs + h * z, labels)
        b = batch_size or xs.shape[0]
        return (scale / b ** 2) * jnp.mean(per_example_sq_norm(g_far - g, 1))

    return penalty_regularizer("cure", coeff, penalty)
