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

from typing import Any, Callable, NamedTuple

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
