"""Training: the train state and steps, devices and processes, checkpoints, run directories, ONE resumable loop,
and its two drivers: :func:`fit` (one network) and :func:`fit_sweep` (K members in one compiled program).

Modules (every public name is also importable from ``lcnn_jax.train``):

* :mod:`~lcnn_jax.train.state`: ``TrainState``, the optimizer, the pure train and eval steps;
* :mod:`~lcnn_jax.train.distributed`: the data mesh, placing batches and states, several processes;
* :mod:`~lcnn_jax.train.evaluation`: whole-split evaluation and the dead-network check;
* :mod:`~lcnn_jax.train.checkpoint`: orbax checkpoints that survive Ctrl-C, damage and a full disk;
* :mod:`~lcnn_jax.train.setup`: what a run builds from its config before the first step;
* :mod:`~lcnn_jax.train.rundir`: may this config train in this workdir; loading finished runs;
* :mod:`~lcnn_jax.train.loop`: the one loop and its hooks;
* :mod:`~lcnn_jax.train.single`: :func:`fit`;
* :mod:`~lcnn_jax.train.members`, :mod:`~lcnn_jax.train.sweep`: sweep members and :func:`fit_sweep`.

Example::

    from lcnn_jax import train
    from experiments.configs import quickstart
    results = train.fit(quickstart.get_config(), workdir="/tmp/run")
    config, model, state, info = train.load_trained("/tmp/run")
"""
from __future__ import annotations

# The flat namespace re-exports every public name of the submodules (each module's __all__).
# ruff: noqa: F401, F403
from lcnn_jax.train.state import *
from lcnn_jax.train.distributed import *
from lcnn_jax.train.evaluation import *
from lcnn_jax.train.checkpoint import *
from lcnn_jax.train.setup import *
from lcnn_jax.train.rundir import *
from lcnn_jax.train.loop import *
from lcnn_jax.train.single import *
from lcnn_jax.train.members import *
from lcnn_jax.train.sweep import *
