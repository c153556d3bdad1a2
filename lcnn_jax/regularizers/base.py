"""The regularizer interface.

A regularizer is a pair of pure functions, in the spirit of ``optax.GradientTransformation``::

    state = reg.init(key, params, batch)
    value, new_state, metrics = reg.loss(params, state, batch, key, apply_fn)

* ``apply_fn(params, xs) -> logits`` is the model as a batched function of its parameters and inputs
  (built by the training step from the model in training mode; mutated collections are discarded).
* ``batch`` is ``{"image": (B, H, W, C) float32, "label": (B,) int32}``.
* ``value`` is the term **already multiplied by its coefficient**; it is added to the cross-entropy.
* Coefficients are arrays stored in ``state`` (key ``"coeff"`` by convention), never Python constants
  baked into the trace: a grid of coefficients is then a ``jax.vmap`` over states, and changing a
  coefficient (CLIP's discrepancy principle) never recompiles the step.
* ``metrics`` is a flat dict of scalars for the training log (e.g. the unweighted penalty).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.types import Array, ApplyFn, Batch, Params, PRNGKey, PyTree

InitFn = Callable[[PRNGKey, Params, Batch], PyTree]
LossFn = Callable[[Params, PyTree, Batch, PRNGKey, ApplyFn], "tuple[Array, PyTree, dict[str, Array]]"]


EpochEndFn = Callable[[PyTree, Array, int], PyTree]


class Regularizer(NamedTuple):
    """A named ``(init, loss)`` pair; see the module docstring for the contract.

    ``epoch_end(state, train_accuracy, epoch) -> state`` (optional) runs on the host after every epoch with the
    epoch's mean training accuracy (a float32 scalar array); CLIP's discrepancy principle uses it to move its
    coefficient. It must keep every leaf's shape and dtype, so the compiled step is reused.
    """

    name: str
    init: InitFn
    loss: LossFn
    epoch_end: EpochEndFn | None = None


def empty_state(coeff: Any = None) -> dict:
    """State of a stateless regularizer: just its coefficient (if any) as a float32 array."""
    import jax.numpy as jnp

    return {} if coeff is None else {"coeff": jnp.asarray(coeff, jnp.float32)}


def apply_epoch_end(states: Any, regularizers: "Union[Regularizer, Sequence[Regularizer]]", train_accuracy: Any,
                    epoch: int) -> Any:
    """Run the regularizers' ``epoch_end`` hooks after an epoch, for a custom training loop.

    ``states``: one state per regularizer, in order (a tuple; or a single state with a single regularizer).
    ``train_accuracy``: the epoch's training accuracy as a fraction (the fit loop passes the mean of its batch
    accuracies as a float32 scalar); ``epoch``: the epoch just finished, counted from 0. Returns the states in
    the same structure, each replaced by ``epoch_end(state, train_accuracy, epoch)`` where the regularizer has a
    hook (CLIP's discrepancy principle and pair redraws, ``weight_l2``'s schedule) and passed through unchanged
    otherwise. Runs on the host, between compiled steps; the states keep their shapes and dtypes.

    Example::

        for epoch in range(num_epochs):
            ...  # compiled steps, each returning the new regularizer states
            reg_states = apply_epoch_end(reg_states, regularizers, jnp.float32(epoch_accuracy), epoch)
    """
    if isinstance(regularizers, Regularizer):
        return regularizers.epoch_end(states, train_accuracy, epoch) if regularizers.epoch_end else states
    regularizers, states = tuple(regularizers), tuple(states)
    if len(states) != len(regularizers):
        raise ValueError(f"apply_epoch_end needs one state per regularizer, got {len(states)} states for "
                         f"{len(regularizers)} regularizers ({[r.name for r in regularizers]}).")
    return tuple(r.epoch_end(s, train_accuracy, epoch) if r.epoch_end is not None else s
                 for r, s in zip(regularizers, states))


# ------------------------------------------------------------------------------------------------ checks
def check_coeff(coeff: Any) -> None:
    """Raise ``ValueError`` unless ``coeff`` is a finite, non-negative scalar."""
    if np.ndim(coeff) != 0:
        raise ValueError(
            f"coeff must be a scalar, got shape {np.shape(coeff)}; for a grid of coefficients build one state per "
            "value and stack them (jax.tree.map(lambda *a: jnp.stack(a), *states)), then jax.vmap the loss."
        )
    if isinstance(coeff, jax.core.Tracer):
        return
    value = float(coeff)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"coeff must be finite and >= 0, got {value}.")


def batch_images(batch: Batch) -> Array:
    """``batch["image"]``, checked: present, with a batch axis and at least one feature axis."""
    if "image" not in batch:
        raise ValueError(f"batch needs an 'image' entry of shape (B, ...), got keys {sorted(batch)}.")
    xs = batch["image"]
    if xs.ndim < 2:
        raise ValueError(f"batch['image'] must have a batch axis and at least one feature axis, got {xs.shape}.")
    return xs


def check_logits(logits: Array, xs: Array) -> None:
    """Raise ``ValueError`` unless ``logits`` has shape ``(B, K)`` for the ``B`` examples of ``xs``."""
    if logits.ndim != 2 or logits.shape[0] != xs.shape[0]:
        raise ValueError(
            f"apply_fn(params, xs) must return logits of shape (B, K) = ({xs.shape[0]}, K), got {logits.shape}."
        )


def batch_labels(batch: Batch, n: int) -> Array:
    """``batch["label"]``, checked: present, of shape ``(n,)``."""
    if "label" not in batch:
        raise ValueError("this penalty needs integer class labels: pass batch['label'] of shape (B,).")
    labels = batch["label"]
    if labels.shape != (n,):
        raise ValueError(f"batch['label'] must have shape ({n},), got {labels.shape}.")
    return labels


def per_example_sq_norm(a: Array, lead: int) -> Array:
    """Sum of squares over every axis after the first ``lead`` ones."""
    return jnp.sum(jnp.square(a), axis=tuple(range(lead, a.ndim)))
