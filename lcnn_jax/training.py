"""Training: the train state, a data-parallel jitted step, evaluation, and a resumable fit loop.

The step minimises ``mean CE + sum_r reg_r.loss(...)`` (see :mod:`lcnn_jax.regularizers.base`).

Data parallelism uses ``jax.jit`` over a one-axis :class:`jax.sharding.Mesh` named ``"data"`` with every local
device: the batch is sharded along its leading axis, the train state is replicated, and XLA inserts the
gradient all-reduce. The same code runs on one CPU, on ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
simulated devices, or on 8 GPUs. On several hosts, call :func:`maybe_initialize_distributed` first; each host then
feeds its own slice of every global batch.

Example::

    from lcnn_jax import training
    from experiments.configs import quickstart
    results = training.fit(quickstart.get_config(), workdir="/tmp/run")
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcnn_jax.regularizers.base import Regularizer
from lcnn_jax.types import Array, Batch, PRNGKey, PyTree


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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
        return optax.adamw(sched, weight_decay=wd, mask=mask), sched
    else:
        raise ConfigError(f"optim.name={name!r} is unknown; use 'sgd', 'adam' or 'adamw'.")
    if wd > 0:
        core = optax.chain(optax.add_decayed_weights(wd, mask), core)
    return core, sched


# ----------------------------------------------------------------------------------------------------------
# State, step and evaluation


def create_train_state(model, tx: optax.GradientTransformation, regularizers: Sequence[Regularizer],
                       key: PRNGKey, sample_batch: Batch) -> TrainState:
    """Initialise model variables, optimizer and regularizer states from one (host-local) sample batch."""
    k_init, k_reg, k_rng = jax.random.split(key, 3)
    variables = model.init(k_init, jnp.asarray(sample_batch["image"]), train=False)
    variables = dict(variables)
    params = variables.pop("params")
    reg_keys = jax.random.split(k_reg, max(len(regularizers), 1))
    reg_state = tuple(r.init(k, params, sample_batch) for r, k in zip(regularizers, reg_keys))
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, model_state=variables,
                             reg_state=reg_state, rng=k_rng, diverged_at=jnp.asarray(-1, jnp.int32),
                             epoch_accuracy_sum=jnp.zeros((), jnp.float32))


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(model, regularizers: Sequence[Regularizer]) -> Callable[[TrainState, Batch], tuple]:
    """Return ``step(state, batch) -> (state, metrics)``, pure and jittable (not yet jitted).

    Metrics: ``loss`` (total), ``ce``, ``accuracy``, ``grad_norm`` and every regularizer's own metrics,
    prefixed by its name. A non-finite loss freezes the state and records the step in ``diverged_at``.
    """
    regularizers = tuple(regularizers)

    def loss_fn(params, state: TrainState, batch: Batch, key: PRNGKey):
        mutable = list(state.model_state.keys())
        variables = {"params": params, **state.model_state}
        logits, new_model_state = model.apply(variables, batch["image"], train=True, mutable=mutable)
        ce = cross_entropy(logits, batch["label"])

        def apply_fn(p, xs):  # the model in training mode; mutated collections are discarded
            return model.apply({"params": p, **state.model_state}, xs, train=True, mutable=mutable)[0]

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
    """Return ``eval_step(state, batch) -> {"loss_sum", "correct", "count"}`` in eval mode; ``batch["mask"]``
    (1 for real examples, 0 for padding) lets the last, partial batch be padded to a fixed shape."""

    def eval_step(state: TrainState, batch: Batch):
        logits = model.apply({"params": state.params, **state.model_state}, batch["image"], train=False)
        mask = batch["mask"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {"loss_sum": jnp.sum(ce * mask),
                "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
                "count": jnp.sum(mask)}

    return eval_step


# ----------------------------------------------------------------------------------------------------------
# Sharding


def maybe_initialize_distributed() -> None:
    """Call ``jax.distributed.initialize()`` when the environment describes a multi-host job.

    Recognised: ``JAX_COORDINATOR_ADDRESS`` (explicit), or a cluster JAX auto-detects (SLURM with several tasks,
    Cloud TPU pods) when ``LCNN_JAX_DISTRIBUTED=1``. Single-host runs do nothing.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("LCNN_JAX_DISTRIBUTED") == "1":
        if not jax.distributed.is_initialized():
            jax.distributed.initialize()


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh ``("data",)`` over ``devices`` (default: all devices of all hosts)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), ("data",))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a host-local batch (numpy) on the mesh, sharded along the leading axis.

    On several hosts each passes its own slice; the global array is assembled by
    ``jax.make_array_from_process_local_data``.
    """
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place every leaf of ``tree`` on all devices of ``mesh`` (replicated)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def jit_train_step(step_fn, mesh: Mesh):
    """``jax.jit`` the step with a replicated state (donated) and a batch sharded on the ``data`` axis."""
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(step_fn, in_shardings=(rep, dat), out_shardings=(rep, rep), donate_argnums=(0,))


def evaluation_totals(eval_batch: Callable[[dict], dict], images: np.ndarray, labels: np.ndarray, *,
                      batch_size: int) -> dict:
    """Sum ``eval_batch(batch)`` (``{"loss_sum", "correct", "count"}``) over a whole split in batches of
    ``batch_size``; the last batch is padded to that size and masked (``batch["mask"]``), so one compiled shape
    serves every batch. Returns float64 NumPy totals of whatever shape ``eval_batch`` returns (scalars for one
    model, ``(K,)`` for a vmapped sweep of K members)."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        pad = batch_size - len(x)
        mask = np.concatenate([np.ones(len(x), np.float32), np.zeros(pad, np.float32)])
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
        out = jax.device_get(eval_batch({"image": x, "label": y, "mask": mask}))
        for k in totals:
            totals[k] = totals[k] + np.asarray(out[k], np.float64)
    return totals


def evaluate(state: TrainState, eval_step, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
             mesh: Mesh) -> dict:
    """Accuracy and mean cross-entropy over a whole split; the last batch is padded and masked."""
    n_dev = mesh.devices.size
    batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
    totals = evaluation_totals(lambda b: eval_step(state, shard_batch(b, mesh)), images, labels,
                               batch_size=batch_size)
    n = max(float(totals["count"]), 1.0)
    return {"accuracy": float(totals["correct"]) / n, "loss": float(totals["loss_sum"]) / n,
            "count": int(totals["count"])}


def jit_eval_step(eval_fn, mesh: Mesh):
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(eval_fn, in_shardings=(rep, dat), out_shardings=rep)


# ----------------------------------------------------------------------------------------------------------
# Files


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, ``fsync`` and ``os.replace``, so a
    reader (or a crash) sees the whole new file or the previous one, never half of one. Newlines are written as
    given. Every result file of the library and the experiment scripts goes through here."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    """``obj`` as indented JSON with sorted keys (numpy / jax values as lists), written by :func:`write_text_atomic`.
    Nothing is written when ``obj`` cannot be serialised."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def write_csv_atomic(path: str, fieldnames: Sequence[str], rows: Iterable[dict], *,
                     extrasaction: str = "raise") -> None:
    """The dict ``rows`` as CSV under the header ``fieldnames`` (missing keys empty; a key outside the header
    raises ``ValueError`` unless ``extrasaction="ignore"``), written by :func:`write_text_atomic`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction=extrasaction)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _json_default(o):
    if isinstance(o, (np.generic, jax.Array)):
        return np.asarray(o).tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


class MetricsLog:
    """Append-only JSON-lines log (``metrics.jsonl``); on resume, records after the restored step are dropped
    so the log of a resumed run reads like the log of an uninterrupted one."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if os.path.exists(path):
            keep = []
            if resume_step is not None:
                with open(path) as fh:
                    keep = [l for l in fh if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")


def read_metrics_log(workdir: str) -> list[dict]:
    """All records of ``workdir/metrics.jsonl``."""
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [json.loads(l) for l in fh if l.strip()]


class Checkpointer:
    """Thin wrapper over an orbax ``CheckpointManager`` in ``workdir/checkpoints`` (synchronous saves, so a
    checkpoint on disk is complete before training goes on; orbax writes each step to a temporary directory and
    renames it, so an interruption never leaves a half checkpoint)."""

    def __init__(self, workdir: str, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState) -> None:
        self.manager.save(int(step), args=self._ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()

    def restore(self, state_like: TrainState, step: int | None = None) -> TrainState:
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, state_like)
        return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()


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


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """Everything a training run builds from its config before the first step (shared by :func:`fit` and
    :func:`lcnn_jax.sweep.fit_sweep`, so a sweep member is set up exactly like a single run).

    Attributes:
      info, train, test: the dataset description and its (possibly subset) splits, in host memory.
      model, regularizers, tx, schedule: the Flax model, the regularizer list, the optax optimizer and its schedule.
      mesh: the one-axis ``("data",)`` mesh over every device.
      batch_size, local_bs: the global batch and this host's slice of it.
      steps_per_epoch, total_steps: the loop's length (``train.num_steps`` or ``num_epochs * steps_per_epoch``).
      sample: a host-local batch for initialisation.
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
    sample = {"image": train.images[:local_bs], "label": train.labels[:local_bs]}
    abstract_params = jax.eval_shape(
        lambda k: model.init(k, jnp.asarray(sample["image"]), train=False), jax.random.PRNGKey(0))["params"]
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


def _train_loop(state, *, setup: RunSetup, tcfg, start: int, epoch_batches, train_step, epoch_end, check,
                summarize, run_eval, ckpt, log, bar, elapsed_before: float):
    """The resumable loop shared by :func:`fit` and :func:`lcnn_jax.sweep.fit_sweep`, from step ``start`` to
    ``setup.total_steps``.

    The caller supplies what differs between one run and a stacked sweep:
    ``epoch_batches(epoch, start_batch)`` yields device batches; ``train_step(state, batch) -> (state, metrics)``;
    ``epoch_end(state, epoch) -> state`` (regularizer hooks); ``check(state, step)`` (a single run raises on
    divergence, a sweep only notes it); ``summarize(metrics) -> (record, progress_postfix)``;
    ``run_eval(state, step)``. Returns ``(state, step, train_wall_time_s)``.
    """
    spe, total_steps = setup.steps_per_epoch, setup.total_steps
    log_every = int(tcfg.get("log_every", 50))
    eval_every = int(tcfg.get("eval_every", 0) or 0)
    ckpt_every = int(tcfg.get("checkpoint_every", 500))
    t_train = time.time()
    step = start
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
    return state, step, elapsed_before + time.time() - t_train


def fit(config, workdir: str) -> dict:
    """Train the model described by ``config`` and write everything to ``workdir``.

    Files: ``config.json`` (resolved config), ``metrics.jsonl`` (every ``train.log_every`` steps: step, loss,
    accuracy, grad_norm, learning_rate, wall_time_s, regularizer metrics; and ``eval/...`` records),
    ``checkpoints/`` (orbax, every ``train.checkpoint_every`` steps and at the end) and ``results.json``.

    Rerunning with the same ``workdir`` resumes from the last checkpoint and ends with the same metrics as an
    uninterrupted run. Returns the results dict.

    Raises:
      ConfigError: a bad configuration value (message names the key).
      lcnn_jax.data.DatasetError: the dataset cannot be found.
      TrainingDiverged: the loss became non-finite (the last good checkpoint stays in ``workdir``).
    """
    from lcnn_jax import data as data_lib
    from lcnn_jax.configs import validate_config

    t_start = time.time()
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    setup = prepare_run(config)
    tcfg, mesh, train, test = config.train, setup.mesh, setup.train, setup.test
    pid, local_bs = jax.process_index(), setup.local_bs

    state = create_train_state(setup.model, setup.tx, setup.regularizers, jax.random.PRNGKey(int(config.seed)),
                               setup.sample)
    ckpt = Checkpointer(workdir, max_to_keep=int(tcfg.get("keep_checkpoints", 2)))
    start_step = ckpt.latest_step()
    if start_step is not None:
        state = ckpt.restore(state, start_step)
    state = replicate(state, mesh)
    start = int(state.step)
    log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), resume_step=start if start_step is not None else None)

    train_step = jit_train_step(setup.step_fn, mesh)
    eval_step = jit_eval_step(setup.eval_fn, mesh)
    ev_bs = int(tcfg.get("eval_batch_size", 500))

    def epoch_batches(epoch, start_batch):
        for b in data_lib.batches(train, setup.batch_size, seed=int(config.seed), epoch=epoch, shuffle=True,
                                  drop_remainder=True, start_batch=start_batch):
            yield shard_batch({k: v[pid * local_bs:(pid + 1) * local_bs] for k, v in b.items()}, mesh)

    def run_eval(st, step):
        res = {}
        for name, split in (("train", train), ("test", test)):
            r = evaluate(st, eval_step, split.images, split.labels, batch_size=ev_bs, mesh=mesh)
            res.update({f"{name}_accuracy": r["accuracy"], f"{name}_loss": r["loss"]})
        log.write({"step": step, "kind": "eval", **res})
        return res

    def check_finite(st, step):
        bad = int(st.diverged_at)
        if bad >= 0:
            last = ckpt.latest_step()
            raise TrainingDiverged(
                f"The training loss became NaN/inf at step {bad}. Training stopped; the last good checkpoint "
                f"(step {last}) is kept in {os.path.join(workdir, 'checkpoints')}. Lower optim.learning_rate, "
                f"the regularizer coefficients, or use gradient clipping, then rerun in a fresh --workdir.")

    def summarize(metrics):
        rec = {k: float(v) for k, v in jax.device_get(metrics).items()}
        return rec, {"loss": f"{rec['loss']:.3f}", "acc": f"{rec['accuracy']:.3f}"}

    def epoch_end(st, epoch):
        return _epoch_end(st, setup.regularizers, setup.steps_per_epoch, epoch, mesh)

    elapsed_before = _previous_wall_time(workdir) if start else 0.0
    bar = _progress(setup.total_steps, start, bool(tcfg.get("progress", True)) and pid == 0)
    try:
        state, step, train_time = _train_loop(
            state, setup=setup, tcfg=tcfg, start=start, epoch_batches=epoch_batches, train_step=train_step,
            epoch_end=epoch_end, check=check_finite, summarize=summarize, run_eval=run_eval, ckpt=ckpt, log=log,
            bar=bar, elapsed_before=elapsed_before)
    finally:
        bar.close()
        ckpt.close()
    final = run_eval(state, step)
    results = {**final, "steps": step, "epochs": step / setup.steps_per_epoch, "wall_time_s": train_time,
               "total_time_s": time.time() - t_start, "num_devices": int(mesh.devices.size),
               "num_train": len(train.images), "num_test": len(test.images),
               "devices": str(jax.devices()[0].platform), "config": config.to_dict()}
    if pid == 0:
        write_json_atomic(os.path.join(workdir, "results.json"), results)
    return results


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
    acc = state.epoch_accuracy_sum / steps_per_epoch
    reg_state = apply_epoch_end_hooks(state.reg_state, regularizers, acc, epoch)
    return state.replace(reg_state=replicate(reg_state, mesh),
                         epoch_accuracy_sum=replicate(jnp.zeros((), jnp.float32), mesh))


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

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No trained run in {workdir!r} (config.json missing): run `lcnn-jax train "
                                f"--config ... --workdir {workdir}` first.")
    with open(path) as fh:
        return ml_collections.ConfigDict(json.load(fh))


def template_state(config, *, key: PRNGKey | None = None):
    """``(model, state, dataset_info)``: a freshly initialised train state with the structure of ``config``'s run
    (what a checkpoint is restored into), built from a one-example dummy batch without loading data."""
    from lcnn_jax import data as data_lib
    from lcnn_jax.nn import make_model

    info = data_lib.dataset_info(config.data.name)
    model = make_model(config.model.name, info.num_classes, **dict(config.model.get("kwargs", {}) or {}))
    regularizers = build_regularizers(config.get("regularizers"), info)
    shape = (1,) + tuple(info.image_shape)
    sample = {"image": np.zeros(shape, np.float32), "label": np.zeros((1,), np.int32)}
    key = jax.random.PRNGKey(int(config.seed)) if key is None else key
    abstract_params = jax.eval_shape(lambda k: model.init(k, jnp.asarray(sample["image"]), train=False), key)["params"]
    tx, _ = make_optimizer(config.optim, 1, abstract_params)
    return model, create_train_state(model, tx, regularizers, key, sample), info


def restore_latest(workdir: str, template: PyTree, what: str = "run") -> PyTree:
    """The latest checkpoint of ``workdir`` restored into the structure of ``template``."""
    ckpt = Checkpointer(workdir)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: the {what} never saved one.")
        return ckpt.restore(template)
    finally:
        ckpt.close()


def load_trained(workdir: str):
    """Rebuild ``(config, model, state, dataset_info)`` from a finished or interrupted run's ``workdir``
    (the latest checkpoint), for measurement."""
    config = read_config(workdir)
    model, state, info = template_state(config)
    return config, model, restore_latest(workdir, state), info
