"""The train state, the optimizer and the pure (not yet jitted) train and eval steps.

The step minimises ``mean CE + sum_r reg_r.loss(...)`` (see :mod:`lcnn_jax.regularizers.base`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from lcnn_jax.errors import ConfigError
from lcnn_jax.regularizers.base import Regularizer
from lcnn_jax.types import Array, Batch, PRNGKey, PyTree

__all__ = ["TrainState", "weight_decay_mask", "make_schedule", "make_optimizer", "create_train_state",
           "cross_entropy", "DROPOUT_STREAM", "make_train_step", "make_eval_step"]


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
