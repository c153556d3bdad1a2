"""Deprecated alias of :mod:`lcnn_jax.train` (and of :mod:`lcnn_jax.io` / :mod:`lcnn_jax.errors` for the file
writers and exceptions that used to live here), kept for one release so that existing scripts keep working.

``training.py`` held seven jobs in 1,400 lines; they now live in :mod:`lcnn_jax.train` (state and steps,
distributed helpers, checkpoints, run directories, the one loop, ``fit``, sweeps), :mod:`lcnn_jax.io` and
:mod:`lcnn_jax.errors`. Import from there: ``from lcnn_jax import train; train.fit(config, workdir)``. As optax
does when it moves code, the old names stay importable here, as the very same objects, until the next release.
"""
from __future__ import annotations

import warnings

# ruff: noqa: F401, F403
from lcnn_jax.errors import (ConfigError, NoSpaceLeft, RunDirError, TrainingDiverged, TrainingInterrupted,
                             short_error as _short_error)
from lcnn_jax.io import (MetricsLog, is_no_space as _is_no_space, json_default as _json_default, parse_jsonl,
                         read_metrics_log, write_csv_atomic, write_json_atomic, write_text_atomic)
from lcnn_jax.train.checkpoint import *
from lcnn_jax.train.distributed import *
from lcnn_jax.train.evaluation import *
from lcnn_jax.train.loop import *
from lcnn_jax.train.rundir import *
from lcnn_jax.train.setup import *
from lcnn_jax.train.single import *
from lcnn_jax.train.state import *

warnings.warn("lcnn_jax.training is deprecated: import from lcnn_jax.train (training), lcnn_jax.io (file writers) "
              "and lcnn_jax.errors (exceptions).", DeprecationWarning, stacklevel=2)
