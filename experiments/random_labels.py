"""The random-label study of minimum sharpness (SPEC 1.5, Ibayashi et al. arXiv 2106.12612), on mnist5k.

    python experiments/random_labels.py [--models ms_mlp,lenet] [--ratios 0,0.1,...,1] [--trials 3]
                                        [--n_train 2000] [--n_measure 1000] [--max_steps 3000]
                                        [--out experiments/results/random_labels] [--mnist_test_dir DIR]

Protocol. ``--n_train`` images drawn stratified (seed 0) from the 4000 mnist5k training images; in each run a
fraction ``r`` of their labels is shuffled (:func:`lcnn_jax.data.shuffle_labels`: ``round(r N)`` positions get a
random permutation of their own labels, so about ``0.9 r N`` labels end up wrong; the JSON records the exact
fraction). Trial ``t`` of ratio ``r`` uses init seed ``t`` and shuffle seed ``100 t + round(10 r)``. The networks
(registry names ``ms_mlp`` = MLP 784-512-128-512-10 and ``lenet`` = LeNet-5 with max-pool, both ReLU) are trained
with SGD (momentum 0.9, constant learning rate, batch 128, no weight decay) until EVERY image of the training set
is fitted (train accuracy 1.0, checked every ``--eval_every`` steps; a trial that gets there stops updating) or
``--max_steps``; the final train accuracy is recorded as it is. All trials of one ``(model, r)`` train as ONE
vmapped program (one ``lax.scan`` over steps of a ``vmap`` over trials).

Per run (on the first ``--n_measure`` training images, with the labels the run was trained on):

- ``gap``: train accuracy (trained labels) minus test accuracy on the mnist5k test split (1000 images, true labels);
- ``minimum_sharpness``: :func:`lcnn_jax.measures.minimum_sharpness_from_traces` with biases (Newton), from the exact
  per-layer traces (``minimum_sharpness_nobias``: the closed form without biases, recorded too);
- ``normalized_sharpness``: Tsuzuku et al., from the same exact diagonal;
- ``hessian_trace``: Hutchinson (``--hutchinson_probes`` Rademacher probes) of the mean cross-entropy's Hessian;
  the exact total trace (sum of the diagonal) is recorded beside it as ``exact_trace``;
- ``top_eigenvalue``: Lanczos (``--lanczos_iters`` steps) on the same loss.

Files in ``--out``: ``runs/<model>_r<r>_t<trial>.json`` per run (atomic; a run whose file exists with the same
protocol is not recomputed, so the script resumes), then, after every finished ``(model, r)``,
``kendall_tau.{md,json}`` (Kendall tau of each measure with the gap, per network, over all finished runs, beside the
paper's numbers from SPEC 1.5) and ``scatter.png`` (each measure vs the gap, coloured by r, one row per network).
``python experiments/random_labels.py --aggregate_only`` rebuilds the table and figure from the run files.

``--target_loss EPS`` additionally requires the mean training cross-entropy to be <= EPS before a run stops
(loss-matched runs). Without it the stopping point is the first check at train accuracy 1.0, where the loss still
varies several-fold between runs, and every Hessian measure of the cross-entropy scales with that loss level: the
summary reports the Kendall tau of each measure with the final training loss as a confound check.

Sizing used for the committed results (2 shared CPU cores; about 4 min per MLP ratio, 10+ min per LeNet ratio)::

    python experiments/random_labels.py --models ms_mlp
    python experiments/random_labels.py --models lenet --n_train 500 --n_measure 500 --batch_size 64 \
        --max_steps 1200 --eval_every 50 --hutchinson_probes 20 --lanczos_iters 15
    python experiments/random_labels.py --models ms_mlp --target_loss 4e-4 --eval_every 25 \
        --out experiments/results/random_labels/loss_matched

Conv nets train their trials in one program with the member loop unrolled rather than vmapped (``--member_loop``):
on XLA:CPU a convolution vmapped over members with different kernels ran ~1.5x slower.

``--protocol reference`` trains as the reference code does (``ibayashi-hikaru/minimum-sharpness``,
``02-sharpness-comparison/experiment/work-train.py`` and ``run.py``) instead of stopping at the first full fit:

- a FIXED budget of ``--steps`` optimizer steps, far past 100 % train accuracy, measured at the LAST step;
- SGD momentum 0.9 (PyTorch's form, no dampening), batch 1024 (``min(1024, n)``; each epoch is a fresh permutation
  cut into ``ceil(n / 1024)`` batches, the last one smaller, as ``torch.split`` does), lr 0.1 for the MLP and 0.01 for
  LeNet, weight decay 1e-5 on ALL parameters added to the gradient (``torch.optim.SGD(weight_decay=1e-5)``);
- lr multiplied by ``1 / (lr_decay * t + 1)`` with ``t`` the number of optimizer steps taken: the reference's
  ``LambdaLR`` is stepped after every batch, so its "epoch" counter counts steps. Its budgets on 60,000 images are
  3000 epochs (MLP) and 1000 epochs (LeNet) of 59 steps, i.e. 177,000 and 59,000 steps with ``lr_decay = 1e-4``,
  ending at lr factors 1/18.7 and 1/6.9. On our smaller data sets the budget is scaled down (``--steps``) and, by
  default, ``lr_decay`` is scaled with it (``1e-4 * reference_steps / steps``) so that the schedule has the same
  shape over the budget and ends at the same factor; ``--lr_decay 1e-4`` keeps the per-step constant instead.
- every ``--eval_every`` steps the full training-set loss and accuracy of each run are recorded (``curve`` in the run
  file); ``loss_curves.png`` draws them beside the reference's archived final training losses
  (``REFERENCE_FINAL_TRAIN_LOSS``), the evidence that the scaled budget reaches the reference's loss plateau.

Trials of several ratios train as one program (``--ratios_per_program``; members are vmapped, each with its own
labels, initialisation and batch order). Per-model defaults (``REFERENCE_DEFAULTS``) apply to every option not
given. Results go to ``experiments/results/random_labels/reference_protocol`` and
``python experiments/random_labels.py --protocol reference --aggregate_only`` also rebuilds
``experiments/results/random_labels/protocol_comparison.md``, the Kendall-tau table of both protocols::

    python experiments/random_labels.py --protocol reference --models ms_mlp --ratios 0,1,0.5,0.2,0.8 \
        --ratios_per_program 2       # the committed MLP results (15 runs; about 40 min on 2 shared cores)
    python experiments/random_labels.py --protocol reference --models lenet --ratios 0,1,0.5,0.2,0.8
                                     # not run: about 2 h on one core (a pilot's projection)

Kept from our side (departures from the reference, each a SPEC choice): inputs in [0, 1] (the reference normalises to
[-1, 1]), Flax initialisation (LeCun normal kernels, zero biases; PyTorch draws both uniformly in +-1/sqrt(fan_in)),
our data sizes, sharpness on ``--n_measure`` training images (the reference uses all 60,000) and minimum sharpness
minimised to convergence by Newton (the reference runs 10,000 steps of SGD on the log-scales).
``--save_params DIR`` writes each run's final parameters as ``DIR/<model>_r<r>_t<trial>.npz`` (flat ``/`` keys).
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
from jax import lax

from lcnn_jax.data import Split, load_split, shuffle_labels, subset
from lcnn_jax.measures import (hessian_top_eigenvalues, hessian_trace, layer_hessian_traces, layer_order,
                               minimum_sharpness_from_traces, normalized_sharpness_from_diagonal)
from lcnn_jax.nn import make_model
from lcnn_jax.training import write_json_atomic, write_text_atomic

RATIOS = tuple(round(0.1 * i, 1) for i in range(11))
# Spread order: after any prefix of finished ratios the table already covers the whole range of r.
SPREAD_ORDER = (0.0, 1.0, 0.5, 0.3, 0.7, 0.1, 0.9, 0.2, 0.8, 0.4, 0.6)
MEASURES = ("minimum_sharpness", "normalized_sharpness", "hessian_trace", "top_eigenvalue")
MEASURE_LABELS = {
    "minimum_sharpness": "minimum sharpness (with biases)",
    "normalized_sharpness": "normalized sharpness",
    "hessian_trace": "Hutchinson trace of the loss Hessian",
    "top_eigenvalue": "top Hessian eigenvalue",
}
SHORT_LABELS = {"ms_mlp": "MLP", "lenet": "LeNet"}
SHORT_MEASURES = {"minimum_sharpness": "min. sharpness", "normalized_sharpness": "norm. sharpness",
                  "hessian_trace": "Hessian trace", "top_eigenvalue": "top eigenvalue"}
# Not sharpness measures: shown under the table to expose confounds (e.g. the loss level at which training stopped).
DIAGNOSTICS = {"train_loss": "final training loss (diagnostic, not a measure)",
               "minimum_sharpness_nobias": "minimum sharpness without biases (closed form)",
               "minimum_sharpness_reference_sgd": "minimum sharpness as the reference minimises it (10,000 SGD steps)"}
MODEL_LABELS = {"ms_mlp": "MLP 784-512-128-512-10", "lenet": "LeNet"}
# SPEC 1.5, from the reference's archived runs: Kendall tau of MS with the gap, and LeNet's MS at three ratios.
PAPER_TAU = {("minimum_sharpness", "lenet"): 0.68, ("minimum_sharpness", "ms_mlp"): 0.86}
PAPER_LENET_MS = {0.0: 5.8, 0.5: 81.6, 1.0: 92.2}
# The fields of the protocol: a run file is reused only if all of them match.
PROTOCOL_KEYS = ("n_train", "n_measure", "max_steps", "lr", "momentum", "batch_size", "eval_every",
                 "hutchinson_probes", "lanczos_iters", "data_seed", "target_loss")
REFERENCE_PROTOCOL_KEYS = ("protocol", "n_train", "n_measure", "steps", "lr", "momentum", "batch_size",
                           "weight_decay", "lr_decay", "eval_every", "hutchinson_probes", "lanczos_iters", "data_seed")
# Our protocol's defaults (the same for every network; the README's LeNet command overrides some on the command line).
OURS_DEFAULTS = {"n_train": 2000, "n_measure": 1000, "max_steps": 3000, "eval_every": 100, "lr": 0.05,
                 "momentum": 0.9, "batch_size": 128, "hutchinson_probes": 30, "lanczos_iters": 20}
# The reference code's training (02-sharpness-comparison/experiment/run.py, work-train.py): on 60,000 MNIST images,
# batch 1024 = 59 steps per epoch; LambdaLR(1 / (1e-4 t + 1)) stepped after every optimizer step.
REFERENCE_TRAIN = {"ms_mlp": {"lr": 0.1, "epochs": 3000}, "lenet": {"lr": 0.01, "epochs": 1000},
                   "ms_lenet": {"lr": 0.01, "epochs": 1000}}
REFERENCE_N, REFERENCE_BATCH, REFERENCE_LR_DECAY = 60_000, 1024, 1e-4
REFERENCE_WEIGHT_DECAY, REFERENCE_MOMENTUM = 1e-5, 0.9


def reference_steps(model: str) -> int:
    """Optimizer steps of the reference's full budget: epochs * ceil(60000 / 1024)."""
    return REFERENCE_TRAIN[model]["epochs"] * -(-REFERENCE_N // REFERENCE_BATCH)


# Our scaled budgets and sizes under --protocol reference (chosen from pilots: see the README).
REFERENCE_DEFAULTS = {
    "ms_mlp": {"n_train": 2000, "n_measure": 1000, "steps": 3000, "eval_every": 50, "hutchinson_probes": 30,
               "lanczos_iters": 20},
    "lenet": {"n_train": 500, "n_measure": 500, "steps": 1000, "eval_every": 25, "hutchinson_probes": 20,
              "lanczos_iters": 15},
    "ms_lenet": {"n_train": 500, "n_measure": 500, "steps": 1000, "eval_every": 25, "hutchinson_probes": 20,
                 "lanczos_iters": 15},
}
# Final-epoch training loss of the reference's archived runs (02-sharpness-comparison/ARCHIVEs/train/<model>/<trial>/
# <r>/log.txt, last "train loss" line), median over its 10 trials; runs that never trained (loss 2.30) excluded.
REFERENCE_FINAL_TRAIN_LOSS = {
    "ms_mlp": {0.0: 9.8e-05, 0.1: 7.9e-04, 0.2: 1.1e-03, 0.3: 1.0e-03, 0.4: 1.2e-03, 0.5: 1.3e-03, 0.6: 1.4e-03,
               0.7: 1.6e-03, 0.8: 1.6e-03, 0.9: 1.7e-03, 1.0: 1.8e-03},
    "lenet": {0.0: 4.1e-05, 0.1: 1.7e-04, 0.2: 2.2e-04, 0.3: 2.7e-04, 0.4: 3.0e-04, 0.5: 3.6e-04, 0.6: 4.7e-04,
              0.7: 4.4e-04, 0.8: 8.1e-04, 0.9: 4.2e-04, 1.0: 3.3e-04},
}


# ------------------------------------------------------------------------------------------------ small helpers
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


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> dict:
    """Kendall tau-b of ``x`` with ``y`` (``scipy.stats.kendalltau``) over the pairs where both are finite."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length; got {x.shape} and {y.shape}.")
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return {"tau": float("nan"), "pvalue": float("nan"), "n": int(ok.sum())}
    res = scipy.stats.kendalltau(x[ok], y[ok])
    return {"tau": float(res.statistic), "pvalue": float(res.pvalue), "n": int(ok.sum())}


def shuffle_seed(ratio: float, trial: int) -> int:
    return 100 * int(trial) + int(round(10 * ratio))


def trial_labels(labels: np.ndarray, ratio: float, trials: Sequence[int]) -> np.ndarray:
    """``(T, N)`` labels: row ``i`` is ``labels`` with a fraction ``ratio`` shuffled, seed of trial ``trials[i]``."""
    split = Split(np.zeros((len(labels), 1), np.float32), np.asarray(labels))
    return np.stack([shuffle_labels(split, ratio, seed=shuffle_seed(ratio, t)).labels for t in trials])


def run_path(out: str, model: str, ratio: float, trial: int) -> str:
    return os.path.join(out, "runs", f"{model}_r{ratio:.1f}_t{trial}.json")


def run_is_done(path: str, protocol: dict) -> bool:
    """A run is finished when its file exists, parses, and was made with the same protocol."""
    try:
        with open(path) as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return False
    return all(rec.get("protocol", {}).get(k) == protocol.get(k) for k in PROTOCOL_KEYS)


def pending_trials(out: str, model: str, ratio: float, trials: Iterable[int], protocol: dict) -> list:
    return [t for t in trials if not run_is_done(run_path(out, model, ratio, t), protocol)]


def reference_sgd_ms(weight_traces, bias_traces, lr: float = 1e-3, steps: int = 10_000, decay: float = 1e-3) -> float:
    """Minimum sharpness as the reference code computes it from the per-layer traces (``sharpness/Minimum.py``, read
    for its method): traces divided by their sum ``S``; ``L - 1`` free log-scales ``e`` from 0; objective
    ``sum_{l<L} (W_l e^{-2 e_l} + B_l / P_l^2) + W_L P_{L-1}^2 + B_L`` with ``P_l = exp(e_1 + .. + e_l)``;
    ``steps`` plain gradient steps of ``lr / (1 + decay t)``; returns ``S`` times the objective evaluated before the
    last step. It stops short of the minimum when the optimal scales are far from 1 (our
    :func:`lcnn_jax.measures.minimum_sharpness_from_traces` runs Newton to convergence). NumPy, float64."""
    tw, tb = np.asarray(weight_traces, np.float64), np.asarray(bias_traces, np.float64)
    scale = tw.sum() + tb.sum()
    w, b = tw / scale, tb / scale
    n_free = len(w) - 1
    e = np.zeros(n_free)
    value = float("nan")
    for t in range(steps):
        a2 = np.exp(-2.0 * e)  # a_l^-2
        p2 = np.exp(2.0 * np.cumsum(e))  # P_l^2
        value = float(np.sum(w[:n_free] * a2) + np.sum(b[:n_free] / p2) + w[n_free] * p2[-1] + b[n_free])
        # d/de_j: -2 W_j a_j^-2  - 2 sum_{l >= j} B_l / P_l^2  + 2 W_L P^2
        tail = np.cumsum((b[:n_free] / p2)[::-1])[::-1]
        grad = -2.0 * w[:n_free] * a2 - 2.0 * tail + 2.0 * w[n_free] * p2[-1]
        e = e - lr / (1.0 + decay * t) * grad
    return value * scale


@functools.lru_cache(maxsize=None)
def _reference_sgd_ms_cached(weight_traces: tuple, bias_traces: tuple) -> float:
    return reference_sgd_ms(weight_traces, bias_traces)  # ~0.7 s each: once per run and process


# ------------------------------------------------------------------------------------------------ training
def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _member(tree, i: int):
    return jax.tree.map(lambda a: a[i], tree)


def over_members(fn, unroll: bool):
    """``fn`` mapped over the leading (member) axis of every argument: ``jax.vmap``, or, with ``unroll``, one
    call per member inside the same program. On XLA:CPU a vmapped convolution over members with different
    kernels becomes a grouped convolution that runs ~1.5x slower than separate ones, so conv nets unroll."""
    if not unroll:
        return jax.vmap(fn)

    def mapped(*args):
        n = jax.tree.leaves(args)[0].shape[0]
        outs = [fn(*(_member(a, i) for a in args)) for i in range(n)]
        return _stack(outs)

    return mapped


def make_chunk_trainer(model, tx, unroll: bool = False):
    """Jitted ``(params, opt, done, images, labels (T, N), idx (S, T, B)) -> (params, opt)``: S steps of all T
    members in one program (``vmap`` over members, or unrolled, see :func:`over_members`).

    Members with ``done`` keep their parameters (they already fit their training set).
    """

    def member_step(p, o, done, x, y):
        grads = jax.grad(lambda q: _cross_entropy(model.apply({"params": q}, x, train=True), y))(p)
        updates, o_new = tx.update(grads, o, p)
        p_new = optax.apply_updates(p, updates)
        keep = lambda old, new: jnp.where(done, old, new)  # noqa: E731
        return jax.tree.map(keep, p, p_new), jax.tree.map(keep, o, o_new)

    step_all = over_members(member_step, unroll)

    def chunk(params, opt, done, images, labels, idx):
        def body(carry, idx_t):  # idx_t (T, B)
            p, o = carry
            x = images[idx_t]
            y = jnp.take_along_axis(labels, idx_t, axis=1)
            return step_all(p, o, done, x, y), None

        (params, opt), _ = lax.scan(body, (params, opt), idx)
        return params, opt

    return jax.jit(chunk)


def make_member_logits(model, chunk: int = 500, unroll: bool = False):
    """Jitted ``(stacked params, images) -> (T, N, K)`` logits, ``chunk`` images at a time (bounded memory)."""
    apply = over_members(lambda p, xc: model.apply({"params": p}, xc, train=False), unroll)

    @jax.jit
    def logits(params, images):
        n = images.shape[0]
        pad = (-n) % chunk
        xs = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)]) if pad else images
        xs = xs.reshape((-1, chunk) + images.shape[1:])
        t = params_leading(params)
        out = lax.map(lambda xc: apply(params, jnp.broadcast_to(xc, (t,) + xc.shape)), xs)
        return jnp.moveaxis(out, 0, 1).reshape(params_leading(params), -1, out.shape[-1])[:, :n]

    return logits


def params_leading(params) -> int:
    return jax.tree.leaves(params)[0].shape[0]


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


def make_weighted_chunk_trainer(model, tx, unroll: bool = False):
    """Jitted ``(params, opt, images, labels (T, N), idx (S, T, B), w (S, T, B)) -> (params, opt)``: S steps of
    every member on the weighted mean cross-entropy of its batch (``sum w ce / sum w``; padding has weight 0)."""

    def member_step(p, o, x, y, w):
        def loss(q):
            ce = optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": q}, x, train=True), y)
            return jnp.sum(w * ce) / jnp.sum(w)

        updates, o_new = tx.update(jax.grad(loss)(p), o, p)
        return optax.apply_updates(p, updates), o_new

    step_all = over_members(member_step, unroll)

    def chunk(params, opt, images, labels, idx, w):
        def body(carry, inputs):
            idx_t, w_t = inputs  # (T, B) each
            x = images[idx_t]
            y = jnp.take_along_axis(labels, idx_t, axis=1)
            return step_all(*carry, x, y, w_t), None

        (params, opt), _ = lax.scan(body, (params, opt), (idx, w))
        return params, opt

    return jax.jit(chunk)


def train_fixed_budget(model, train_images: np.ndarray, labels: np.ndarray, seeds: Sequence[int], cfg,
                       progs: dict) -> dict:
    """Train ``len(seeds)`` members for exactly ``cfg.steps`` steps (the reference protocol), recording the full
    training-set loss and accuracy of every member at step 0 and every ``cfg.eval_every`` steps."""
    t0 = time.perf_counter()
    images = jnp.asarray(train_images)
    labels_j = jnp.asarray(labels)
    inits = [model.init(jax.random.PRNGKey(int(s)), images[:1], train=False)["params"] for s in seeds]
    params = _stack(inits)
    opt = jax.vmap(progs["tx"].init)(params)
    trainer, logits_fn = progs["trainer"], progs["logits"]
    n, t = len(train_images), len(seeds)
    curve = {"step": [], "train_loss": [[] for _ in range(t)], "train_acc": [[] for _ in range(t)]}

    def record(step):
        logits = np.asarray(logits_fn(params, images))
        curve["step"].append(step)
        for i in range(t):
            curve["train_loss"][i].append(mean_cross_entropy(logits[i], labels[i]))
            curve["train_acc"][i].append(accuracy(logits[i], labels[i]))
        return logits

    record(0)
    step = 0
    while step < cfg.steps:
        k = min(cfg.eval_every, cfg.steps - step)
        idx, w = epoch_batches(n, cfg.batch_size, seeds, step, k)
        params, opt = trainer(params, opt, images, labels_j, jnp.asarray(idx), jnp.asarray(w))
        step += k
        record(step)
        if step == cfg.steps or step % (10 * cfg.eval_every) == 0:
            losses = np.array([curve["train_loss"][i][-1] for i in range(t)])
            accs = np.array([curve["train_acc"][i][-1] for i in range(t)])
            print(f"    step {step:6d}  train loss {' '.join(f'{v:.2e}' for v in losses)}  min acc {accs.min():.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if not all(np.isfinite(curve["train_loss"][i][-1]) for i in range(t)):
        raise FloatingPointError("a member's training loss is not finite at the end of the budget.")
    return {"params": params, "curve": curve, "steps": step, "seconds": time.perf_counter() - t0}


def train_group(model, train_images: np.ndarray, labels: np.ndarray, seeds: Sequence[int], cfg,
                progs: dict | None = None) -> dict:
    """Train ``len(seeds)`` members (one vmapped program) on ``train_images`` with per-member ``labels (T, N)``.

    Returns stacked params, per-member final train accuracy and the step at which each reached accuracy 1.0
    (``-1`` if never), and the wall time.
    """
    t0 = time.perf_counter()
    images = jnp.asarray(train_images)
    labels_j = jnp.asarray(labels)
    inits = [model.init(jax.random.PRNGKey(int(s)), images[:1], train=False)["params"] for s in seeds]
    params = jax.tree.map(lambda *a: jnp.stack(a), *inits)
    if progs is None:
        tx = optax.sgd(cfg.lr, momentum=cfg.momentum)
        unroll = cfg.member_loop == "unroll"
        progs = {"tx": tx, "trainer": make_chunk_trainer(model, tx, unroll),
                 "logits": make_member_logits(model, unroll=unroll)}
    opt = jax.vmap(progs["tx"].init)(params)
    trainer, logits_fn = progs["trainer"], progs["logits"]
    n = len(train_images)
    done = np.zeros(len(seeds), bool)
    reached = np.full(len(seeds), -1)
    step, acc = 0, np.zeros(len(seeds))
    while step < cfg.max_steps and not done.all():
        k = min(cfg.eval_every, cfg.max_steps - step)
        idx = jnp.asarray(batch_indices(n, cfg.batch_size, seeds, step, k))
        params, opt = trainer(params, opt, jnp.asarray(done), images, labels_j, idx)
        step += k
        logits = np.asarray(logits_fn(params, images))
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
    return {"params": params, "train_acc": acc, "reached_step": reached, "steps": step,
            "seconds": time.perf_counter() - t0}


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


# ------------------------------------------------------------------------------------------------ the study
def load_data(cfg):
    train = subset(load_split("mnist5k", "train"), cfg.n_train, seed=cfg.data_seed, stratified=True)
    test = load_split("mnist5k", "test")
    official = load_split("mnist", "test", data_dir=cfg.mnist_test_dir) if cfg.mnist_test_dir else None
    return train, test, official


def protocol_note(pr: dict) -> str:
    if pr.get("protocol") == "reference":
        return (f"mnist5k, {pr['n_train']} training images (stratified subset of the 4000, seed {pr['data_seed']}); "
                f"test = mnist5k test split (1000 images). Reference protocol: SGD lr {pr['lr']} / "
                f"(1 + {pr['lr_decay']:.4g} t), momentum {pr['momentum']}, batch min({pr['batch_size']}, n) with a "
                f"short last batch per epoch, weight decay {pr['weight_decay']} on all parameters, a fixed budget of "
                f"{pr['steps']} steps, measured at the last step. Measures on the first {pr['n_measure']} training "
                f"images with the trained labels; Hutchinson {pr['hutchinson_probes']} probes, Lanczos "
                f"{pr['lanczos_iters']} steps.")
    return (f"mnist5k, {pr['n_train']} training images (stratified subset of the 4000, seed {pr['data_seed']}); "
            f"test = mnist5k test split (1000 images). SGD lr {pr['lr']}, momentum {pr['momentum']}, batch "
            f"{pr['batch_size']}, until train accuracy 1.0"
            + (f" and train loss <= {pr['target_loss']}" if pr.get("target_loss") is not None else "")
            + f" (checked every {pr['eval_every']} steps) or "
            f"{pr['max_steps']} steps. Measures on the first {pr['n_measure']} training images with the trained "
            f"labels; Hutchinson {pr['hutchinson_probes']} probes, Lanczos {pr['lanczos_iters']} steps.")


def protocol_of(cfg) -> dict:
    if getattr(cfg, "protocol", "ours") == "reference":
        return {k: getattr(cfg, k) for k in REFERENCE_PROTOCOL_KEYS}
    return {k: getattr(cfg, k) for k in PROTOCOL_KEYS}


def model_cfg(cfg, model_name: str):
    """``cfg`` with the per-model defaults of its protocol filled in (options given on the command line win).

    Our protocol has one set of defaults for every network (filled by :func:`parse_args`); the reference protocol
    takes lr and budget per network (``REFERENCE_TRAIN``, ``REFERENCE_DEFAULTS``) and, unless ``--lr_decay`` is
    given, scales the reference's ``1e-4`` per step so the lr ends at the reference's final factor."""
    if getattr(cfg, "protocol", "ours") != "reference":
        return cfg
    if model_name not in REFERENCE_TRAIN:
        raise ValueError(f"--protocol reference knows the networks {sorted(REFERENCE_TRAIN)}; got {model_name!r}.")
    out = argparse.Namespace(**vars(cfg))
    fill = {**REFERENCE_DEFAULTS[model_name], "lr": REFERENCE_TRAIN[model_name]["lr"],
            "momentum": REFERENCE_MOMENTUM, "batch_size": REFERENCE_BATCH, "weight_decay": REFERENCE_WEIGHT_DECAY}
    for k, v in fill.items():
        if getattr(out, k, None) is None:
            setattr(out, k, v)
    if out.steps < 1 or out.eval_every < 1:
        raise ValueError(f"steps and eval_every must be positive; got {out.steps} and {out.eval_every}.")
    if out.lr_decay is None:
        out.lr_decay = REFERENCE_LR_DECAY * reference_steps(model_name) / out.steps
    return out


_PROGRAMS: dict = {}
CONV_MODELS = ("lenet", "ms_lenet", "small_cnn")


def member_loop(model_name: str, choice: str) -> str:
    """``vmap`` or ``unroll`` (see :func:`over_members`); ``auto``: unroll conv nets, vmap the rest."""
    if choice == "auto":
        return "unroll" if model_name in CONV_MODELS else "vmap"
    if choice not in ("vmap", "unroll"):
        raise ValueError(f"member_loop must be 'auto', 'vmap' or 'unroll'; got {choice!r}.")
    return choice


def programs(model_name: str, cfg) -> dict:
    """Model, trainer, logits and measurer of ``model_name`` under ``cfg``'s protocol, built once per process and
    protocol (each group reuses the compiled programs; shapes only change with the number of pending members)."""
    key = (model_name, json.dumps(protocol_of(cfg), sort_keys=True), cfg.member_loop)
    if key not in _PROGRAMS:
        model = make_model(model_name, 10)
        unroll = member_loop(model_name, cfg.member_loop) == "unroll"
        if getattr(cfg, "protocol", "ours") == "reference":
            tx = reference_optimizer(cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_decay)
            trainer = make_weighted_chunk_trainer(model, tx, unroll)
        else:
            tx = optax.sgd(cfg.lr, momentum=cfg.momentum)
            trainer = make_chunk_trainer(model, tx, unroll)
        _PROGRAMS[key] = {"model": model, "tx": tx, "trainer": trainer,
                          "logits": make_member_logits(model, unroll=unroll), "measurer": Measurer(model, cfg)}
    return _PROGRAMS[key]


def flat_params(params) -> dict:
    """``{"dense0/kernel": array, ...}`` of a nested parameter dict (for ``np.savez``)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out["/".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf)
    return out


def run_group(model_name: str, ratio: float, trials: Sequence[int], data, cfg) -> list:
    """Train the given trials of ``(model, ratio)`` together, measure each, write one JSON per run."""
    return run_members(model_name, [(ratio, t) for t in trials], data, cfg)


def run_members(model_name: str, members: Sequence[tuple], data, cfg) -> list:
    """Train the ``(ratio, trial)`` members together (one program), measure each, write one JSON per run."""
    train, test, official = data
    reference = getattr(cfg, "protocol", "ours") == "reference"
    progs = programs(model_name, cfg)
    model = progs["model"]
    labels = np.stack([trial_labels(train.labels, r, [t])[0] for r, t in members])
    seeds = [int(t) for _, t in members]
    tag = ", ".join(f"r{r:.1f}/t{t}" for r, t in members)
    print(f"[{model_name}] training {tag} on {len(train.labels)} images", flush=True)
    if reference:
        res = train_fixed_budget(model, train.images, labels, seeds, cfg, progs)
    else:
        res = train_group(model, train.images, labels, seeds, cfg, progs=progs)
    logits_fn = progs["logits"]
    train_logits = np.asarray(logits_fn(res["params"], jnp.asarray(train.images)))
    test_logits = np.asarray(logits_fn(res["params"], jnp.asarray(test.images)))
    off_logits = np.asarray(logits_fn(res["params"], jnp.asarray(official.images))) if official else None
    measurer = progs["measurer"]
    xs_m = jnp.asarray(train.images[:cfg.n_measure])
    records = []
    for i, (ratio, trial) in enumerate(members):
        params = jax.tree.map(lambda a: a[i], res["params"])
        t = time.perf_counter()
        meas = measurer.measure(params, xs_m, jnp.asarray(labels[i, :cfg.n_measure]),
                                jax.random.PRNGKey(10_000 + shuffle_seed(ratio, trial)))
        if reference:
            accs = np.asarray(res["curve"]["train_acc"][i])
            fit = np.flatnonzero(accs >= 1.0)
            reached = int(res["curve"]["step"][fit[0]]) if fit.size else -1
        else:
            reached = int(res["reached_step"][i])
        rec = {
            "model": model_name, "ratio": ratio, "trial": int(trial), "init_seed": int(trial),
            "shuffle_seed": shuffle_seed(ratio, trial), "protocol": protocol_of(cfg),
            "frac_labels_changed": float(np.mean(labels[i] != train.labels)),
            "steps": res["steps"], "reached_full_fit_at_step": reached,
            **generalization_gap(train_logits[i], labels[i], test_logits[i], test.labels),
            "train_loss": mean_cross_entropy(train_logits[i], labels[i]),
            "test_loss": mean_cross_entropy(test_logits[i], test.labels),
            "train_seconds_group": res["seconds"], "group_size": len(members),
            "member_loop": member_loop(model_name, cfg.member_loop), "backend": jax.default_backend(),
            "measure_seconds_total": None, **meas,
        }
        if reference:
            rec["curve"] = {"step": res["curve"]["step"], "train_loss": res["curve"]["train_loss"][i],
                            "train_acc": res["curve"]["train_acc"][i]}
        if off_logits is not None:
            rec["official_test_acc"] = accuracy(off_logits[i], official.labels)
            rec["official_gap"] = rec["train_acc"] - rec["official_test_acc"]
        rec["measure_seconds_total"] = time.perf_counter() - t
        path = run_path(cfg.out, model_name, ratio, trial)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, rec)
        if getattr(cfg, "save_params", None):
            os.makedirs(cfg.save_params, exist_ok=True)
            np.savez(os.path.join(cfg.save_params, f"{model_name}_r{ratio:.1f}_t{trial}.npz"), **flat_params(params))
        records.append(rec)
        print(f"  r{ratio:.1f} trial {trial}: train {rec['train_acc']:.4f} (loss {rec['train_loss']:.2g}) test "
              f"{rec['test_acc']:.4f} gap {rec['gap']:.4f} | MS {rec['minimum_sharpness']:.4g} NS "
              f"{rec['normalized_sharpness']:.4g} trace {rec['hessian_trace']:.4g} (exact {rec['exact_trace']:.4g}) "
              f"top {rec['top_eigenvalue']:.4g} | measured in {rec['measure_seconds_total']:.1f} s", flush=True)
    return records


def load_runs(out: str) -> list:
    """The run files of ``out``; ``minimum_sharpness_reference_sgd`` is added from the stored per-layer traces."""
    runs = []
    for path in sorted(glob.glob(os.path.join(out, "runs", "*.json"))):
        with open(path) as fh:
            rec = json.load(fh)
        if "minimum_sharpness_reference_sgd" not in rec and rec.get("weight_traces"):
            rec["minimum_sharpness_reference_sgd"] = _reference_sgd_ms_cached(tuple(rec["weight_traces"]),
                                                                              tuple(rec["bias_traces"]))
        runs.append(rec)
    return runs


def tau_table(runs: Sequence[dict], models: Sequence[str]) -> dict:
    """``{model: {measure: kendall_tau(measure, gap)}}`` over all finished runs of each model."""
    table = {}
    for m in models:
        rs = [r for r in runs if r["model"] == m]
        gaps = [r["gap"] for r in rs]
        table[m] = {meas: kendall_tau([r.get(meas, float("nan")) for r in rs], gaps)
                    for meas in MEASURES + tuple(DIAGNOSTICS)}
        losses = [r.get("train_loss", float("nan")) for r in rs]
        table[m]["_tau_with_train_loss"] = {meas: kendall_tau([r[meas] for r in rs], losses)["tau"]
                                            for meas in MEASURES}
        table[m]["_runs"] = len(rs)
        table[m]["_ratios"] = sorted({r["ratio"] for r in rs})
        table[m]["_min_train_acc"] = min((r["train_acc"] for r in rs), default=float("nan"))
    return table


def _fit_steps(rs: Sequence[dict]) -> str:
    """Median step of the first full fit over the runs that fitted, and how many did not."""
    fit = [r["reached_full_fit_at_step"] for r in rs if r.get("reached_full_fit_at_step", -1) >= 0]
    out = f"{np.median(fit):.0f}" if fit else "never"
    return out + (f" ({len(rs) - len(fit)} never)" if fit and len(fit) < len(rs) else "")


def _fmt(x, spec=".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def write_summary(out: str, models: Sequence[str], cfg_note: str = "") -> dict:
    """Kendall tau table (markdown + json) and the scatter figure, from the run files in ``out``."""
    runs = load_runs(out)
    # every network with run files, the requested ones first (a LeNet-only rerun keeps the MLP rows)
    found = [r["model"] for r in runs]
    models = [m for m in list(models) + sorted(set(found)) if m in found]
    models = list(dict.fromkeys(models))
    table = tau_table(runs, models)
    lines = ["# Random-label study: Kendall tau of each measure with the generalization gap", ""]
    if cfg_note:
        lines += [cfg_note, ""]
    for m in models:
        protos = {json.dumps(r["protocol"], sort_keys=True) for r in runs if r["model"] == m}
        for proto in sorted(protos):
            lines.append(f"- {MODEL_LABELS.get(m, m)}: " + protocol_note(json.loads(proto)))
    lines.append("")
    reference = any(r.get("protocol", {}).get("protocol") == "reference" for r in runs)
    who = "reference protocol" if reference else "ours"
    head = "| measure | " + " | ".join(
        f"{who}: {MODEL_LABELS.get(m, m)} | paper (SPEC 1.5): {MODEL_LABELS.get(m, m)}" for m in models) + " |"
    lines += [head, "|---" * (1 + 2 * len(models)) + "|"]
    for meas in MEASURES + tuple(DIAGNOSTICS):
        cells = []
        for m in models:
            t = table[m][meas]
            cells.append(f"{_fmt(t['tau'])} (p={_fmt(t['pvalue'], '.1g')}, n={t['n']})")
            cells.append(_fmt(PAPER_TAU.get((meas, m))))
        lines.append(f"| {MEASURE_LABELS.get(meas) or DIAGNOSTICS[meas]} | " + " | ".join(cells) + " |")
    lines += ["", "Runs per network: " + ", ".join(
        f"{MODEL_LABELS.get(m, m)} {table[m]['_runs']} runs over r = {table[m]['_ratios']}, lowest final train "
        f"accuracy {table[m]['_min_train_acc']:.4f}" for m in models) + ".", ""]
    why = ("a fixed budget: every run ends where its loss has got to" if reference else
           "training stops at the first check with train accuracy 1.0, so the loss level differs between runs")
    lines += [f"Confound check, Kendall tau of each measure with the final training loss ({why}): " + "; ".join(
                  f"{MODEL_LABELS.get(m, m)}: " + ", ".join(
                      f"{meas} {_fmt(v)}" for meas, v in table[m]["_tau_with_train_loss"].items())
                  for m in models) + ".", ""]
    lines += ["Mean over trials per ratio" + (" (ref. loss: the reference's archived final training loss, median of "
                                            "its 10 runs on 60,000 images; steps to fit: first check at train "
                                            "accuracy 1.0)" if reference else "") + ":", "",
              "| network | r | trials | steps | train acc | train loss | test acc | gap | MS | NS | trace | top eig |"
              + (" ref. loss | steps to fit |" if reference else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if reference else "")]
    for m in models:
        for ratio in sorted({r["ratio"] for r in runs if r["model"] == m}):
            rs = [r for r in runs if r["model"] == m and r["ratio"] == ratio]
            mean = lambda k: float(np.mean([r.get(k, float("nan")) for r in rs]))  # noqa: E731
            loss = float(np.mean([r.get("train_loss", float("nan")) for r in rs]))
            lines.append(f"| {MODEL_LABELS.get(m, m)} | {ratio:.1f} | {len(rs)} | {_fmt(mean('steps'), '.0f')} | "
                         f"{mean('train_acc'):.4f} | {loss:.2g} | {mean('test_acc'):.4f} | {mean('gap'):.4f} | {mean('minimum_sharpness'):.4g} | "
                         f"{mean('normalized_sharpness'):.4g} | {mean('hessian_trace'):.4g} | "
                         f"{mean('top_eigenvalue'):.4g} |"
                         + (f" {_fmt(REFERENCE_FINAL_TRAIN_LOSS.get(m, {}).get(ratio), '.2g')} | "
                            f"{_fit_steps(rs)} |" if reference else ""))
    lines += ["", "Paper's LeNet minimum sharpness (SPEC 1.5, reference's archived runs on full MNIST): " + ", ".join(
        f"r={k}: {v}" for k, v in PAPER_LENET_MS.items()) + ". Their LeNet is the reference code's variant "
        "(`ms_lenet`), trained on 60000 images; ours is LeNet-5 on a mnist5k subset, so only the trend compares."]
    os.makedirs(out, exist_ok=True)
    write_text_atomic(os.path.join(out, "kendall_tau.md"), "\n".join(lines) + "\n")
    write_json_atomic(os.path.join(out, "kendall_tau.json"),
                      {"ours": table, "paper_spec_1_5": {f"{a}/{b}": v for (a, b), v in PAPER_TAU.items()}})
    if runs:
        scatter(runs, models, os.path.join(out, "scatter.png"))
    if any("curve" in r for r in runs):
        loss_curves(runs, models, os.path.join(out, "loss_curves.png"))
    return table


def _save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    tmp = path + f".tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def loss_curves(runs: Sequence[dict], models: Sequence[str], path: str) -> None:
    """Per network: the training loss of every run along its budget (coloured by r), and the final training loss
    against r beside the reference's archived final losses (``REFERENCE_FINAL_TRAIN_LOSS``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in models if any("curve" in r and r["model"] == m for r in runs)]
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.4 * len(models)), squeeze=False, layout="constrained")
    norm = matplotlib.colors.Normalize(0.0, 1.0)
    cmap = matplotlib.colormaps["viridis"]
    for i, m in enumerate(models):
        rs = [r for r in runs if r["model"] == m and "curve" in r]
        ax = axes[i, 0]
        for r in rs:
            steps = np.asarray(r["curve"]["step"])
            ax.plot(steps[1:], np.asarray(r["curve"]["train_loss"])[1:], color=cmap(norm(r["ratio"])), lw=0.8,
                    alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel("training loss (full training set)", fontsize=8)
        pr = rs[0]["protocol"]
        ax.set_title(f"{SHORT_LABELS.get(m, m)}: {pr['n_train']} images, {pr['steps']} steps, lr {pr['lr']} / "
                     f"(1 + {pr['lr_decay']:.3g} t)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax = axes[i, 1]
        ratios = np.array([r["ratio"] for r in rs])
        ax.scatter(ratios, [r["train_loss"] for r in rs], c=ratios, cmap="viridis", norm=norm, s=22,
                   edgecolors="k", linewidths=0.3, label="ours, end of the budget (each run)")
        ref = REFERENCE_FINAL_TRAIN_LOSS.get(m)
        if ref:
            ax.plot(list(ref), list(ref.values()), "k--", marker="x", lw=1,
                    label="reference, last epoch (archived, median of 10)")
        ax.set_yscale("log")
        ax.set_xlabel("fraction r of shuffled labels", fontsize=8)
        ax.set_ylabel("final training loss", fontsize=8)
        ax.set_title(f"{SHORT_LABELS.get(m, m)}: final training loss vs r", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[:, 0], label="r", shrink=0.9)
    _save_figure(fig, path)


def scatter(runs: Sequence[dict], models: Sequence[str], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), len(MEASURES), figsize=(3.6 * len(MEASURES) + 1, 3.2 * len(models)),
                             squeeze=False, layout="constrained")
    norm = matplotlib.colors.Normalize(0.0, 1.0)
    for i, m in enumerate(models):
        rs = [r for r in runs if r["model"] == m]
        gaps = np.array([r["gap"] for r in rs])
        colours = np.array([r["ratio"] for r in rs])
        for j, meas in enumerate(MEASURES):
            ax = axes[i, j]
            vals = np.array([r[meas] for r in rs], np.float64)
            sc = ax.scatter(gaps, vals, c=colours, cmap="viridis", norm=norm, s=22, edgecolors="k", linewidths=0.3)
            if np.all(vals > 0):
                ax.set_yscale("log")
            tau = kendall_tau(vals, gaps)["tau"]
            ax.set_title(f"{SHORT_LABELS.get(m, m)}: {SHORT_MEASURES[meas]} (tau {_fmt(tau)})", fontsize=9)
            ax.set_xlim(-0.03, 1.0)
            if i == len(models) - 1:
                ax.set_xlabel("generalization gap (train acc - test acc)", fontsize=8)
            ax.grid(alpha=0.3)
    fig.colorbar(sc, ax=axes, label="fraction r of shuffled labels", shrink=0.9)
    tmp = path + f".tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# Archive folder of each network; keyed like PAPER_TAU ("lenet" there is the reference code's LeNet = our ms_lenet).
REFERENCE_MODEL_DIRS = {"ms_mlp": "MLP", "lenet": "LeNet"}
REFERENCE_MODEL_LABELS = {"ms_mlp": "MLP 784-512-128-512-10", "lenet": "LeNet (the reference code's, = our `ms_lenet`)"}


def _pickled_floats(blob: bytes) -> dict:
    """``{key: float}`` of a pickled flat ``dict[str, float]``, read with ``pickletools`` (nothing is unpickled,
    so no code from the file runs)."""
    import pickletools

    out, key = {}, None
    for op, arg, _ in pickletools.genops(blob):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            key = arg
        elif op.name in ("BINFLOAT", "FLOAT") and key is not None:
            out[key], key = float(arg), None
    return out


def _last_epoch(log_path: str) -> dict:
    """Final-epoch train loss / accuracy and test accuracy of one reference training log."""
    train = test = None
    with open(log_path) as fh:
        for line in fh:
            if "train loss:" in line:
                train = line.split()
            elif "test  loss:" in line or "test loss:" in line:
                test = line.split()
    if train is None or test is None:
        raise ValueError(f"{log_path}: no 'train loss' / 'test loss' lines")
    return {"train_loss": float(train[train.index("loss:") + 1]),
            "train_acc": float(train[train.index("accuracy:") + 1]), "test_acc": float(test[test.index("accuracy:") + 1])}


def reference_archive_table(repo: str, out: str) -> dict:
    """Kendall taus of the reference's OWN archived runs (a checkout of ``ibayashi-hikaru/minimum-sharpness``):
    minimum sharpness at the last epoch (``ARCHIVEs/proposal/last-epoch/<model>/<trial>/sharpness.pkl``) and the
    final training loss (``ARCHIVEs/train/<model>/<trial>/<r>/log.txt``), each against the gap (train - test
    accuracy at the last epoch), and with each other. Runs that never trained (final loss > 1) are reported apart.
    Writes ``reference_archive.{md,json}`` in ``out``."""
    base = os.path.join(repo, "02-sharpness-comparison", "ARCHIVEs")
    result, lines = {}, ["# The reference's archived runs: what their minimum sharpness orders", "",
                         f"Read from `{os.path.basename(os.path.abspath(repo))}/02-sharpness-comparison/ARCHIVEs` "
                         "(60,000 MNIST images per run, last epoch; 10 trials x 11 ratios). Gap = train accuracy - test "
                         "accuracy at the last epoch.", "",
                         "| network | runs | tau(MS, gap) | tau(final train loss, gap) | tau(MS, final train loss) | "
                         "runs that never trained | tau(MS, gap), all runs |", "|---|---|---|---|---|---|---|"]
    for model, mdir in REFERENCE_MODEL_DIRS.items():
        rows = []
        trials = sorted(int(t) for t in os.listdir(os.path.join(base, "train", mdir)) if t.isdigit())
        for t in trials:
            with open(os.path.join(base, "proposal", "last-epoch", mdir, str(t), "sharpness.pkl"), "rb") as fh:
                ms = _pickled_floats(fh.read())
            for rdir in sorted(os.listdir(os.path.join(base, "train", mdir, str(t)))):
                last = _last_epoch(os.path.join(base, "train", mdir, str(t), rdir, "log.txt"))
                rows.append({"trial": t, "ratio": float(rdir), "ms": ms.get(rdir, float("nan")), **last,
                             "gap": last["train_acc"] - last["test_acc"]})
        ok = [r for r in rows if r["train_loss"] < 1.0]
        col = lambda rs, k: [r[k] for r in rs]  # noqa: E731
        res = {"runs": len(ok), "never_trained": len(rows) - len(ok),
               "tau_ms_gap": kendall_tau(col(ok, "ms"), col(ok, "gap"))["tau"],
               "tau_loss_gap": kendall_tau(col(ok, "train_loss"), col(ok, "gap"))["tau"],
               "tau_ms_loss": kendall_tau(col(ok, "ms"), col(ok, "train_loss"))["tau"],
               "tau_ms_gap_all_runs": kendall_tau(col(rows, "ms"), col(rows, "gap"))["tau"]}
        result[model] = res
        lines.append(f"| {REFERENCE_MODEL_LABELS[model]} | {res['runs']} | {res['tau_ms_gap']:.2f} | {res['tau_loss_gap']:.2f} | "
                     f"{res['tau_ms_loss']:.2f} | {res['never_trained']} | {res['tau_ms_gap_all_runs']:.2f} |")
    os.makedirs(out, exist_ok=True)
    write_text_atomic(os.path.join(out, "reference_archive.md"), "\n".join(lines) + "\n")
    write_json_atomic(os.path.join(out, "reference_archive.json"), result)
    return result


def write_protocol_comparison(ours_dir: str, ref_dir: str, path: str) -> str:
    """One table of both protocols from their ``kendall_tau.json`` files (and ``reference_archive.json``, when
    present beside ``path``): tau of each measure with the gap, and the confound check (tau with the final loss)."""
    def load(p):
        try:
            with open(os.path.join(p, "kendall_tau.json")) as fh:
                return json.load(fh)["ours"]
        except (OSError, ValueError, KeyError):
            return {}

    ours, ref = load(ours_dir), load(ref_dir)
    archive = {}
    try:
        with open(os.path.join(os.path.dirname(path), "reference_archive.json")) as fh:
            archive = json.load(fh)
    except (OSError, ValueError):
        pass
    models = [m for m in ("ms_mlp", "lenet", "ms_lenet") if m in ours or m in ref]
    cell = lambda tab, m, meas: (  # noqa: E731
        f"{_fmt(tab[m][meas]['tau'])} (n={tab[m][meas]['n']})" if m in tab and meas in tab[m] else "not run")
    conf = lambda tab, m, meas: (  # noqa: E731
        _fmt(tab[m]["_tau_with_train_loss"].get(meas)) if m in tab else "not run")
    lines = ["# Kendall tau with the generalization gap: our protocol vs the reference's", "",
             f"Our protocol: `{ours_dir}/kendall_tau.md` (stop at the first check with train accuracy 1.0). Reference "
             f"protocol: `{ref_dir}/kendall_tau.md` (fixed budget far past 100 %, the reference's optimizer, weight "
             "decay and schedule, measured at the last step). Paper: SPEC 1.5 (the reference's archived runs, "
             "60,000 images).", ""]
    head = "| measure | " + " | ".join(f"{SHORT_LABELS.get(m, m)}: ours | {SHORT_LABELS.get(m, m)}: reference protocol"
                                      f" | {SHORT_LABELS.get(m, m)}: paper" for m in models) + " |"
    lines += [head, "|---" * (1 + 3 * len(models)) + "|"]
    for meas in MEASURES + ("train_loss",):
        row = []
        for m in models:
            paper = PAPER_TAU.get((meas, m))
            if meas == "train_loss" and m in archive:
                paper = archive[m]["tau_loss_gap"]
            row += [cell(ours, m, meas), cell(ref, m, meas), _fmt(paper)]
        label = MEASURE_LABELS.get(meas) or DIAGNOSTICS[meas]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += ["", "Confound check: Kendall tau of each measure with the final training loss.", "",
              head, "|---" * (1 + 3 * len(models)) + "|"]
    for meas in MEASURES:
        row = []
        for m in models:
            paper = archive[m]["tau_ms_loss"] if (meas == "minimum_sharpness" and m in archive) else None
            row += [conf(ours, m, meas), conf(ref, m, meas), _fmt(paper)]
        lines.append(f"| {MEASURE_LABELS[meas]} | " + " | ".join(row) + " |")
    if archive:
        lines += ["", "Paper column of the final-loss rows: computed from the reference's archived runs "
                  "(`reference_archive.md`)."]
    text = "\n".join(lines) + "\n"
    write_text_atomic(path, text)
    return text


def member_groups(pending: Sequence[tuple], ratios_per_program: int) -> list:
    """Pending ``(ratio, trial)`` members cut into groups of at most ``ratios_per_program`` ratios (in order)."""
    if ratios_per_program < 1:
        raise ValueError(f"ratios_per_program must be >= 1; got {ratios_per_program}.")
    order = list(dict.fromkeys(r for r, _ in pending))
    groups = []
    for i in range(0, len(order), ratios_per_program):
        chunk = set(order[i:i + ratios_per_program])
        groups.append([(r, t) for r, t in pending if r in chunk])
    return groups


def run_study(cfg) -> dict:
    if getattr(cfg, "protocol", "ours") == "reference":
        return run_reference_study(cfg)
    data = load_data(cfg)
    protocol = protocol_of(cfg)
    note = ""
    trials = list(range(cfg.trials))
    for model_name in cfg.models:
        for ratio in cfg.ratios:
            todo = pending_trials(cfg.out, model_name, ratio, trials, protocol)
            if not todo:
                print(f"[{model_name} r={ratio:.1f}] all {len(trials)} trials finished; skipped", flush=True)
                continue
            t0 = time.perf_counter()
            run_group(model_name, ratio, todo, data, cfg)
            print(f"[{model_name} r={ratio:.1f}] done in {time.perf_counter() - t0:.0f} s", flush=True)
            write_summary(cfg.out, cfg.models, note)
    return write_summary(cfg.out, cfg.models, note)


def run_reference_study(cfg) -> dict:
    """The reference protocol: per network, the pending ``(ratio, trial)`` runs in groups of
    ``--ratios_per_program`` ratios, each group one training program."""
    trials = list(range(cfg.trials))
    for model_name in cfg.models:
        mcfg = model_cfg(cfg, model_name)
        protocol = protocol_of(mcfg)
        pending = [(r, t) for r in cfg.ratios for t in pending_trials(cfg.out, model_name, r, trials, protocol)]
        if not pending:
            print(f"[{model_name}] all runs finished; skipped", flush=True)
            continue
        data = load_data(mcfg)
        for group in member_groups(pending, cfg.ratios_per_program):
            t0 = time.perf_counter()
            run_members(model_name, group, data, mcfg)
            print(f"[{model_name}] group of {len(group)} runs done in {time.perf_counter() - t0:.0f} s", flush=True)
            write_summary(cfg.out, cfg.models)
    table = write_summary(cfg.out, cfg.models)
    write_comparison(cfg)
    return table


def write_comparison(cfg) -> None:
    """``protocol_comparison.md`` beside our protocol's results, when the reference results sit in its default
    place (``<ours>/reference_protocol``)."""
    ours_dir = os.path.dirname(os.path.normpath(cfg.out))
    if os.path.isfile(os.path.join(ours_dir, "kendall_tau.json")):
        write_protocol_comparison(ours_dir, cfg.out, os.path.join(ours_dir, "protocol_comparison.md"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", default="ours", choices=("ours", "reference"),
                   help="ours: stop at the first full fit; reference: the reference code's fixed budget and optimizer")
    p.add_argument("--models", default="ms_mlp,lenet")
    p.add_argument("--ratios", default=",".join(str(r) for r in SPREAD_ORDER),
                   help="comma-separated r values, run in this order (default: spread over [0, 1])")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--n_train", type=int, default=None, help="default 2000 (reference protocol: per network)")
    p.add_argument("--n_measure", type=int, default=None, help="default 1000 (reference protocol: per network)")
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--max_steps", type=int, default=None, help="our protocol: step cap (default 3000)")
    p.add_argument("--steps", type=int, default=None, help="reference protocol: the fixed budget (per network)")
    p.add_argument("--eval_every", type=int, default=None,
                   help="steps between train-set checks (default 100; reference protocol: per network)")
    p.add_argument("--target_loss", type=float, default=None,
                   help="also require mean train CE <= this to stop (loss-matched runs; default: accuracy 1.0 only)")
    p.add_argument("--lr", type=float, default=None, help="default 0.05 (reference protocol: 0.1 MLP, 0.01 LeNet)")
    p.add_argument("--momentum", type=float, default=None, help="default 0.9")
    p.add_argument("--batch_size", type=int, default=None, help="default 128 (reference protocol: 1024)")
    p.add_argument("--weight_decay", type=float, default=None, help="reference protocol: default 1e-5")
    p.add_argument("--lr_decay", type=float, default=None,
                   help="reference protocol: lr / (1 + lr_decay * step); default 1e-4 * reference steps / --steps")
    p.add_argument("--ratios_per_program", type=int, default=1,
                   help="reference protocol: ratios whose trials train together in one program")
    p.add_argument("--hutchinson_probes", type=int, default=None, help="default 30 (reference protocol: per network)")
    p.add_argument("--lanczos_iters", type=int, default=None, help="default 20 (reference protocol: per network)")
    p.add_argument("--trace_chunk", type=int, default=64)
    p.add_argument("--ns_tol", type=float, default=1e-6)
    p.add_argument("--ns_max_iters", type=int, default=2000)
    p.add_argument("--member_loop", default="auto", choices=("auto", "vmap", "unroll"),
                   help="how the trials of one r share a program: vmap, or unrolled (auto: unroll conv nets)")
    p.add_argument("--mnist_test_dir", default=None, help="folder of MNIST IDX files: adds official_test_acc")
    p.add_argument("--save_params", default=None, help="folder for each run's final parameters (.npz)")
    p.add_argument("--reference_archive", default=None,
                   help="a checkout of ibayashi-hikaru/minimum-sharpness: tabulate its archived runs' Kendall taus "
                        "into <out of our protocol>/reference_archive.md")
    p.add_argument("--out", default=None, help="default experiments/results/random_labels (reference protocol: "
                                              "its reference_protocol subfolder)")
    p.add_argument("--aggregate_only", action="store_true")
    cfg = p.parse_args(argv)
    cfg.models = [m for m in cfg.models.split(",") if m]
    cfg.ratios = [round(float(r), 1) for r in cfg.ratios.split(",") if r]
    bad = [r for r in cfg.ratios if not 0.0 <= r <= 1.0]
    if bad:
        p.error(f"ratios must lie in [0, 1]; got {bad}")
    base = os.path.join("experiments", "results", "random_labels")
    if cfg.protocol == "ours":
        for k, v in OURS_DEFAULTS.items():
            if getattr(cfg, k) is None:
                setattr(cfg, k, v)
        for k in ("steps", "weight_decay", "lr_decay"):
            if getattr(cfg, k) is not None:
                p.error(f"--{k} belongs to --protocol reference")
        cfg.out = cfg.out or base
    else:
        for k in ("max_steps", "target_loss"):
            if getattr(cfg, k) is not None:
                p.error(f"--{k} belongs to our protocol (the reference protocol trains for a fixed --steps)")
        unknown = [m for m in cfg.models if m not in REFERENCE_TRAIN]
        if unknown:
            p.error(f"--protocol reference knows the networks {sorted(REFERENCE_TRAIN)}; got {unknown}")
        cfg.out = cfg.out or os.path.join(base, "reference_protocol")
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.reference_archive:
        out = os.path.dirname(os.path.normpath(cfg.out)) if cfg.protocol == "reference" else cfg.out
        print(open(os.path.join(out, "reference_archive.md")).read() if reference_archive_table(
            cfg.reference_archive, out) else "")
    if cfg.aggregate_only:
        table = write_summary(cfg.out, cfg.models)
        if cfg.protocol == "reference":
            write_comparison(cfg)
    else:
        table = run_study(cfg)
    print(open(os.path.join(cfg.out, "kendall_tau.md")).read())
    return table


if __name__ == "__main__":
    main()
