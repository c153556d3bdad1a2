"""Training-time regularizers: pure ``(init, loss)`` pairs added to the cross-entropy.

See :mod:`lcnn_jax.regularizers.base` for the interface. Build one by name with :func:`make_regularizer`
(what the config's ``regularizers`` section does), or call a constructor directly.

Names: ``lcnn_jax.regularizers.clip`` and ``lcnn_jax.regularizers.derivative`` are the constructors (functions),
as the README lists them; they shadow the submodules of the same name as attributes of this package. The helpers
of those submodules are imported by their full path, which still works:
``from lcnn_jax.regularizers.clip import draw_pairs`` (``import lcnn_jax.regularizers.clip as m`` would give
the function, so use the ``from`` form).
"""
from __future__ import annotations

import importlib

from lcnn_jax.regularizers.adversarial import adversarial_training
from lcnn_jax.regularizers.base import Regularizer, apply_epoch_end, empty_state
from lcnn_jax.regularizers.certifiable import curvature_penalty, lipschitz_margin
from lcnn_jax.regularizers.gradient import (confidence_penalty, datagrad, jacobian_penalty, jacreg,
                                            penalty_regularizer, spectreg)
from lcnn_jax.regularizers.lcnn import cure, lcnn_gradnorm, lcnn_penalty, lcnn_terms
from lcnn_jax.regularizers.weight import weight_l2

# Last: importing these submodules binds the package attributes `clip` / `derivative` to the modules; rebinding
# them to the functions here makes `from lcnn_jax.regularizers import clip` give the regularizer, as documented.
from lcnn_jax.regularizers.clip import clip  # noqa: E402
from lcnn_jax.regularizers.derivative import derivative  # noqa: E402

# name -> "module:constructor"; imported lazily so a config error never pays for every import.
REGULARIZERS = {
    "datagrad": "lcnn_jax.regularizers.gradient:datagrad",
    "jacreg": "lcnn_jax.regularizers.gradient:jacreg",
    "spectreg": "lcnn_jax.regularizers.gradient:spectreg",
    "confidence_penalty": "lcnn_jax.regularizers.gradient:confidence_penalty",
    "derivative": "lcnn_jax.regularizers.derivative:derivative",
    "weight_l2": "lcnn_jax.regularizers.weight:weight_l2",
    "clip": "lcnn_jax.regularizers.clip:clip",
    "lcnn": "lcnn_jax.regularizers.lcnn:lcnn_penalty",
    "lcnn_gradnorm": "lcnn_jax.regularizers.lcnn:lcnn_gradnorm",
    "cure": "lcnn_jax.regularizers.lcnn:cure",
    "adversarial": "lcnn_jax.regularizers.adversarial:adversarial_training",
    "lipschitz_margin": "lcnn_jax.regularizers.certifiable:lipschitz_margin",
    "crt": "lcnn_jax.regularizers.certifiable:curvature_penalty",
}


def make_regularizer(name: str, dataset_info=None, **kwargs) -> Regularizer:
    """Construct a regularizer by name. ``dataset_info`` supplies data-derived arguments: the derivative
    penalty's ``resolution`` (the data's intensity quantum) unless given explicitly."""
    if name not in REGULARIZERS:
        raise ValueError(f"Unknown regularizer {name!r}; choose among {sorted(REGULARIZERS)}.")
    module, _, attr = REGULARIZERS[name].partition(":")
    ctor = getattr(importlib.import_module(module), attr)
    if name == "derivative" and "resolution" not in kwargs and dataset_info is not None:
        kwargs["resolution"] = dataset_info.resolution
    try:
        return ctor(**kwargs)
    except TypeError as e:
        raise ValueError(f"Bad arguments for regularizer {name!r}: {e}") from e


__all__ = ["Regularizer", "REGULARIZERS", "apply_epoch_end", "empty_state", "make_regularizer", "jacobian_penalty",
           "datagrad",
           "jacreg", "spectreg", "confidence_penalty", "penalty_regularizer", "derivative", "clip", "weight_l2", "cure", "lcnn_gradnorm", "lcnn_penalty", "lcnn_terms",
           "adversarial_training"]
