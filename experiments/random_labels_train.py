"""Training and measurement for ``experiments/random_labels.py``: the study's two training protocols on the
library's member machinery, and the per-run measures.

The trials of one program are members of ONE stacked :class:`~lcnn_jax.train.TrainState`
(:func:`lcnn_jax.train.stack_states`; member ``i`` is :func:`lcnn_jax.train.member_state`), every step maps over
them with :func:`lcnn_jax.train.map_members`, and ``vmap`` or the unrolled member loop is chosen by
:func:`lcnn_jax.train.resolve_member_loop` (``auto``: unrolled for a convolutional net on CPU). What stays here is
what is particular to the study: each member trains on its own labels, a chunk of steps is one ``lax.scan`` over
index arrays into the resident training set, and the two stopping rules --

* ours (:func:`train_group`): stop a member at the first check where it fits its whole training set (frozen from
  then on: ``done`` members keep their state), or at ``max_steps``;
* the reference's (:func:`train_fixed_budget`): a fixed budget of steps with the reference's optimizer
  (:func:`reference_optimizer`), epochs cut like ``torch.split`` (:func:`epoch_batches`), the training loss and
  accuracy recorded every ``eval_every`` steps.
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from lcnn_jax import loops
from lcnn_jax import train as training
from lcnn_jax.measures import (hessian_top_eigenvalues, hessian_trace, layer_hessian_traces, layer_order,
                               minimum_sharpness_from_traces, normalized_sharpness_from_diagonal)
from lcnn_jax.train import TrainState


# ------------------------------------------------------------------------------------------------ host metrics
def accuracy(logits, labels) -> float:
    """Fraction of rows whose argmax equals the label."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits (N, K) and labels (N,); got {logits.shape} and {labels.shape}.")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def generalization_gap(train_logits, train_labels, test_logits, test_labels) -> dict:
    """``train_acc - test_acc``; train accuracy on the labels the network was trained on."""
    train_acc = accuracy(train_logits, train_labels)
    test_acc = accuracy(test_logits, test_labels)
    return {"train_acc": train_acc, "test_acc": test_acc, "gap": train_acc - test_acc}


def mean_cross_entropy(logits, labels) -> float:
    """Mean softmax cross-entropy in float64 (numpy), e.g. the final training loss of a run."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(z)), np.asarray(labels)]))


# ------------------------------------------------------------------------------------------------ batches
def batch_indices(n: int, batch_size: int, seeds: Sequence[int], start: int, steps: int) -> np.ndarray:
    """``(steps, T, B)`` example indices of global steps ``start .. start+steps-1`` for each member's seed.

    Epoch ``e`` of a member visits ``permutation(n)`` drawn from ``(seed, e)``; the last ``n mod B`` are dropped.
    """
    per_epoch = n // batch_size
    out = np.empty((steps, len(seeds), batch_size), np.int32)
    cache: dict = {}
    for s in range(steps):
        epoch, b = divmod(start + s, per_epoch)
        for i, seed in enumerate(seeds):
            if (seed, epoch) not in cache:
                cache[(seed, epoch)] = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
            out[s, i] = cache[(seed, epoch)][b * batch_size:(b + 1) * batch_size]
    return out


def epoch_batches(n: int, batch_size: int, seeds: Sequence[int], start: int, steps: int):
    """``(steps, T, B)`` indices and ``(steps, T, B)`` weights of global steps ``start .. start+steps-1``, every
    epoch a fresh permutation of ``n`` (from ``(seed, epoch)``) cut into ``ceil(n / B)`` batches, the last one
    smaller, as ``torch.split(torch.randperm(n), B)`` does; ``B = min(batch_size, n)``. The short last batch is
    padded with index 0 at weight 0, so the weighted mean over a batch is the mean over its real examples."""
    b = min(int(batch_size), int(n))
    per_epoch = -(-n // b)
    idx = np.zeros((steps, len(seeds), b), np.int32)
    w = np.zeros((steps, len(seeds), b), np.float32)
    cache: dict = {}
    for s in range(steps):
        epoch, k = divmod(start + s, per_epoch)
        for i, seed in enumerate(seeds):
            if (seed, epoch) not in cache:
                cache[(seed, epoch)] = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
            part = cache[(seed, epoch)][k * b:(k + 1) * b]
            idx[s, i, :len(part)] = part
            w[s, i, :len(part)] = 1.0
    return idx, w


def reference_optimizer(lr: float, momentum: float, weight_decay: float, lr_decay: float):
    """``torch.optim.SGD(lr, momentum, weight_decay)`` under ``LambdaLR(1 / (lr_decay * t + 1))`` stepped per batch:
    ``g += wd * theta`` (all parameters), ``buf = momentum * buf + g``, ``theta -= lr / (lr_decay * t + 1) * buf``
    with ``t`` the number of steps already taken."""
    schedule = lambda t: lr / (lr_decay * t + 1.0)  # noqa: E731
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))


# ------------------------------------------------------------------------------------------------ members
def init_members(model, tx, seeds: Sequence[int], example) -> TrainState:
    """One stacked state of ``len(seeds)`` members: member ``i`` initialised from ``PRNGKey(seeds[i])``."""
    return training.stack_states([
        TrainState.create(apply_fn=model.apply, params=model.init(jax.random.PRNGKey(int(s)), example,
                                                                  train=False)["params"], tx=tx)
        for s in seeds])


def model_convolves(model, image_shape=(1, 28, 28, 1)) -> bool:
    """Whether ``model`` convolves, read from its traced program (:func:`lcnn_jax.loops.uses_convolution`)."""
    x = jnp.zeros(image_shape, jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))["params"]
    return loops.uses_convolution(lambda p, xs: model.apply({"params": p}, xs, train=False), params, x)


def member_loop(model, choice: str, num_members: int, image_shape=(1, 28, 28, 1)) -> str:
    """``"vmap"`` or ``"unroll"`` for ``choice`` (``auto``/``vmap``/``unroll``): the library's rule
    (:func:`lcnn_jax.train.resolve_member_loop`) for ``num_members`` members on one device, with "does the model
    convolve" from :func:`model_convolves`."""
    layout = training.sweep_layout(Mesh(np.asarray(jax.devices()[:1]), ("data",)), int(num_members))
    return training.resolve_member_loop(choice, layout, lambda: model_convolves(model, image_shape))


def steps_from_host(model, image_shape=(1, 28, 28, 1)) -> bool:
    """Whether the trainers below should run their steps from the host (one compiled step called per step) instead
    of as a ``lax.scan``: on the CPU for a model that convolves. There a scanned (rolled) step runs the backward
    convolutions on XLA:CPU's slow path: LeNet's reference-protocol step (3 members, batch 1024) took 3.7-3.9 s
    scanned against 0.42 s called from the host (the library's rule for its estimators:
    :func:`lcnn_jax.loops.host_loop`)."""
    return loops.default_platform() == "cpu" and model_convolves(model, image_shape)


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_chunk_trainer(model, loop: str = "vmap", host_steps: bool = False):
    """Jitted ``(state, done (T,), images, labels (T, N), idx (S, T, B)) -> state``: S steps of all T members of a
    stacked state in one program (``lax.scan`` over steps of :func:`lcnn_jax.train.map_members` over members);
    ``host_steps``: the S steps from the host instead, one compiled step each (:func:`steps_from_host`).

    Members with ``done`` keep their state (they already fit their training set).
    """

    def member_step(state, done, x, y):
        grads = jax.grad(lambda q: _cross_entropy(model.apply({"params": q}, x, train=True), y))(state.params)
        new = state.apply_gradients(grads=grads)
        return jax.tree.map(lambda old, n: jnp.where(done, old, n), state, new)

    step_all = training.map_members(member_step, (0, 0, 0, 0), loop)

    def one_step(state, done, images, labels, idx_t):  # idx_t (T, B)
        return step_all(state, done, images[idx_t], jnp.take_along_axis(labels, idx_t, axis=1))

    if host_steps:
        return _host_chunk(jax.jit(one_step, donate_argnums=0), num_stepped=1)

    def chunk(state, done, images, labels, idx):
        return lax.scan(lambda st, idx_t: (one_step(st, done, images, labels, idx_t), None), state, idx)[0]

    return jax.jit(chunk)


def _host_chunk(step, num_stepped: int):
    """``chunk(state, *fixed, *stepped)`` calling ``step(state, *fixed, *row k of each stepped)`` for every row k of
    the last ``num_stepped`` arguments (their leading axis is the steps), from the host."""

    def chunk(state, *args):
        fixed, stepped = args[:-num_stepped], args[-num_stepped:]
        state = jax.tree.map(jnp.copy, state)  # the step donates its state; the caller's stays valid
        for k in range(stepped[0].shape[0]):
            state = step(state, *fixed, *(a[k] for a in stepped))
        return state

    return chunk


def make_weighted_chunk_trainer(model, loop: str = "vmap", host_steps: bool = False):
    """Jitted ``(state, images, labels (T, N), idx (S, T, B), w (S, T, B)) -> state``: S steps of every member on
    the weighted mean cross-entropy of its batch (``sum w ce / sum w``; padding has weight 0); ``host_steps`` as in
    :func:`make_chunk_trainer`."""

    def member_step(state, x, y, w):
        def loss(q):
            ce = optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": q}, x, train=True), y)
            return jnp.sum(w * ce) / jnp.sum(w)

        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    step_all = training.map_members(member_step, (0, 0, 0, 0), loop)

    def one_step(state, images, labels, idx_t, w_t):  # (T, B) each
        return step_all(state, images[idx_t], jnp.take_along_axis(labels, idx_t, axis=1), w_t)

    if host_steps:
        return _host_chunk(jax.jit(one_step, donate_argnums=0), num_stepped=2)

    def chunk(state, images, labels, idx, w):
        return lax.scan(lambda st, iw: (one_step(st, images, labels, *iw), None), state, (idx, w))[0]

    return jax.jit(chunk)


def make_member_logits(model, chunk: int = 500, loop: str = "vmap"):
    """Jitted ``(stacked state, images) -> (T, N, K)`` logits, ``chunk`` images at a time (bounded memory)."""
    apply = training.map_members(lambda p, xc: model.apply({"params": p}, xc, train=False), (0, 0), loop)

    @jax.jit
    def logits(state, images):
        n, t = images.shape[0], training.num_members(state)
        pad = (-n) % chunk
        xs = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)]) if pad else images
        xs = xs.reshape((-1, chunk) + images.shape[1:])
        out = lax.map(lambda xc: apply(state.params, jnp.broadcast_to(xc, (t,) + xc.shape)), xs)
        return jnp.moveaxis(out, 0, 1).reshape(t, -1, out.shape[-1])[:, :n]

    return logits


# ------------------------------------------------------------------------------------------------ protocols
def train_group(model, train_images: np.ndarray, labels: np.ndarray, seeds: Sequence[int], cfg, progs: dict) -> dict:
    """Our protocol: train ``len(seeds)`` members (one program) on ``train_images`` with per-member ``labels (T, N)``
    until each fits its training set (and, with ``cfg.target_loss``, its loss is at most that) or ``max_steps``.

    Returns the stacked ``state``, per-member final train accuracy, the step at which each fitted (``-1`` if
    never), the steps taken and the wall time. ``progs``: ``tx``, ``trainer`` (:func:`make_chunk_trainer`),
    ``logits`` (:func:`make_member_logits`)."""
    t0 = time.perf_counter()
    images, labels_j = jnp.asarray(train_images), jnp.asarray(labels)
    state = init_members(model, progs["tx"], seeds, images[:1])
    trainer, logits_fn = progs["trainer"], progs["logits"]
    n = len(train_images)
    done = np.zeros(len(seeds), bool)
    reached = np.full(len(seeds), -1)
    step, acc = 0, np.zeros(len(seeds))
    while step < cfg.max_steps and not done.all():
        k = min(cfg.eval_every, cfg.max_steps - step)
        idx = jnp.asarray(batch_indices(n, cfg.batch_size, seeds, step, k))
        state = trainer(state, jnp.asarray(done), images, labels_j, idx)
        step += k
        logits = np.asarray(logits_fn(state, images))
        acc = np.array([accuracy(logits[i], labels[i]) for i in range(len(seeds))])
        fitted = acc >= 1.0
        target = getattr(cfg, "target_loss", None)
        if target is not None:  # loss-matched stopping: every run ends at (about) the same training loss
            fitted &= np.array([mean_cross_entropy(logits[i], labels[i]) for i in range(len(seeds))]) <= target
        newly = fitted & ~done
        reached[newly] = step
        done |= newly
        print(f"    step {step:5d}  train acc {np.array2string(acc, precision=4)}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"state": state, "train_acc": acc, "reached_step": reached, "steps": step,
            "seconds": time.perf_counter() - t0}


def train_fixed_budget(model, train_images: np.ndarray, labels: np.ndarray, seeds: Sequence[int], cfg,
                       progs: dict) -> dict:
    """The reference protocol: train ``len(seeds)`` members for exactly ``cfg.steps`` steps, recording the full
    training-set loss and accuracy of every member at step 0 and every ``cfg.eval_every`` steps (``curve``).
    ``progs``: ``tx`` (:func:`reference_optimizer`), ``trainer`` (:func:`make_weighted_chunk_trainer`),
    ``logits``."""
    t0 = time.perf_counter()
    images, labels_j = jnp.asarray(train_images), jnp.asarray(labels)
    state = init_members(model, progs["tx"], seeds, images[:1])
    trainer, logits_fn = progs["trainer"], progs["logits"]
    n, t = len(train_images), len(seeds)
    curve = {"step": [], "train_loss": [[] for _ in range(t)], "train_acc": [[] for _ in range(t)]}

    def record(step):
        logits = np.asarray(logits_fn(state, images))
        curve["step"].append(step)
        for i in range(t):
            curve["train_loss"][i].append(mean_cross_entropy(logits[i], labels[i]))
            curve["train_acc"][i].append(accuracy(logits[i], labels[i]))

    record(0)
    step = 0
    while step < cfg.steps:
        k = min(cfg.eval_every, cfg.steps - step)
        idx, w = epoch_batches(n, cfg.batch_size, seeds, step, k)
        state = trainer(state, images, labels_j, jnp.asarray(idx), jnp.asarray(w))
        step += k
        record(step)
        if step == cfg.steps or step % (10 * cfg.eval_every) == 0:
            losses = np.array([curve["train_loss"][i][-1] for i in range(t)])
            accs = np.array([curve["train_acc"][i][-1] for i in range(t)])
            print(f"    step {step:6d}  train loss {' '.join(f'{v:.2e}' for v in losses)}  min acc {accs.min():.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if not all(np.isfinite(curve["train_loss"][i][-1]) for i in range(t)):
        raise FloatingPointError("a member's training loss is not finite at the end of the budget.")
    return {"state": state, "curve": curve, "steps": step, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ measures
class Measurer:
    """Compiled measurement programs for one model; ``measure(params, xs, ys, key)`` -> dict of the measures."""

    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        # One function object per model, so layer_hessian_traces compiles once (it is jitted on logits_fn).
        self.logits_fn = lambda p, x: model.apply({"params": p}, x[None], train=False)[0]  # noqa: E731

        def loss(p, xs, ys):
            return _cross_entropy(model.apply({"params": p}, xs, train=False), ys)

        self._hutch = jax.jit(lambda p, xs, ys, key: hessian_trace(
            lambda q: loss(q, xs, ys), p, key=key, num_probes=cfg.hutchinson_probes))
        self._top = jax.jit(lambda p, xs, ys, key: hessian_top_eigenvalues(
            lambda q: loss(q, xs, ys), p, key=key, k=1, num_iters=cfg.lanczos_iters))

    def measure(self, params, xs, ys, key) -> dict:
        cfg = self.cfg
        times = {}
        t = time.perf_counter()
        diag = layer_hessian_traces(self.logits_fn, params, xs, chunk_size=cfg.trace_chunk, diagonal=True)
        diag = jax.tree.map(lambda a: np.asarray(a, np.float64), diag)
        layers = layer_order(params)
        ms = minimum_sharpness_from_traces(diag, layers=layers, include_bias=True)
        ms_nb = minimum_sharpness_from_traces(diag, layers=layers, include_bias=False)
        times["exact_traces_ms_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ns = normalized_sharpness_from_diagonal(params, diag, layers=layers, tol=cfg.ns_tol,
                                                max_iters=cfg.ns_max_iters)
        times["normalized_s"] = time.perf_counter() - t
        k1, k2 = jax.random.split(key)
        t = time.perf_counter()
        est, se = self._hutch(params, xs, ys, k1)
        est, se = float(est), float(se)
        times["hutchinson_s"] = time.perf_counter() - t
        t = time.perf_counter()
        eig = self._top(params, xs, ys, k2)
        top, resid = float(eig.eigenvalues[0]), float(eig.residuals[0])
        times["lanczos_s"] = time.perf_counter() - t
        exact_trace = float(sum(np.sum(a) for a in jax.tree.leaves(diag)))
        return {
            "minimum_sharpness": ms.value, "minimum_sharpness_converged": ms.converged,
            "minimum_sharpness_iterations": ms.iterations, "minimum_sharpness_log_scales": ms.log_scales.tolist(),
            "minimum_sharpness_nobias": ms_nb.value, "layers": list(layers),
            "weight_traces": ms.weight_traces.tolist(), "bias_traces": ms.bias_traces.tolist(),
            "normalized_sharpness": ns.value, "normalized_sharpness_converged": ns.converged,
            "normalized_sharpness_iterations": ns.iterations,
            "hessian_trace": est, "hessian_trace_stderr": se, "exact_trace": exact_trace,
            "top_eigenvalue": top, "top_eigenvalue_residual": resid, "measure_seconds": times,
        }
