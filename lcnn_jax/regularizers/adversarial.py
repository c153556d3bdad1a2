"""PGD adversarial training (Madry, Makelov, Schmidt, Tsipras & Vladu, ICLR 2018) as a regularizer.

Madry et al. minimise the robust loss ``E max_{||d|| <= eps} CE(f(x + d), y)``, the inner maximum approximated by
PGD. As a term added to the training step's cross-entropy::

    term = coeff * (mean CE(f(x_adv), y) - mean CE(f(x), y)),    x_adv = stop_gradient(PGD(x))

so that with ``coeff = 1`` the step minimises ``CE(x) + term = CE(x_adv)``, Madry's objective, with exactly its
gradient (the clean CE's gradient cancels); ``coeff = 0.5`` gives the even clean/adversarial mix of Goodfellow et
al. (2015). ``x_adv`` comes from :func:`lcnn_jax.attacks.pgd` (random start in the ball, ``num_steps`` steps of
``step_factor * eps / num_steps``, projection onto the eps-ball and the [0, 1] box) on the model with its
parameters under ``stop_gradient``, so no gradient flows through the attack (Danskin's theorem: the gradient of
the maximum is the gradient at the maximiser).

``coeff``, ``eps`` and ``step_factor`` are float32 arrays in the state: a grid over any of them (``sweep`` keys
``adversarial.coeff``, ``adversarial.eps``) is a ``vmap`` over states; ``norm`` and ``num_steps`` are static.

The attack runs on ``apply_fn``, the model as the training step applies it (training mode: batch norm uses the
adversarial batch's own statistics, as in the reference implementations that attack the model in its training
mode); the running statistics are updated by the step's clean forward pass only. ``metrics``: ``adversarial`` =
``CE(x_adv) - CE(x)`` (unweighted), ``ce_adv`` = ``CE(x_adv)``.

Cost per step: ``num_steps`` forward and backward passes for the attack, two forward passes (clean and
adversarial) and the backward pass of the adversarial one, on top of the step's own pass (about ``num_steps + 2``
times a plain step).

Settings in this repository's configs (``experiments/configs``): the LCNN paper's adversarial-training row, L2
PGD eps 0.1 with 3 steps on CIFAR-100 in the [0, 1] scale (the reference code ``kylematoba/lcnn`` feeds
``ToTensor`` images, unnormalised; its L2 attacks step ``eps / 10``; we step Madry's ``2.5 eps / steps``, since three
steps of ``eps / 10`` never reach the sphere); the compare method on MNIST trains at L2 eps 1, the smaller radius
that table evaluates.

Example::

    from lcnn_jax.regularizers import adversarial_training
    reg = adversarial_training(1.0, norm="l2", eps=0.1, num_steps=3)
    state = reg.init(key, params, batch)          # {"coeff": 1.0, "eps": 0.1, "step_factor": 2.5} (float32)
    value, state, metrics = reg.loss(params, state, batch, key, apply_fn)
    total = cross_entropy + value                 # = CE(x_adv) with coeff = 1
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lcnn_jax.attacks import cross_entropy, pgd
from lcnn_jax.regularizers.base import Regularizer, batch_images, batch_labels, check_coeff, check_logits
from lcnn_jax.types import ApplyFn, Batch, Params, PRNGKey

__all__ = ["adversarial_training", "MADRY_STEP_FACTOR"]

#: Step size of PGD as a multiple of ``eps / num_steps`` (Madry et al.'s 2.5: the steps can cross the ball and back).
MADRY_STEP_FACTOR = 2.5


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def adversarial_training(coeff: Any = 1.0, *, norm: str = "l2", eps: float, num_steps: int = 3,
                         step_size: float | None = None, step_factor: float | None = None,
                         random_start: bool = True, clip: tuple | None = (0.0, 1.0)) -> Regularizer:
    """PGD adversarial training: ``coeff * (mean CE(x_adv) - mean CE(x))`` (see the module docstring).

    Args:
      coeff: finite scalar >= 0; 1 trains on the adversarial loss only (Madry et al.).
      norm: ``"l2"`` or ``"linf"``.
      eps: the attack radius (> 0), in the inputs' scale ([0, 1] pixels).
      num_steps: PGD steps per training step (>= 1).
      step_size: an absolute PGD step; or ``step_factor`` (default 2.5): step = ``step_factor * eps / num_steps``
        (stored as a factor, so a grid over ``eps`` keeps the ratio).
      random_start: start PGD at a uniform point of the ball (Madry et al.).
      clip: the input box, or None.
    """
    check_coeff(coeff)
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}.")
    eps = _check_positive(eps, "eps")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    if step_size is not None and step_factor is not None:
        raise ValueError("give step_size or step_factor, not both.")
    if step_size is not None:
        factor = _check_positive(step_size, "step_size") * num_steps / eps
    else:
        factor = MADRY_STEP_FACTOR if step_factor is None else _check_positive(step_factor, "step_factor")
    if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
        raise ValueError(f"clip must be None or a pair (low, high) with low < high, got {clip!r}.")
    clip = None if clip is None else (float(clip[0]), float(clip[1]))

    def init(key: PRNGKey, params: Params, batch: Batch) -> dict:
        del key, params, batch
        return {"coeff": jnp.asarray(coeff, jnp.float32), "eps": jnp.asarray(eps, jnp.float32),
                "step_factor": jnp.asarray(factor, jnp.float32)}

    def loss(params: Params, state: dict, batch: Batch, key: PRNGKey, apply_fn: ApplyFn):
        for k in ("coeff", "eps", "step_factor"):
            if k not in state:
                raise ValueError(f"adversarial: state has no {k!r}; build it with reg.init(key, params, batch).")
        xs = batch_images(batch)
        ys = batch_labels(batch, xs.shape[0])
        frozen = jax.lax.stop_gradient(params)
        r_eps = state["eps"].astype(xs.dtype)
        step = state["step_factor"].astype(xs.dtype) * r_eps / num_steps
        x_adv = pgd(lambda x: apply_fn(frozen, x), xs, ys, norm=norm, eps=r_eps, step_size=step,
                    num_steps=num_steps, key=key, random_start=random_start, clip=clip)
        x_adv = jax.lax.stop_gradient(x_adv)
        # two passes, not one on the concatenation: in training mode batch norm would mix their statistics, and
        # the clean pass must be the step's own (same batch statistics) for the clean CE to cancel exactly
        logits, logits_adv = apply_fn(params, xs), apply_fn(params, x_adv)
        check_logits(logits, xs)
        ce_clean = jnp.mean(cross_entropy(logits, ys))
        ce_adv = jnp.mean(cross_entropy(logits_adv, ys))
        gap = ce_adv - ce_clean
        return state["coeff"] * gap, state, {"adversarial": gap, "ce_adv": ce_adv}

    return Regularizer(name="adversarial", init=init, loss=loss)
