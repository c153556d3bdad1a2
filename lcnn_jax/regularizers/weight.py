"""Weight regularization ``coeff * ||theta||^2``: the baseline of the CLIP paper. Its ``mu`` can follow the same
discrepancy principle as CLIP's ``lambda`` (``target=...``; the rule is
:func:`lcnn_jax.regularizers.clip.discrepancy_principle`), which works because the coefficient is an array in the
state: moving it never recompiles the step.

Example::

    # L2 on everything except biases and LCNN's activation / batch-norm scales
    reg = weight_l2(1e-4, include=lambda path, leaf: path[-1] not in ("bias", "log_beta", "log_gamma"))
    value, state, metrics = reg.loss(params, reg.init(key, params, batch), batch, key, apply_fn)

    # the CLIP paper's WeightReg90: mu moves by 1e-4 per epoch towards 90 % training accuracy
    reg = weight_l2(1e-3, target=0.9, dlam=1e-4)
    state = reg.epoch_end(state, train_accuracy, epoch)     # on the host, after each epoch
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from lcnn_jax.regularizers.base import Regularizer
from lcnn_jax.regularizers.clip import discrepancy_principle
from lcnn_jax.regularizers.gradient import penalty_regularizer
from lcnn_jax.types import Array, Params

__all__ = ["weight_l2", "squared_norm"]

# (path as a tuple of str, e.g. ("Dense_0", "kernel"), leaf) -> include the leaf in the penalty?
IncludeFn = Callable[[tuple, Array], bool]


def _names(path) -> tuple:
    """A key path as plain strings (dict keys, attribute names, sequence indices)."""
    out = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                out.append(str(getattr(entry, attr)))
                break
        else:
            out.append(str(entry))
    return tuple(out)


def squared_norm(params: Params, include: Optional[IncludeFn] = None) -> Array:
    """``sum ||leaf||^2`` over the leaves selected by ``include`` (all leaves when None). The selection is
    decided on the static tree structure at trace time; it costs no pass through the model."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    terms = [jnp.sum(jnp.square(leaf)) for path, leaf in leaves if include is None or include(_names(path), leaf)]
    return sum(terms, jnp.zeros((), jnp.float32))


def weight_l2(coeff: Any, *, include: Optional[IncludeFn] = None, target: Optional[float] = None,
              dlam: Optional[float] = None, warmup_epochs: int = 0,
              warmup_coeff: Optional[float] = None) -> Regularizer:
    """``coeff * sum_{selected leaves} ||theta||^2`` over the ``params`` passed to ``loss``.

    Args:
      coeff: finite scalar >= 0, stored as a float32 array in ``state["coeff"]``.
      include: optional predicate ``(path: tuple[str, ...], leaf) -> bool``; leaves where it is False are excluded
        (e.g. biases, ``log_beta``, ``log_gamma``).
      target, dlam, warmup_epochs, warmup_coeff: the discrepancy principle (CLIP's WeightReg baseline): after
        each epoch past the warm-up, ``coeff += dlam`` if the training accuracy exceeds ``target``, else
        ``coeff = max(coeff - dlam, 0)``; see :func:`lcnn_jax.regularizers.clip.discrepancy_principle`.
        ``target=None`` (default) keeps ``coeff`` fixed and ``epoch_end`` is None.

    ``metrics["weight_l2"]`` is the unweighted squared norm. Note this is an explicit loss term (gradient
    ``2 coeff theta``), not the decoupled ``optax.add_decayed_weights`` weight decay.
    """
    if include is not None and not callable(include):
        raise ValueError(f"include must be a predicate (path, leaf) -> bool, got {type(include).__name__}.")

    initial, epoch_end = discrepancy_principle(coeff, target=target, dlam=dlam, warmup_epochs=warmup_epochs,
                                               warmup_coeff=warmup_coeff)

    def penalty(params, batch, key, apply_fn):
        del batch, key, apply_fn
        return squared_norm(params, include)

    return penalty_regularizer("weight_l2", initial, penalty)._replace(epoch_end=epoch_end)
