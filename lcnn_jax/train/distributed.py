"""Devices and processes: the data mesh, placing batches and states on it, jitting a step over it, and the
multi-process helpers.

Data parallelism uses ``jax.jit`` over a one-axis :class:`jax.sharding.Mesh` named ``"data"`` with every
device: the batch is sharded along its leading axis, the train state is replicated, and XLA inserts the gradient
all-reduce. The same code runs on one CPU, on ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` simulated
devices, or on 8 GPUs. Several processes (``python -m lcnn_jax.launch`` on one machine, or one per host) join
through :func:`maybe_initialize_distributed`; every process then draws the same global batch (batches are a pure
function of seed and epoch) and places its own devices' slices (:func:`place_global`), XLA all-reduces across
processes (gloo on the CPU), process 0 alone writes results, configs and the metrics log, and orbax writes each
checkpoint from every process. A run on P processes computes what a one-process run on the same global batch
computes, to float32 all-reduce rounding (``tests/test_launch.py``).
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcnn_jax.errors import ConfigError
from lcnn_jax.types import PyTree

__all__ = ["maybe_initialize_distributed", "is_primary", "sync_processes", "data_mesh", "shard_batch", "place_global",
           "put_global", "replicate", "to_host", "jit_train_step", "jit_eval_step"]


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when the environment describes a multi-process job; return whether
    this process is part of one.

    Recognised: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0's coordinator) with ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID`` (what :mod:`lcnn_jax.launch` sets for each process it starts), or a cluster JAX
    auto-detects (SLURM with several tasks, Cloud TPU pods) when ``LCNN_JAX_DISTRIBUTED=1``. On the CPU the
    collectives between processes go through gloo (``jax_cpu_collectives_implementation``, JAX's default since
    0.4.3x; set here when unset). Single-process runs do nothing. Must run before anything touches a JAX device
    (``lcnn-jax train`` / ``sweep`` call it first thing); calling it again is a no-op.

    Raises:
      ConfigError: ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` are not integers, or JAX was already in use.
    """
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (addr or os.environ.get("LCNN_JAX_DISTRIBUTED") == "1"):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    for env, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(env):
            try:
                kwargs[name] = int(os.environ[env])
            except ValueError:
                raise ConfigError(f"{env}={os.environ[env]!r} must be an integer.") from None
    if str(jax.config.jax_cpu_collectives_implementation or "none").lower() == "none":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=addr or None, **kwargs)
    except RuntimeError as e:
        if "before" not in str(e).lower():
            raise
        raise ConfigError(f"jax.distributed.initialize() must run before JAX is used, but this process already "
                          f"used a JAX device ({e}). Call lcnn_jax.train.maybe_initialize_distributed() first "
                          f"thing in the script.") from None
    return True


def is_primary() -> bool:
    """True in process 0, the one process of a multi-process job that writes results, logs and configs (orbax
    coordinates the checkpoint writes of every process itself). Always True in a single-process run."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Wait until every process reaches this point (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh ``("data",)`` over ``devices`` (default: all devices of all processes)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), ("data",))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a host-local batch (numpy) on the mesh, sharded along the leading axis.

    On several processes each passes its own slice (its devices' part of the global batch, in device order); the
    global array is assembled by ``jax.make_array_from_process_local_data``. :func:`place_global` takes the whole
    global batch instead.
    """
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def place_global(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """Place host arrays that every process holds in full (the same global batch everywhere: batches are a pure
    function of seed and epoch) on ``sharding``; each process copies only its own devices' slices
    (``jax.make_array_from_callback``), whatever the mesh layout. One process: an ordinary sharded ``device_put``."""
    def one(v):
        v = np.asarray(v)
        return jax.make_array_from_callback(v.shape, sharding, lambda idx: v[idx])

    return jax.tree.map(one, tree)


def put_global(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """``jax.device_put(tree, sharding)`` that also holds with several processes.

    There, a leaf that is not yet a global array (numpy, or an array on this process's devices) is sent through
    host memory: ``device_put`` of a process-local ``jax.Array`` onto a mesh that spans several processes gives an
    array orbax cannot save in JAX 0.10.2. Every process must pass the same values."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x if x.sharding == sharding else jax.device_put(x, sharding)
        return jax.device_put(np.asarray(x), sharding)

    return jax.tree.map(one, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place every leaf of ``tree`` on all devices of ``mesh`` (replicated)."""
    return put_global(tree, NamedSharding(mesh, P()))


def to_host(tree: PyTree) -> PyTree:
    """Every leaf as a NumPy array, also a leaf sharded over devices of several processes (gathered from all of
    them: a collective, so every process must call this at the same point). One process: ``jax.device_get``."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def jit_train_step(step_fn, mesh: Mesh):
    """``jax.jit`` the step with a replicated state (donated) and a batch sharded on the ``data`` axis."""
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(step_fn, in_shardings=(rep, dat), out_shardings=(rep, rep), donate_argnums=(0,))


def jit_eval_step(eval_fn, mesh: Mesh):
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(eval_fn, in_shardings=(rep, dat), out_shardings=rep)
