"""Deprecated alias of :mod:`lcnn_jax.train.sweep` and :mod:`lcnn_jax.train.members` (vectorized sweeps), kept
for one release: ``from lcnn_jax import train; train.fit_sweep(config, workdir, seeds=(0, 1, 2))``. The names
are the very same objects as in their new modules.
"""
from __future__ import annotations

import warnings

# ruff: noqa: F401, F403
from lcnn_jax.loops import MAX_UNROLLED_MEMBERS, MEMBER_LOOPS, uses_convolution
from lcnn_jax.train.members import *
from lcnn_jax.train.sweep import *

warnings.warn("lcnn_jax.sweep is deprecated: import from lcnn_jax.train (fit_sweep, load_sweep, train_seeds, ...).",
              DeprecationWarning, stacklevel=2)
