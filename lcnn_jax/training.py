"""Training: the train state, a data-parallel jitted step, evaluation, and a resumable fit loop.

The step minimises ``mean CE + sum_r reg_r.loss(...)`` (see :mod:`lcnn_jax.regularizers.base`).

Data parallelism uses ``jax.jit`` over a one-axis :class:`jax.sharding.Mesh` named ``"data"`` with every local
device: the batch is sharded along its leading axis, the train state is replicated, and XLA inserts the
gradient all-reduce. The same code runs on one CPU, on ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
simulated devices, or on 8 GPUs. Several processes (``python -m lcnn_jax.launch`` on one machine, or one per
host) join through :func:`maybe_initialize_distributed`; every process then draws the same global batch (batches
are a pure function of seed and epoch) and places its own devices' slices (:func:`place_global`), XLA all-reduces
across processes (gloo on the CPU), process 0 alone writes results, configs and the metrics log, and orbax writes
each checkpoint from every process. A run on P processes computes what a one-process run on the same global batch
computes, to float32 all-reduce rounding (``tests/test_launch.py``).

Example::

    from lcnn_jax import training
    from experiments.configs import quickstart
    results = training.fit(quickstart.get_config(), workdir="/tmp/run")
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcnn_jax.regularizers.base import Regularizer
from lcnn_jax.types import Array, Batch, PRNGKey, PyTree


from lcnn_jax.errors import (ConfigError, NoSpaceLeft, RunDirError, TrainingDiverged,  # noqa: F401
                             TrainingInterrupted, short_error as _short_error)
from lcnn_jax.io import (MetricsLog, is_no_space as _is_no_space, json_default as _json_default,  # noqa: F401
                         parse_jsonl, read_metrics_log, write_csv_atomic, write_json_atomic, write_text_atomic)

_log = logging.getLogger(__name__)


class TrainState(train_state.TrainState):
    """Flax ``TrainState`` plus the non-parameter model collections, regularizer states and a base key.

    Attributes:
      model_state: every mutable model collection (``batch_stats``, spectral-norm vectors, ...).
      reg_state: one state per regularizer, in the order of the regularizer list.
      rng: base key; step ``t`` uses ``jax.random.fold_in(rng, t)`` (so a resumed run draws the same keys).
      diverged_at: -1, or the first step whose loss was not finite (the state is frozen from then on, so the host
        can check this flag only at logging time without losing the last good parameters).
      epoch_accuracy_sum: sum of the batch training accuracies since the epoch began (for the regularizers'
        ``epoch_end`` hooks; kept in the state so a resumed run sees the same epoch accuracy).
    """

    model_state: PyTree = struct.field(default_factory=dict)
    reg_state: tuple = ()
    rng: PRNGKey = None
    diverged_at: Array = None
    epoch_accuracy_sum: Array = None


# ----------------------------------------------------------------------------------------------------------
# Optimizer


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def weight_decay_mask(params: PyTree, exclude: Sequence[str]) -> PyTree:
    """True for leaves that get weight decay: those whose path contains none of the names in ``exclude``."""
    exclude = tuple(exclude)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(name in exclude for name in _path_names(path)), params)


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule from ``optim_cfg``: ``constant``, ``piecewise`` or ``cosine`` (+ linear warm-up).

    ``piecewise`` multiplies the rate by ``decay_factor`` at each fraction of training in ``boundaries``
    (the LCNN recipe: x0.1 at 75 % and 87.5 %).
    """
    lr = float(optim_cfg.learning_rate)
    name = optim_cfg.get("schedule", "constant")
    warmup = int(optim_cfg.get("warmup_steps", 0))
    if name == "constant":
        sched = optax.constant_schedule(lr)
    elif name == "piecewise":
        bounds = {int(round(b * total_steps)): float(optim_cfg.get("decay_factor", 0.1))
                  for b in optim_cfg.get("boundaries", (0.75, 0.875))}
        sched = optax.piecewise_constant_schedule(lr, bounds)
    elif name == "cosine":
        sched = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    else:
        raise ConfigError(f"optim.schedule={name!r} is unknown; use 'constant', 'piecewise' or 'cosine'.")
    if warmup > 0:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), sched], [warmup])
    return sched


def make_optimizer(optim_cfg, total_steps: int, params: PyTree) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax optimizer described by ``optim_cfg`` (SGD with momentum, Adam, AdamW) and its schedule.

    Weight decay for ``sgd``/``adam`` is the coupled L2 form of PyTorch (``g + wd * theta`` before the update
    rule), which is what the reference implementations train with; ``adamw`` decouples it. Leaves whose path
    contains a name in ``optim_cfg.wd_exclude`` (default: LCNN's ``log_beta`` and ``log_gamma``) get no decay.
    ``optim_cfg.clip_grad_norm`` (None: off) rescales the loss gradient to that global norm when it is larger
    (``optax.clip_by_global_norm``), before weight decay and momentum: the usual cure for a loss that blows up.
    """
    sched = make_schedule(optim_cfg, total_steps)
    name = optim_cfg.get("name", "sgd")
    wd = float(optim_cfg.get("weight_decay", 0.0))
    mask = weight_decay_mask(params, optim_cfg.get("wd_exclude", ("log_beta", "log_gamma")))
    if name == "sgd":
        momentum = float(optim_cfg.get("momentum", 0.9))
        core = optax.sgd(sched, momentum=momentum or None, nesterov=bool(optim_cfg.get("nesterov", False)))
    elif name == "adam":
        core = optax.adam(sched)
    elif name == "adamw":
        core = optax.adamw(sched, weight_decay=wd, mask=mask)
    else:
        raise ConfigError(f"optim.name={name!r} is unknown; use 'sgd', 'adam' or 'adamw'.")
    if wd > 0 and name != "adamw":
        core = optax.chain(optax.add_decayed_weights(wd, mask), core)
    clip = optim_cfg.get("clip_grad_norm")
    if clip:  # only when set: the optimizer state of an unclipped run keeps its old structure (checkpoints)
        core = optax.chain(optax.clip_by_global_norm(float(clip)), core)
    return core, sched


# ----------------------------------------------------------------------------------------------------------
# State, step and evaluation


def create_train_state(model, tx: optax.GradientTransformation, regularizers: Sequence[Regularizer],
                       key: PRNGKey, sample_batch: Batch) -> TrainState:
    """Initialise model variables (in evaluation mode, :func:`lcnn_jax.nn.mode_kwargs`), optimizer and regularizer
    states from one (host-local) sample batch. Every collection but ``params`` goes to ``model_state`` (e.g.
    ``batch_stats``, none for a model without one), except ``intermediates``: values ``sow``-n during a call
    accumulate there, so carried from step to step they would grow."""
    from lcnn_jax.nn import mode_kwargs

    k_init, k_reg, k_rng = jax.random.split(key, 3)
    variables = model.init(k_init, jnp.asarray(sample_batch["image"]), **mode_kwargs(model, train=False))
    variables = dict(variables)
    variables.pop("intermediates", None)
    params = variables.pop("params")
    reg_keys = jax.random.split(k_reg, max(len(regularizers), 1))
    reg_state = tuple(r.init(k, params, sample_batch) for r, k in zip(regularizers, reg_keys))
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, model_state=variables,
                             reg_state=reg_state, rng=k_rng, diverged_at=jnp.asarray(-1, jnp.int32),
                             epoch_accuracy_sum=jnp.zeros((), jnp.float32))


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


DROPOUT_STREAM = 1_000_003  # fold_in index of the step key that seeds the model's "dropout" rng stream


def make_train_step(model, regularizers: Sequence[Regularizer]) -> Callable[[TrainState, Batch], tuple]:
    """Return ``step(state, batch) -> (state, metrics)``, pure and jittable (not yet jitted).

    The model runs in training mode (:func:`lcnn_jax.nn.mode_kwargs`: ``train=True`` where its ``__call__`` takes
    it, nothing for a model without such an argument), with every collection of ``state.model_state`` mutable and
    an rng stream ``"dropout"`` (``fold_in(step key, DROPOUT_STREAM)``: ``nn.Dropout`` draws a fresh mask each
    step; the regularizers' forward passes of the step share it).

    Metrics: ``loss`` (total), ``ce``, ``accuracy``, ``grad_norm`` and every regularizer's own metrics,
    prefixed by its name. A non-finite loss freezes the state and records the step in ``diverged_at``.
    """
    from lcnn_jax.nn import mode_kwargs

    regularizers = tuple(regularizers)
    train_kw = mode_kwargs(model, train=True)

    def loss_fn(params, state: TrainState, batch: Batch, key: PRNGKey):
        mutable = list(state.model_state.keys())
        variables = {"params": params, **state.model_state}
        rngs = {"dropout": jax.random.fold_in(key, DROPOUT_STREAM)}
        logits, new_model_state = model.apply(variables, batch["image"], mutable=mutable, rngs=rngs, **train_kw)
        ce = cross_entropy(logits, batch["label"])

        def apply_fn(p, xs):  # the model in training mode; mutated collections are discarded
            return model.apply({"params": p, **state.model_state}, xs, mutable=mutable, rngs=rngs, **train_kw)[0]

        total, metrics, new_reg_state = ce, {"ce": ce}, []
        for i, (reg, rstate) in enumerate(zip(regularizers, state.reg_state)):
            value, rstate, rmetrics = reg.loss(params, rstate, batch, jax.random.fold_in(key, i), apply_fn)
            total = total + value
            new_reg_state.append(rstate)
            metrics.update({f"{reg.name}/{k}": v for k, v in rmetrics.items()})
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        metrics.update(accuracy=acc)
        return total, (dict(new_model_state), tuple(new_reg_state), metrics)

    def step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(state.rng, state.step)
        (loss, (model_state, reg_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, batch, key)
        new_state = state.apply_gradients(grads=grads, model_state=model_state, reg_state=reg_state)
        ok = jnp.isfinite(loss) & (state.diverged_at < 0)
        # Freeze on divergence: keep every leaf of the old state except the step counter and the flag.
        frozen = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        frozen = frozen.replace(step=state.step + 1,
                                diverged_at=jnp.where(ok | (state.diverged_at >= 0), state.diverged_at, state.step),
                                epoch_accuracy_sum=state.epoch_accuracy_sum + metrics["accuracy"])
        metrics.update(loss=loss, grad_norm=optax.global_norm(grads))
        return frozen, metrics

    return step


def make_eval_step(model) -> Callable[[TrainState, Batch], dict]:
    """Return ``eval_step(state, batch) -> {"loss_sum", "correct", "count", "logit_spread", "logit_scale",
    "pred_counts"}`` in eval mode; ``batch["mask"]`` (1 for real examples, 0 for padding) lets the last, partial
    batch be padded to a fixed shape. ``logit_spread`` is ``max_k (max_i z_ik - min_i z_ik)`` over the batch's
    real examples, ``logit_scale`` is ``max |z_ik|`` and ``pred_counts`` the number of examples predicted as each
    class: summed over batches they tell a *dead* network (:func:`dead_network`)."""
    from lcnn_jax.nn import mode_kwargs

    eval_kw = mode_kwargs(model, train=False)

    def eval_step(state: TrainState, batch: Batch):
        logits = model.apply({"params": state.params, **state.model_state}, batch["image"], **eval_kw)
        mask = batch["mask"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        real = mask[:, None] > 0
        spread = jnp.where(real, logits, -jnp.inf).max(0) - jnp.where(real, logits, jnp.inf).min(0)
        pred = jnp.argmax(logits, -1)
        return {"loss_sum": jnp.sum(ce * mask),
                "correct": jnp.sum((pred == batch["label"]) * mask),
                "count": jnp.sum(mask),
                "logit_spread": jnp.max(spread),
                "logit_scale": jnp.max(jnp.where(real, jnp.abs(logits), 0.0)),
                "pred_counts": jnp.sum(jax.nn.one_hot(pred, logits.shape[-1]) * mask[:, None], axis=0)}

    return eval_step


# ----------------------------------------------------------------------------------------------------------
# Sharding


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
                          f"used a JAX device ({e}). Call lcnn_jax.training.maybe_initialize_distributed() first "
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


def evaluation_totals(eval_batch: Callable[[dict], dict], images: np.ndarray, labels: np.ndarray, *,
                      batch_size: int) -> dict:
    """Sum ``eval_batch(batch)`` (``{"loss_sum", "correct", "count", ...}``: every key it returns) over a whole
    split in batches of ``batch_size``; the last batch is padded to that size and masked (``batch["mask"]``), so
    one compiled shape serves every batch. Returns float64 NumPy totals of whatever shape ``eval_batch`` returns
    (scalars for one model, ``(K,)`` for a vmapped sweep of K members)."""
    totals: dict = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        pad = batch_size - len(x)
        mask = np.concatenate([np.ones(len(x), np.float32), np.zeros(pad, np.float32)])
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
        out = to_host(eval_batch({"image": x, "label": y, "mask": mask}))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
    return totals


def evaluate(state: TrainState, eval_step, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
             mesh: Mesh) -> dict:
    """Accuracy and mean cross-entropy over a whole split; the last batch is padded and masked."""
    n_dev = mesh.devices.size
    batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
    sharding = NamedSharding(mesh, P("data"))
    totals = evaluation_totals(lambda b: eval_step(state, place_global(b, sharding)), images, labels,
                               batch_size=batch_size)
    n = max(float(totals["count"]), 1.0)
    return {"accuracy": float(totals["correct"]) / n, "loss": float(totals["loss_sum"]) / n,
            "count": int(totals["count"]), "logit_spread": float(totals.get("logit_spread", math.nan)),
            "logit_scale": float(totals.get("logit_scale", math.nan)),
            "pred_counts": np.asarray(totals.get("pred_counts", []), np.float64).tolist()}


DEAD_SPREAD_RTOL = 1e-5  # ~100 float32 ulps: a live network's logits differ between inputs by O(1)
DEAD_COLLAPSE = 0.99  # share of the images predicted as one class beyond which a classifier has collapsed


def dead_network(logit_spread: float, logit_scale: float, pred_counts=None) -> bool:
    """True when a trained classifier is *dead*: its logits are the same for every evaluated input within float32
    rounding (``logit_spread <= 1e-5 * max(logit_scale, 1)``), or it predicts one class for at least 99 % of them
    (``max(pred_counts) >= 0.99 * sum(pred_counts)``); all three are totals from :func:`evaluation_totals`.

    Typical cause: a learning rate so large that every ReLU ends up off for (nearly) every input. Such a network
    has the accuracy of one constant guess and input gradients of exactly 0 wherever its output is constant, so
    every smoothness measure reports a perfectly "smooth" function. Its loss is finite, so the divergence check
    misses it."""
    if math.isfinite(logit_spread) and math.isfinite(logit_scale) and \
            logit_spread <= DEAD_SPREAD_RTOL * max(logit_scale, 1.0):
        return True
    counts = np.asarray(pred_counts if pred_counts is not None else [], np.float64)
    return bool(counts.sum() > 0 and counts.max() >= DEAD_COLLAPSE * counts.sum())


def jit_eval_step(eval_fn, mesh: Mesh):
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(eval_fn, in_shardings=(rep, dat), out_shardings=rep)


# ----------------------------------------------------------------------------------------------------------
# Files


@contextlib.contextmanager
def _quiet_orbax():
    """Silence orbax's own error logging (the ``absl`` logger) while probing checkpoints or saving: the same
    problem reaches the caller as one exception, which the caller turns into one message."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _leaf_signature(tree) -> list[tuple]:
    """Sorted ``(shape, dtype)`` of every non-scalar array leaf: compares a checkpoint's metadata with a template
    state without depending on how orbax names the containers. Scalars (step counters, coefficients) are left
    out: a fresh state may hold them as Python numbers, and the parameter shapes are what tell configs apart."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return sorted((tuple(int(d) for d in x.shape), str(np.dtype(x.dtype))) for x in leaves
                  if hasattr(x, "shape") and hasattr(x, "dtype") and len(x.shape) > 0)


TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a step folder whose save never finished


class Checkpointer:
    """Thin wrapper over an orbax ``CheckpointManager`` in ``workdir/checkpoints`` (synchronous saves, so a
    checkpoint on disk is complete before training goes on; orbax writes each step to a temporary folder and
    renames it, so an interruption never leaves a half checkpoint under a step's name).

    A *writer* (``read_only=False``: training) first removes the temporary folders of saves that never finished
    (Ctrl-C, a full disk). A reader (measuring) changes nothing on disk. :meth:`restore_newest_intact` falls
    back past damaged checkpoints (truncated or emptied files); :meth:`save` turns a full disk into
    :class:`NoSpaceLeft`.
    """

    def __init__(self, workdir: str, max_to_keep: int = 2, *, read_only: bool = False):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        if not read_only:
            if is_primary():  # one process cleans up; the others wait, so no one lists a folder being removed
                remove_unfinished_checkpoints(self.directory)
            sync_processes("lcnn_jax.checkpointer.cleanup")
        with _quiet_orbax():  # read_only makes orbax warn that it ignores the save options
            opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                                enable_async_checkpointing=False, read_only=read_only)
            self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                                 item_handlers=ocp.StandardCheckpointHandler())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState) -> None:
        """Save ``state`` as step ``step`` and wait until it is on disk.

        Raises:
          NoSpaceLeft: the disk is full; the unfinished folder is removed and the previous checkpoints are kept.
        """
        self._check_free_space(step, state)
        try:
            with _quiet_orbax():
                self.manager.save(int(step), args=self._ocp.args.StandardSave(state), force=True)
                self.manager.wait_until_finished()
        except Exception as e:
            if not _is_no_space(e):
                raise
            remove_unfinished_checkpoints(self.directory)
            raise NoSpaceLeft(f"no space left on {self.workdir} while saving the checkpoint of step {step}. "
                              f"{_kept(self.latest_step())}") from None

    def _check_free_space(self, step: int, state) -> None:
        """Refuse a save the disk cannot hold (the state's bytes plus 1 MiB of metadata) before orbax starts
        writing: a save that fails halfway leaves a temporary folder and prints errors from orbax's I/O threads
        that no caller can catch. A disk that fills up during the save is still caught in :meth:`save`."""
        need = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state)) + 2 ** 20
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise NoSpaceLeft(f"no space left on {self.workdir}: the checkpoint of step {step} needs about "
                              f"{need / 2 ** 20:.1f} MiB, {free / 2 ** 20:.1f} MiB are free. "
                              f"{_kept(self.latest_step())}")

    def restore(self, state_like: TrainState, step: int | None = None) -> TrainState:
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, state_like)
        with _quiet_orbax():
            return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def restore_newest_intact(self, state_like: TrainState, *, quarantine: bool = False):
        """``(state, step)`` from the newest checkpoint that restores, or ``(None, None)`` when there is none.

        A checkpoint that cannot be read (truncated or emptied files) is skipped with a warning naming it; with
        ``quarantine`` (training, which will save that step again) it is moved to ``workdir/damaged_checkpoints/``.
        A checkpoint that reads but holds arrays of other shapes than ``state_like`` is not damaged: it belongs to
        another config, and :class:`RunDirError` says so.

        Raises:
          RunDirError: checkpoints exist but none can be restored, or they hold another network.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        want, damaged = _leaf_signature(state_like), []
        for step in steps:
            try:
                with _quiet_orbax():
                    meta = self.manager.item_metadata(step)
                tree = getattr(meta, "tree", meta)
                if tree is None:
                    raise ValueError("its metadata is missing")
            except Exception as e:  # orbax raises JSONDecodeError, ValueError, FileNotFoundError ... here
                damaged.append((step, _damage(os.path.join(self.directory, str(step)), e)))
                continue
            if _leaf_signature(tree) != want:
                raise RunDirError(
                    f"The checkpoint of step {step} in {self.directory} holds a network of other shapes than the "
                    f"config describes (another model, width, optimizer or regularizer). Nothing was changed. "
                    f"Use a new --workdir for this config, or the config this run was trained with "
                    f"({os.path.join(self.workdir, 'config.json')}).")
            try:
                state = self.restore(state_like, step)
            except Exception as e:
                damaged.append((step, _damage(os.path.join(self.directory, str(step)), e)))
                continue
            self._report_damaged(damaged, step, quarantine)
            return state, step
        if damaged:
            listed = "; ".join(f"step {s}: {e}" for s, e in damaged)
            raise RunDirError(
                f"No checkpoint in {self.directory} can be read ({listed}). The files are damaged; nothing was "
                f"changed. Delete {self.directory} to train this workdir from scratch, or use a new --workdir.")
        return None, None

    def _report_damaged(self, damaged: list, used: int, quarantine: bool) -> None:
        if quarantine:  # every process has finished reading before process 0 moves folders away
            sync_processes("lcnn_jax.checkpointer.quarantine")
        for step, e in damaged:
            where = ""
            if quarantine and is_primary():
                dest = os.path.join(self.workdir, "damaged_checkpoints", str(step))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                if os.path.exists(dest):
                    shutil.rmtree(dest)
                shutil.move(os.path.join(self.directory, str(step)), dest)
                where = f" (moved to {dest})"
            _log.warning("checkpoint step %d in %s is damaged and was skipped%s: %s; using step %d, the newest "
                         "intact checkpoint.", step, self.directory, where, e, used)
        if quarantine:
            sync_processes("lcnn_jax.checkpointer.quarantined")
        if damaged and quarantine:
            self.manager.reload()

    def close(self) -> None:
        self.manager.close()


def _damage(step_dir: str, e: BaseException) -> str:
    """One line on why a checkpoint folder cannot be read: "no files" for an emptied folder (orbax's own message
    then speaks of handler registries), else the error's type and first line."""
    has_files = any(files for _, _, files in os.walk(step_dir))
    return "its folder holds no files" if not has_files else _short_error(e)


def _kept(step: int | None) -> str:
    """The second half of a full-disk message: what is kept and how to go on."""
    if step is None:
        return "No checkpoint was saved yet: free some space and rerun the same command to start again."
    return f"The last complete checkpoint (step {step}) is kept: free some space and rerun the same command to resume."


def remove_unfinished_checkpoints(directory: str) -> list[str]:
    """Delete the orbax temporary folders (``<step>.orbax-checkpoint-tmp...``) of saves that never finished
    (Ctrl-C or a full disk during a save), so they neither fill the disk nor confuse the next save; returns their
    names. Only a writer calls this: a concurrent save of the same run would lose its folder."""
    try:
        names = [n for n in os.listdir(directory) if TMP_MARK in n]
    except (FileNotFoundError, NotADirectoryError):
        return []
    for name in names:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    if names:
        _log.warning("removed %d unfinished checkpoint folder(s) in %s: %s (a save that was interrupted).",
                     len(names), directory, ", ".join(sorted(names)))
    return names


# ----------------------------------------------------------------------------------------------------------
# The fit loop


def _progress(total: int, initial: int, enabled: bool, desc: str = "train"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc=desc, unit="step")


def build_regularizers(reg_cfg, info, pool_images: np.ndarray | None = None) -> list[Regularizer]:
    """Regularizers from ``config.regularizers`` (a dict ``name -> kwargs``), in key order. ``pool_images``
    (held-out training images, see ``data.pair_pool_size``) go to CLIP as its pair pool."""
    from lcnn_jax import regularizers as regs

    out = []
    for name, kwargs in (reg_cfg or {}).items():
        kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else (kwargs or {}))
        if name == "clip" and pool_images is not None:
            kwargs.setdefault("pool_images", pool_images)
        try:
            out.append(regs.make_regularizer(name, dataset_info=info, **kwargs))
        except ValueError as e:
            raise ConfigError(f"regularizers.{name}: {e}") from e
    return out


def check_regularizers_fit_model(regularizers: Sequence[Regularizer], abstract_params: PyTree, sample: Batch, *,
                                 model_name: str, names: Sequence[str] | None = None) -> None:
    """Run every regularizer's ``init`` on the model's parameter shapes (``jax.eval_shape``: a trace, no
    compilation), so a regularizer that needs another model (``regularizers.lcnn`` needs the ``log_beta`` /
    ``log_gamma`` leaves of an ``lcnn_*`` model) is refused before any training.

    Raises:
      ConfigError: naming the regularizer (its config key in ``names``), the model and the regularizer's reason.
    """
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
    names = [r.name for r in regularizers] if names is None else list(names)
    for name, reg in zip(names, regularizers):
        try:
            jax.eval_shape(lambda p, r=reg: r.init(jax.random.PRNGKey(0), p, sample), params)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"regularizers.{name} cannot be used with model.name={model_name!r}: {e}") from e


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """Everything a training run builds from its config before the first step (shared by :func:`fit` and
    :func:`lcnn_jax.sweep.fit_sweep`, so a sweep member is set up exactly like a single run).

    Attributes:
      info, train, test: the dataset description and its (possibly subset) splits, in host memory.
      model, regularizers, tx, schedule: the Flax model, the regularizer list, the optax optimizer and its schedule.
      mesh: the one-axis ``("data",)`` mesh over every device.
      batch_size, local_bs: the global batch and this process's share of it.
      steps_per_epoch, total_steps: the loop's length (``train.num_steps`` or ``num_epochs * steps_per_epoch``).
      sample: the first global batch, for initialisation (the same in every process).
      step_fn: the un-jitted ``step(state, batch) -> (state, metrics)`` (with CIFAR augmentation when configured).
      eval_fn: the un-jitted ``eval_step(state, batch) -> {"loss_sum", "correct", "count"}``.
    """

    info: Any
    train: Any
    test: Any
    model: Any
    regularizers: tuple
    tx: Any
    schedule: Any
    mesh: Any
    batch_size: int
    local_bs: int
    steps_per_epoch: int
    total_steps: int
    sample: Any
    step_fn: Any
    eval_fn: Any


def prepare_run(config) -> RunSetup:
    """Validate ``config``, load the data, build model, regularizers, optimizer and the step functions.

    Raises:
      ConfigError: a bad configuration value (message names the key).
      lcnn_jax.data.DatasetError: the dataset cannot be found.
    """
    from lcnn_jax import data as data_lib
    from lcnn_jax.configs import validate_config
    from lcnn_jax.nn import make_model

    validate_config(config)
    maybe_initialize_distributed()
    dcfg, tcfg = config.data, config.train
    info = data_lib.dataset_info(dcfg.name)
    train = data_lib.load_split(dcfg.name, "train", data_dir=dcfg.get("data_dir"), download=dcfg.get("download", False))
    test = data_lib.load_split(dcfg.name, "test", data_dir=dcfg.get("data_dir"), download=dcfg.get("download", False))
    if dcfg.get("train_size"):
        try:
            train = data_lib.subset(train, int(dcfg.train_size), seed=int(dcfg.get("subset_seed", 0)))
        except ValueError as e:
            raise ConfigError(f"data.train_size={dcfg.train_size}: {e}") from e
    pool = None
    if dcfg.get("pair_pool_size"):  # held out of training (CLIP's pair pool), never trained on
        try:
            train, held = data_lib.holdout(train, int(dcfg.pair_pool_size), seed=int(dcfg.get("subset_seed", 0)))
        except ValueError as e:
            raise ConfigError(f"data.pair_pool_size={dcfg.pair_pool_size}: {e}") from e
        pool = held.images

    mesh = data_mesh()
    batch_size = int(tcfg.batch_size)
    if batch_size % mesh.devices.size:
        raise ConfigError(f"train.batch_size={batch_size} must be divisible by the {mesh.devices.size} devices; "
                          f"use a multiple of {mesh.devices.size}.")
    if batch_size > len(train.images):
        raise ConfigError(f"train.batch_size={batch_size} exceeds the {len(train.images)} training examples.")
    local_bs = batch_size // jax.process_count()
    steps_per_epoch = len(train.images) // batch_size
    total_steps = int(tcfg.get("num_steps") or int(tcfg.num_epochs) * steps_per_epoch)

    model = make_model(config.model.name, info.num_classes, **dict(config.model.get("kwargs", {}) or {}))
    regularizers = build_regularizers(config.get("regularizers"), info, pool_images=pool)
    # The first global batch, in every process: a regularizer whose init draws from it (CLIP without a pair pool)
    # starts from the same state whatever the number of processes.
    sample = {"image": train.images[:batch_size], "label": train.labels[:batch_size]}
    abstract_params = check_model_fits_data(model, config.model, sample["image"], info, dcfg.name)
    check_regularizers_fit_model(regularizers, abstract_params, sample, model_name=config.model.name,
                                 names=list((config.get("regularizers") or {}).keys()))
    tx, schedule = make_optimizer(config.optim, total_steps, abstract_params)

    step_fn = make_train_step(model, regularizers)
    if dcfg.get("augment", False):
        base_step, augment = step_fn, data_lib.augment_cifar

        def step_fn(st, b):  # augmentation inside the compiled step, keyed by the step
            k = jax.random.fold_in(jax.random.fold_in(st.rng, st.step), 10_007)
            return base_step(st, {**b, "image": augment(k, b["image"])})

    return RunSetup(info=info, train=train, test=test, model=model, regularizers=tuple(regularizers), tx=tx,
                    schedule=schedule, mesh=mesh, batch_size=batch_size, local_bs=local_bs,
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps, sample=sample, step_fn=step_fn,
                    eval_fn=make_eval_step(model))


def check_model_fits_data(model, model_cfg, images: np.ndarray, info, data_name: str) -> PyTree:
    """Trace (no compilation) ``model.init`` and an evaluation-mode ``model.apply`` on ``images`` and return the
    abstract params; raise :class:`ConfigError` when the model cannot take these images, cannot run in
    evaluation mode (e.g. it updates ``batch_stats`` there: it needs a ``train`` argument), or does not return
    logits of shape ``(B, num_classes)``. Catches before any compilation what would otherwise fail deep inside
    the first jitted step."""
    from lcnn_jax.nn import mode_kwargs

    eval_kw = mode_kwargs(model, train=False)
    x = jnp.asarray(images)
    what = (f"model.name={model_cfg.name!r} with model.kwargs={dict(model_cfg.get('kwargs', {}) or {})}")

    def init_and_apply(k):
        variables = model.init(k, x, **eval_kw)
        return variables, model.apply(variables, x, **eval_kw)

    try:
        variables, out = jax.eval_shape(init_and_apply, jax.random.PRNGKey(0))
    except Exception as e:  # the user's model raised: its own message, once, no traceback  # noqa: BLE001
        hint = ("" if eval_kw else " A model with batch statistics or dropout needs a `train` argument in its "
                "__call__ (e.g. nn.BatchNorm(use_running_average=not train)), which the library sets.")
        mode = ", ".join(f"{k}={v}" for k, v in eval_kw.items()) or "its __call__ has no train argument"
        raise ConfigError(f"{what} cannot run on {data_name} images {tuple(info.image_shape)} in evaluation mode "
                          f"({mode}): {type(e).__name__}: {e}.{hint} Change model.kwargs or the model.") from None
    want = (x.shape[0], int(info.num_classes))
    if not hasattr(out, "shape") or tuple(out.shape) != want or not jnp.issubdtype(out.dtype, jnp.floating):
        got = f"shape {tuple(out.shape)} {out.dtype}" if hasattr(out, "shape") else f"a {type(out).__name__}"
        raise ConfigError(f"{what} returns {got} for a batch of {want[0]} {data_name} images; the library needs "
                          f"logits of shape {want} ({info.num_classes} classes). A model's factory gets "
                          f"num_classes= when it takes that argument (a field of the module).")
    return variables["params"]


def _train_loop(state, *, setup: RunSetup, tcfg, start: int, epoch_batches, train_step, epoch_end, check,
                summarize, run_eval, ckpt, log, bar, elapsed_before: float):
    """The resumable loop shared by :func:`fit` and :func:`lcnn_jax.sweep.fit_sweep`, from step ``start`` to
    ``setup.total_steps``.

    The caller supplies what differs between one run and a stacked sweep:
    ``epoch_batches(epoch, start_batch)`` yields device batches; ``train_step(state, batch) -> (state, metrics)``;
    ``epoch_end(state, epoch) -> state`` (regularizer hooks); ``check(state, step)`` (a single run raises on
    divergence, a sweep only notes it); ``summarize(metrics) -> (record, progress_postfix)``;
    ``run_eval(state, step)``. Returns ``(state, step, train_wall_time_s)``.

    Raises:
      TrainingInterrupted: Ctrl-C; the message names the step and the checkpoint a rerun resumes from.
      NoSpaceLeft: the disk is full (metrics log or checkpoint); the last complete checkpoint is kept.
    """
    spe, total_steps = setup.steps_per_epoch, setup.total_steps
    log_every = int(tcfg.get("log_every", 50))
    eval_every = int(tcfg.get("eval_every", 0) or 0)
    ckpt_every = int(tcfg.get("checkpoint_every", 500))
    t_train = time.time()
    step = start
    try:
        for epoch in itertools.count(start // spe):
            if step >= total_steps:
                break
            for batch in epoch_batches(epoch, step - epoch * spe):
                state, metrics = train_step(state, batch)
                step += 1
                if step % spe == 0:
                    state = epoch_end(state, epoch)
                bar.update(1)
                if step % log_every == 0 or step == total_steps:
                    check(state, step)
                    rec, postfix = summarize(metrics)
                    rec.update(step=step, epoch=epoch, learning_rate=float(setup.schedule(step - 1)),
                               wall_time_s=elapsed_before + time.time() - t_train)
                    log.write(rec)
                    bar.set_postfix(**postfix)
                if eval_every and step % eval_every == 0 and step != total_steps:
                    run_eval(state, step)
                if step % ckpt_every == 0 or step == total_steps:
                    check(state, step)
                    ckpt.save(step, state)
                if step >= total_steps:
                    break
        check(state, step)
    except KeyboardInterrupt:
        raise TrainingInterrupted(step, ckpt.latest_step()) from None
    except OSError as e:  # the metrics log or a checkpoint hit a full disk
        if isinstance(e, NoSpaceLeft) or not _is_no_space(e):
            raise
        raise NoSpaceLeft(f"no space left on {ckpt.workdir} at step {step}. {_kept(ckpt.latest_step())}") from None
    return state, step, elapsed_before + time.time() - t_train


# Keys a rerun may change without changing what is trained: logging, evaluation and checkpoint cadence, the
# progress bar, where the same dataset is read from (a run moved to another machine), and the sections only other
# commands read.
RERUN_NEUTRAL_KEYS = ("train.progress", "train.log_every", "train.eval_every", "train.eval_batch_size",
                      "train.checkpoint_every", "train.keep_checkpoints", "data.data_dir", "data.download",
                      "measure", "sweep", "compare")
# Keys ``extend=True`` (``lcnn-jax train --extend``) lets a rerun change: the run's length.
EXTEND_KEYS = ("train.num_epochs", "train.num_steps")
_UNSET = "(unset)"


def check_workdir_path(workdir: str) -> None:
    """Raise :class:`RunDirError` when ``workdir`` exists but is not a directory (e.g. a results file given by
    mistake), before anything is loaded or written."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise RunDirError(f"--workdir {workdir!r} is a file, not a directory. Give the path of a directory (it is "
                          f"created if missing), e.g. --workdir runs/my_run.")
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunDirError(f"--workdir {workdir!r} lies under {parent!r}, which is a file; give a directory path "
                          f"that can be created, e.g. --workdir runs/my_run.")


def _flatten_config(node, prefix: str = "") -> dict:
    """``{"a.b.c": value}`` of a nested config dict; an empty mapping is a value of its own (a regularizer with no
    settings still differs from no regularizer)."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(_flatten_config(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def config_differences(old: dict, new: dict, defaults: dict | None = None) -> dict[str, tuple]:
    """``{key: (old value, new value)}`` for every leaf where two config dicts differ (tuples and lists compare
    equal, as JSON stores both as lists). A key absent from ``old`` whose new value is its default in
    ``defaults`` is no difference: that is how a config written before the key existed reads."""
    def norm(d):
        return _flatten_config(json.loads(json.dumps(d, default=_json_default)))

    a, b, dflt = norm(old), norm(new), norm(defaults or {})
    out = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _UNSET), b.get(key, _UNSET)
        if va == vb or (va is _UNSET and key in dflt and dflt[key] == vb):
            continue
        if {_show(va), _show(vb)} == {_UNSET, "{}"}:  # an empty section that gained keys: those keys say it
            continue
        out[key] = (va, vb)
    return out


def _is_under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def checkpoint_steps(workdir: str) -> list[int]:
    """The step numbers of the finished checkpoint folders in ``workdir/checkpoints`` (read from the folder names,
    without opening anything), ascending."""
    try:
        names = os.listdir(os.path.join(workdir, "checkpoints"))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(n) for n in names if n.isdigit())


def check_run_dir(config, workdir: str, *, extend: bool = False, kind: str = "run") -> dict[str, tuple]:
    """Check, before anything is written, that ``config`` may train in ``workdir``; return the accepted changes.

    A workdir that already holds checkpoints belongs to the config in its ``config.json``. Rerunning resumes it
    only when the two agree up to :data:`RERUN_NEUTRAL_KEYS` (logging and checkpoint cadence); with ``extend``,
    the run's length (:data:`EXTEND_KEYS`) may change too. Anything else would silently continue, or overwrite,
    a run under another config, so it is refused. ``kind`` is ``"run"`` (:func:`fit`) or ``"sweep"``.

    Raises:
      RunDirError: ``workdir`` is a file, holds the other kind of run, or holds a run of a different config (the
        message lists the differing keys, old -> new, and the fix).
    """
    from lcnn_jax.configs import default_config

    check_workdir_path(workdir)
    if not checkpoint_steps(workdir):
        return {}  # nothing trained yet: nothing to protect or resume
    has_sweep = os.path.exists(os.path.join(workdir, "sweep.json"))
    if kind == "run" and has_sweep:
        raise RunDirError(f"--workdir {workdir!r} holds a vectorized sweep (sweep.json), not a single run; nothing "
                          f"was changed. Train this config in a new --workdir.")
    if kind == "sweep" and not has_sweep:
        raise RunDirError(f"--workdir {workdir!r} holds a single training run, not a sweep; nothing was changed. "
                          f"Run the sweep in a new --workdir.")
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as fh:
            old = json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise RunDirError(f"--workdir {workdir!r} holds checkpoints but its config.json cannot be read "
                          f"({_short_error(e)}), so it is unknown which config they belong to; nothing was "
                          f"changed. Use a new --workdir.") from None
    diffs = config_differences(old, config.to_dict(), default_config().to_dict())
    diffs = {k: v for k, v in diffs.items() if not _is_under(k, RERUN_NEUTRAL_KEYS)}
    refused = {k: v for k, v in diffs.items() if not (extend and _is_under(k, EXTEND_KEYS))}
    if refused:
        listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
        length_only = all(_is_under(k, EXTEND_KEYS) for k in refused)
        fix = ("To train this run further under the new length, rerun with --extend (fit(..., extend=True)); to "
               "train the new config from scratch, use a new --workdir." if length_only else
               f"To train the new config, use a new --workdir; to resume or re-measure the old run, use its own "
               f"config ({path}).")
        raise RunDirError(f"--workdir {workdir!r} already holds a {kind} trained with a different config: "
                          f"{listed}. Nothing was changed (config.json and the checkpoints are as they were). {fix}")
    return diffs


def _show(v) -> str:
    return v if v is _UNSET else json.dumps(v)


def _resume_state(ckpt: Checkpointer, state, mesh: Mesh):
    """The newest intact checkpoint (damaged ones moved aside with a warning) or ``state`` itself, replicated on
    ``mesh``, and the restored step (None: fresh start)."""
    state = replicate(state, mesh)  # orbax restores into the template's sharding (every process its part)
    restored, step = ckpt.restore_newest_intact(state, quarantine=True)
    return (state if restored is None else restored), step


def fit(config, workdir: str, *, extend: bool = False) -> dict:
    """Train the model described by ``config`` and write everything to ``workdir``.

    Files: ``config.json`` (resolved config), ``metrics.jsonl`` (every ``train.log_every`` steps: step, loss,
    accuracy, grad_norm, learning_rate, wall_time_s, regularizer metrics; and ``eval/...`` records),
    ``checkpoints/`` (orbax, every ``train.checkpoint_every`` steps and at the end) and ``results.json``.

    Rerunning with the same ``workdir`` resumes from the newest intact checkpoint (a damaged one is moved to
    ``damaged_checkpoints/`` with a warning; half a line at the end of ``metrics.jsonl`` is dropped) and ends with
    the same metrics as an uninterrupted run. A rerun with a different config is refused before anything is
    written (:func:`check_run_dir`); ``extend=True`` accepts a longer ``train.num_epochs`` / ``train.num_steps``
    and trains on from the last checkpoint, under the learning-rate schedule of the new length (so a cosine
    schedule jumps back up: the result is not that of a run trained for the new length from the start).

    ``results.json`` has ``dead: true`` with a ``warning`` (also logged, and in the last eval record of the log)
    when the trained network gives one output for every input or one class for 99 % of the training images
    (:func:`dead_network`): a failure that does not show up as a NaN. Returns the results.

    Raises:
      ConfigError: a bad configuration value (message names the key).
      RunDirError: ``workdir`` is a file, or holds a run of another config, or no readable checkpoint.
      lcnn_jax.data.DatasetError: the dataset cannot be found.
      TrainingDiverged: the loss became non-finite (the last good checkpoint stays in ``workdir``).
      TrainingInterrupted: Ctrl-C (a ``KeyboardInterrupt``); rerunning resumes.
      NoSpaceLeft: the disk is full (an ``OSError``); the last complete checkpoint is kept, rerunning resumes.
    """
    from lcnn_jax import data as data_lib
    from lcnn_jax.configs import validate_config

    t_start = time.time()
    validate_config(config)
    changes = check_run_dir(config, workdir, extend=extend)
    setup = prepare_run(config)
    done = checkpoint_steps(workdir)
    if done and done[-1] > setup.total_steps:
        raise RunDirError(f"--workdir {workdir!r} holds a checkpoint of step {done[-1]}, past the "
                          f"{setup.total_steps} steps this config trains; nothing was changed. Extending needs "
                          f"more steps (train.num_epochs / train.num_steps), or use a new --workdir.")
    os.makedirs(workdir, exist_ok=True)
    tcfg, mesh, train, test = config.train, setup.mesh, setup.train, setup.test
    primary = is_primary()

    state = create_train_state(setup.model, setup.tx, setup.regularizers, jax.random.PRNGKey(int(config.seed)),
                               setup.sample)
    ckpt = Checkpointer(workdir, max_to_keep=int(tcfg.get("keep_checkpoints", 2)))
    try:
        state, start_step = _resume_state(ckpt, state, mesh)
    except BaseException:
        ckpt.close()
        raise
    if primary:
        write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    start = int(state.step)
    if changes:
        _log.warning("extending the run in %s from step %d: %s.", workdir, start,
                     ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items()))
    log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), resume_step=start if start_step is not None else None,
                     write=primary)

    train_step = jit_train_step(setup.step_fn, mesh)
    eval_step = jit_eval_step(setup.eval_fn, mesh)
    ev_bs = int(tcfg.get("eval_batch_size", 500))

    batch_sharding = NamedSharding(mesh, P("data"))

    def epoch_batches(epoch, start_batch):  # every process draws the global batch and places its devices' part
        for b in data_lib.batches(train, setup.batch_size, seed=int(config.seed), epoch=epoch, shuffle=True,
                                  drop_remainder=True, start_batch=start_batch):
            yield place_global(b, batch_sharding)

    def run_eval(st, step, extra=None):
        res, spread = {}, {}
        for name, split in (("train", train), ("test", test)):
            r = evaluate(st, eval_step, split.images, split.labels, batch_size=ev_bs, mesh=mesh)
            res.update({f"{name}_accuracy": r["accuracy"], f"{name}_loss": r["loss"]})
            spread[name] = (r["logit_spread"], r["logit_scale"], r["pred_counts"])
        dead = extra(res, spread) if extra else {}
        log.write({"step": step, "kind": "eval", **res, **dead})
        return {**res, **dead}

    def check_finite(st, step):
        bad = int(st.diverged_at)
        if bad >= 0:
            last = ckpt.latest_step()
            raise TrainingDiverged(
                f"The training loss became NaN/inf at step {bad}. Training stopped; the last good checkpoint "
                f"(step {last}) is kept in {os.path.join(workdir, 'checkpoints')}. Lower optim.learning_rate, "
                f"the regularizer coefficients, or clip gradients (optim.clip_grad_norm=1.0), then rerun in a "
                f"fresh --workdir.")

    def summarize(metrics):
        rec = {k: float(v) for k, v in jax.device_get(metrics).items()}
        return rec, {"loss": f"{rec['loss']:.3f}", "acc": f"{rec['accuracy']:.3f}"}

    def epoch_end(st, epoch):
        return _epoch_end(st, setup.regularizers, setup.steps_per_epoch, epoch, mesh)

    elapsed_before = _previous_wall_time(workdir) if start else 0.0
    bar = _progress(setup.total_steps, start, bool(tcfg.get("progress", True)) and primary)
    try:
        state, step, train_time = _train_loop(
            state, setup=setup, tcfg=tcfg, start=start, epoch_batches=epoch_batches, train_step=train_step,
            epoch_end=epoch_end, check=check_finite, summarize=summarize, run_eval=run_eval, ckpt=ckpt, log=log,
            bar=bar, elapsed_before=elapsed_before)
    finally:
        bar.close()
        ckpt.close()

    def health(res, spread):  # the final evaluation also says whether the network is dead
        report = dead_network_report(*spread["train"], train_accuracy=res["train_accuracy"],
                                     num_classes=setup.info.num_classes,
                                     learning_rate=float(config.optim.learning_rate))
        if report["dead"]:
            _log.warning("%s", report["warning"])
        return report

    try:
        final = run_eval(state, step, extra=health)
        results = {**final, "steps": step, "epochs": step / setup.steps_per_epoch, "wall_time_s": train_time,
                   "total_time_s": time.time() - t_start, "num_devices": int(mesh.devices.size),
                   "num_processes": int(jax.process_count()),
                   "num_train": len(train.images), "num_test": len(test.images),
                   "devices": str(jax.devices()[0].platform), "config": config.to_dict()}
        if changes:
            results["extended_from_step"] = start
        if primary:
            write_json_atomic(os.path.join(workdir, "results.json"), results)
    except KeyboardInterrupt:
        raise TrainingInterrupted(step, step) from None
    except OSError as e:
        if not _is_no_space(e):
            raise
        raise NoSpaceLeft(f"no space left on {os.path.abspath(workdir)} while writing the results of step {step}; "
                          f"the final checkpoint is kept: free some space and rerun the same command to write "
                          f"them.") from None
    return results


def dead_network_report(logit_spread: float, logit_scale: float, pred_counts, *, train_accuracy: float,
                        num_classes: int, learning_rate: float | None = None) -> dict:
    """``{"dead": bool, "logit_spread": float}`` for the final evaluation on the training set, plus, for a dead
    network (:func:`dead_network`), ``"dead_reason"`` (what was seen, one clause) and ``"warning"``: one paragraph
    for the log and ``results.json`` saying what was seen, why the smoothness measures of this network mislead,
    and what to change."""
    dead = dead_network(logit_spread, logit_scale, pred_counts)
    out = {"dead": bool(dead), "logit_spread": float(logit_spread)}
    if dead:
        counts = np.asarray(pred_counts, np.float64)
        if logit_spread <= DEAD_SPREAD_RTOL * max(logit_scale, 1.0):
            seen = f"gives the same output for every training image (logit spread {logit_spread:.3g})"
        else:
            seen = (f"predicts class {int(counts.argmax())} for {100 * counts.max() / counts.sum():.1f} % of the "
                    f"training images")
        lr = f" (it was {learning_rate:g})" if learning_rate is not None else ""
        out["dead_reason"] = f"the model {seen}"
        out["warning"] = (
            f"dead network: the trained model {seen}, so its training accuracy {train_accuracy:.3f} is that of one "
            f"constant guess (chance is {1.0 / num_classes:.3f}). The loss did not become NaN, but training failed: "
            f"its input gradients are 0 wherever the output is constant, so Jacobian, curvature and Lipschitz "
            f"values near 0 describe a constant function, not a smooth one. Lower optim.learning_rate{lr} or set "
            f"optim.clip_grad_norm, and train again in a new --workdir.")
    return out


def apply_epoch_end_hooks(reg_state: tuple, regularizers: Sequence[Regularizer], accuracy: Array,
                          epoch: int) -> tuple:
    """One run's regularizer states after their ``epoch_end(state, accuracy, epoch)`` hooks (identity where a
    regularizer has none)."""
    return tuple(r.epoch_end(s, accuracy, epoch) if r.epoch_end is not None else s
                 for r, s in zip(regularizers, reg_state))


def _epoch_end(state: TrainState, regularizers: Sequence[Regularizer], steps_per_epoch: int, epoch: int,
               mesh: Mesh) -> TrainState:
    """Run the regularizers' ``epoch_end`` hooks with the epoch's mean batch training accuracy, then reset the
    accumulator. Both live in the (checkpointed) state, so a resumed run takes the same decisions."""
    if not any(r.epoch_end is not None for r in regularizers):
        return state.replace(epoch_accuracy_sum=replicate(np.zeros((), np.float32), mesh))
    # On the host (every process computes the same values), so the hooks never mix arrays of one process's
    # devices with arrays spanning all processes.
    reg_state, acc_sum = to_host((state.reg_state, state.epoch_accuracy_sum))
    acc = jnp.asarray(acc_sum) / steps_per_epoch
    reg_state = apply_epoch_end_hooks(jax.tree.map(jnp.asarray, reg_state), regularizers, acc, epoch)
    return state.replace(reg_state=replicate(reg_state, mesh),
                         epoch_accuracy_sum=replicate(np.zeros((), np.float32), mesh))


def _previous_wall_time(workdir: str) -> float:
    """Training wall time already spent before an interruption (from the log), so results report the total."""
    try:
        recs = [r for r in read_metrics_log(workdir) if "wall_time_s" in r]
    except FileNotFoundError:
        return 0.0
    return float(recs[-1]["wall_time_s"]) if recs else 0.0


def read_config(workdir: str):
    """The resolved ``config.json`` of a run (or sweep) in ``workdir`` as a ``ConfigDict``."""
    import ml_collections

    check_workdir_path(workdir)
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No trained run in {workdir!r} (config.json missing): run `lcnn-jax train "
                                f"--config ... --workdir {workdir}` first.")
    try:
        with open(path) as fh:
            return ml_collections.ConfigDict(json.load(fh))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); the run's config cannot be read. Restore it from the "
                          f"config file the run was trained with, or train again in a new --workdir.") from None


def template_state(config, *, key: PRNGKey | None = None):
    """``(model, state, dataset_info)``: a freshly initialised train state with the structure of ``config``'s run
    (what a checkpoint is restored into), built from a one-example dummy batch without loading data."""
    from lcnn_jax import data as data_lib
    from lcnn_jax.nn import is_builtin_model, make_model, mode_kwargs

    info = data_lib.dataset_info(config.data.name)
    name = config.model.name
    try:
        model = make_model(name, info.num_classes, **dict(config.model.get("kwargs", {}) or {}))
    except ValueError as e:
        hint = ("" if is_builtin_model(name) or ":" in str(name) else
                f" A model registered with lcnn_jax.nn.register_model exists only in the process that registered "
                f"it: register {name!r} again before loading this run from Python, or train with an import path "
                f"(model.name='my_package.models:Net' or 'path/to/models.py:Net') that any process, e.g. "
                f"`lcnn-jax measure`, can resolve.")
        raise ConfigError(f"The run's model cannot be rebuilt: {e}{hint}") from None
    regularizers = build_regularizers(config.get("regularizers"), info)
    shape = (1,) + tuple(info.image_shape)
    sample = {"image": np.zeros(shape, np.float32), "label": np.zeros((1,), np.int32)}
    key = jax.random.PRNGKey(int(config.seed)) if key is None else key
    eval_kw = mode_kwargs(model, train=False)
    abstract_params = jax.eval_shape(lambda k: model.init(k, jnp.asarray(sample["image"]), **eval_kw), key)["params"]
    tx, _ = make_optimizer(config.optim, 1, abstract_params)
    return model, create_train_state(model, tx, regularizers, key, sample), info


def restore_latest(workdir: str, template: PyTree, what: str = "run") -> PyTree:
    """The newest intact checkpoint of ``workdir`` restored into the structure of ``template``; a damaged newer
    one is skipped with a warning (and left in place: reading never changes a run directory).

    Raises:
      FileNotFoundError: ``workdir`` has no checkpoint.
      RunDirError: checkpoints exist but none can be read, or they hold another network than ``template``.
    """
    check_workdir_path(workdir)
    if not checkpoint_steps(workdir):
        raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: the {what} never saved one.")
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        state, _ = ckpt.restore_newest_intact(template)
        if state is None:
            raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: the {what} never saved one.")
        return state
    finally:
        ckpt.close()


def load_trained(workdir: str):
    """Rebuild ``(config, model, state, dataset_info)`` from a finished or interrupted run's ``workdir``
    (the latest checkpoint), for measurement."""
    config = read_config(workdir)
    model, state, info = template_state(config)
    return config, model, restore_latest(workdir, state), info


def read_results(workdir: str) -> dict | None:
    """``workdir/results.json`` of a finished run, or None (unfinished run, or an unreadable file)."""
    try:
        with open(os.path.join(workdir, "results.json")) as fh:
            out = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    return out if isinstance(out, dict) else None
