"""AutoAttack (Croce & Hein, ICML 2020): a cascade of complementary attacks, run on the points still robust.

A point counts as robust only if it is classified correctly on the clean input and every attack of the suite fails
on it. The cascade runs the attacks one after another, each only on the points that all earlier ones failed to
break (the reference's ``run_standard_evaluation``), so the result equals the per-example worst case over the
suite at a fraction of its cost. Versions, with the reference code's settings (fra31/auto-attack
``autoattack.py``, ``set_version``) for L-inf and L2:

============  ===========================================================================================
``standard``  APGD-CE (1 run, 100 steps), APGD-T (targeted DLR, 9 target classes, 1 run each),
              FAB-T (9 target classes, 1 run each, 100 steps), Square (5000 queries, p_init 0.8)
``plus``      APGD-CE and APGD-DLR (5 runs each), FAB (untargeted, 5 runs), Square, APGD-T, FAB-T
``apgd``      APGD-CE and APGD-DLR, 1 run each (the parameter-free core, no targeted or black-box member)
a tuple       any sequence of the stage names ``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``fab``, ``fab-t``,
              ``square``, with the reference's constructor defaults (APGD-CE/DLR and FAB: 5 runs)
============  ===========================================================================================

Inside a stage, each run (a restart, or a target class) is again applied only to the points still robust, as the
reference does. With fewer than 10 classes the targeted stages use the ``K - 1`` non-label classes.

Gradient stages run from the host in compiled segments (:func:`lcnn_jax.attacks.apgd_stepwise`,
:func:`lcnn_jax.attacks.fab_stepwise`; XLA:CPU is slow at a convolution's backward pass inside a rolled loop),
Square in compiled chunks of queries. The points still robust are gathered into chunks of ``batch_size``, padded
to a multiple of ``batch_size / 8`` rows (at most eight shapes compile per program). Each stage's cost
on the points it runs on: APGD ``runs * (num_steps + 1)`` forward and backward passes; FAB ``runs * num_steps``
iterations of 2 forward and K (FAB-T: 1) backward passes; Square ``num_queries + 1`` forward passes.

Example::

    import jax
    import jax.numpy as jnp
    from lcnn_jax import attacks

    w = 0.1 * jax.random.normal(jax.random.key(0), (64, 10))
    apply = lambda v, xs: xs.reshape(len(xs), -1) @ v           # any batched model; its weights an argument
    xs = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))    # 8 images in [0, 1]
    ys = jnp.argmax(apply(w, xs), axis=-1)                       # labels the model gets right
    res = attacks.autoattack(apply, xs, ys, norm="l2", eps=0.5, key=jax.random.key(2), params=w,
                             num_steps=10, num_queries=100)      # the reference's: 100 steps, 5000 queries
    print(res.robust.mean(), res.per_stage)                      # {'clean': 1.0, 'apgd-ce': ..., 'square': ...}
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.attacks.apgd import APGD_SCHEDULE, APGD_SCHEDULES, apgd_stepwise
from lcnn_jax.attacks.base import (SEGMENT, Clip, as_two_arg, check_clip, check_eps_positive, check_inputs, check_norm,
                                   check_step_count, jitted, num_classes)
from lcnn_jax.attacks.fab import fab_stepwise
from lcnn_jax.attacks.square import SQUARE_QUERIES, square_stepwise
from lcnn_jax.autodiff import check_positive_int
from lcnn_jax.types import Array, PRNGKey

__all__ = ["AUTOATTACK_STAGES", "AUTOATTACK_VERSIONS", "AutoAttackResult", "autoattack_settings", "autoattack"]

AUTOATTACK_STAGES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
AUTOATTACK_VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "apgd": ("apgd-ce", "apgd-dlr"),
}


class AutoAttackResult(NamedTuple):
    """Result of :func:`autoattack` (NumPy arrays, one entry per example).

    robust: bool, correct on the clean input and not broken by any stage.
    x_adv: the adversarial point of each broken example, the clean input elsewhere.
    broken_by: the stage that broke it (``"apgd-ce"``, ...), ``""`` where none did (robust, or misclassified clean).
    per_stage: robust accuracy after each stage, in order, starting with ``"clean"`` (the clean accuracy).
    """

    robust: np.ndarray
    x_adv: np.ndarray
    broken_by: np.ndarray
    per_stage: dict


def autoattack_settings(version) -> tuple:
    """``(stages, runs)`` of a version: the stage names in order and ``{stage: runs}`` (restarts for APGD-CE/DLR and
    FAB; the targeted stages and Square run once per target class / once)."""
    if isinstance(version, str):
        if version not in AUTOATTACK_VERSIONS:
            raise ValueError(f"version must be one of {tuple(AUTOATTACK_VERSIONS)} or a tuple of stage names from "
                             f"{AUTOATTACK_STAGES}, got {version!r}.")
        stages = AUTOATTACK_VERSIONS[version]
        restarts = {"standard": 1, "plus": 5, "apgd": 1}[version]
    else:
        stages = tuple(version) if isinstance(version, (tuple, list)) else None
        if not stages or any(s not in AUTOATTACK_STAGES for s in stages) or len(set(stages)) != len(stages):
            raise ValueError(f"a custom version is a non-empty tuple of distinct stage names from {AUTOATTACK_STAGES}, "
                             f"got {version!r}.")
        restarts = 5  # the reference's constructor defaults for APGD and FAB
    runs = {"apgd-ce": restarts, "apgd-dlr": restarts, "fab": restarts, "apgd-t": 1, "fab-t": 1, "square": 1}
    return stages, runs


def _bucket(n: int, batch_size: int) -> int:
    """Rows to compute for ``n`` points: ``n`` rounded up to a multiple of ``batch_size / 8`` (at most 8 shapes
    per program, fewer than ``batch_size / 8`` rows of padding). Powers of two times ``batch_size / 4`` (3 shapes)
    computed up to 31 % padding in a cascade at 195 of 256 points (256 rows for 195), and the cascade's stages
    after the first run on the points still robust, a count that falls slowly: it seldom visits more than two
    sizes, so finer sizes cost little compilation."""
    step = max(batch_size // 8, 1)
    return min(-(-n // step) * step, batch_size)


def _pad_rows(a: np.ndarray, size: int) -> np.ndarray:
    return a if len(a) == size else np.concatenate([a, np.repeat(a[:1], size - len(a), axis=0)], axis=0)


def _check(fn, p, xs, ys, *, norm, eps, key, version, clip, batch_size, num_steps, num_queries, n_target_classes,
           schedule, segment):
    check_inputs(xs, ys)
    check_norm(norm)
    check_eps_positive(eps)
    check_clip(clip)
    stages, runs = autoattack_settings(version)
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
    check_step_count(num_steps)
    check_step_count(num_queries, "num_queries")
    n_target_classes = check_positive_int(n_target_classes, "n_target_classes")
    check_positive_int(segment, "segment")
    if key is None:
        raise ValueError("autoattack needs key=jax.random.key(...) (its attacks start at random points).")
    if schedule not in APGD_SCHEDULES:
        raise ValueError(f"schedule must be one of {APGD_SCHEDULES}, got {schedule!r}.")
    k = num_classes(lambda x: fn(p, x), xs)
    y = np.asarray(ys)
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must lie in [0, {k - 1}] for a model with {k} classes, got values in "
                         f"[{y.min()}, {y.max()}].")
    need = {"apgd-dlr": 3, "apgd-t": 4, "fab-t": 2, "fab": 2, "apgd-ce": 2, "square": 2}
    for s in stages:
        if k < need[s]:
            raise ValueError(f"stage {s!r} needs at least {need[s]} classes, the model has {k}; leave it out "
                             f"(version=('apgd-ce', ...)).")
    if "square" in stages and xs.ndim != 4:
        raise ValueError(f"the Square stage needs images (batch, height, width, channels), got shape {xs.shape}; "
                         f"reshape the inputs to (batch, h, w, 1) and let logits_fn flatten them.")
    return stages, runs, batch_size, min(n_target_classes, k - 1)


def autoattack(
    logits_fn: Callable,
    xs: Array,
    ys: Array,
    *,
    norm: str,
    eps: float,
    key: PRNGKey,
    version: str | Sequence[str] = "standard",
    clip: Clip = (0.0, 1.0),
    batch_size: int | None = None,
    params=None,
    num_steps: int = 100,
    num_queries: int = SQUARE_QUERIES,
    n_target_classes: int = 9,
    schedule: str = APGD_SCHEDULE,
    progress: bool = True,
    log: list | None = None,
    segment: int = SEGMENT,
) -> AutoAttackResult:
    """Robust accuracy under AutoAttack (see the module docstring) with the cascade on the points still robust.

    ``logits_fn(xs)`` (``params=None``) or ``logits_fn(params, xs)`` with ``params`` the model's variables, an
    argument of the compiled programs (recommended: one compilation serves every network of the architecture).
    ``batch_size``: points per compiled call (default: all at once, at most 250 as the reference's ``bs``).
    ``num_steps`` (APGD, FAB: 100), ``num_queries`` (Square: 5000) and ``n_target_classes`` (9) are the reference's;
    lower them only for quick looks. ``schedule``: APGD's (:func:`lcnn_jax.attacks.apgd`). ``progress``: a tqdm bar
    naming the stage and the points still robust. ``log``: a list to which every run of a stage (a restart or a
    target class) appends ``{"stage", "run", "points", "padded", "broken", "seconds"}`` (``padded``: the rows
    computed, points plus padding; ``seconds``: wall time, compilation included). Not traceable (a Python driver
    over compiled pieces). ``segment``: iterations per compiled call of the gradient stages (unrolled; 5 keeps
    XLA:CPU's convolutions off their slow path at a bounded compile time, 1 compiles fastest for tiny models).

    Every check (unknown version or norm, ``eps`` not finite and positive, labels out of range, shapes that
    disagree, too few classes for a stage) raises ``ValueError`` before anything is compiled.
    """
    fn, p = as_two_arg(logits_fn, params)
    stages, runs, batch_size, n_targets = _check(
        fn, p, xs, ys, norm=norm, eps=eps, key=key, version=version, clip=clip, batch_size=batch_size,
        num_steps=num_steps, num_queries=num_queries, n_target_classes=n_target_classes, schedule=schedule,
        segment=segment)
    from tqdm.auto import tqdm

    x_np, y_np = np.asarray(xs), np.asarray(ys).astype(np.int32)
    n = len(x_np)
    batch_size = min(batch_size or 250, max(n, 1))
    predict = jitted(fn)
    clip = None if clip is None else tuple(float(c) for c in clip)
    eps = float(eps)

    def classify(x):
        out = np.empty(len(x), np.int32)
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size]
            size = _bucket(len(chunk), batch_size)
            out[start:start + len(chunk)] = np.asarray(jnp.argmax(predict(p, jnp.asarray(_pad_rows(chunk, size))),
                                                                  -1))[: len(chunk)]
        return out

    robust = classify(x_np) == y_np
    x_adv = x_np.copy()
    broken_by = np.full(n, "", dtype=object)
    per_stage = {"clean": float(robust.mean()) if n else 0.0}

    def attack(stage, run, x, y, k):
        common = dict(params=p, norm=norm, eps=eps, key=k, clip=clip)
        if stage in ("apgd-ce", "apgd-dlr", "apgd-t"):
            loss = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr_targeted"}[stage]
            return apgd_stepwise(fn, x, y, num_steps=num_steps, loss=loss, restarts=1, schedule=schedule,
                                 segment=segment, target_rank=run + 1 if stage == "apgd-t" else 1, **common)
        if stage in ("fab", "fab-t"):
            targeted = stage == "fab-t"
            return fab_stepwise(fn, x, y, num_steps=num_steps, restarts=1, targeted=targeted,
                                target_rank=run + 1 if targeted else 1, random_start=not targeted and run > 0,
                                segment=segment, **common)
        return square_stepwise(fn, x, y, num_queries=num_queries, restarts=1, **common)

    plan = [(s, r) for s in stages for r in range(n_targets if s in ("apgd-t", "fab-t") else runs[s])]
    with tqdm(total=len(plan), desc="autoattack", unit="run", disable=not progress) as bar:
        for i, stage in enumerate(stages):
            stage_key = jax.random.fold_in(key, i)
            for stage_i, run in [(s, r) for s, r in plan if s == stage]:
                idx = np.flatnonzero(robust)
                bar.set_description(f"autoattack {stage}{f' #{run + 1}' if run else ''}: {len(idx)} robust")
                run_key = jax.random.fold_in(stage_key, run)
                t0, padded, broken = time.perf_counter(), 0, 0
                for c, start in enumerate(range(0, len(idx), batch_size)):
                    sel = idx[start:start + batch_size]
                    size = _bucket(len(sel), batch_size)
                    padded += size
                    xa = attack(stage_i, run, jnp.asarray(_pad_rows(x_np[sel], size)),
                                jnp.asarray(_pad_rows(y_np[sel], size)), jax.random.fold_in(run_key, c))
                    xa = np.asarray(xa)[: len(sel)]
                    fooled = classify(xa) != y_np[sel]
                    hit = sel[fooled]
                    robust[hit] = False
                    x_adv[hit] = xa[fooled]
                    broken_by[hit] = stage
                    broken += len(hit)
                if log is not None:
                    log.append(dict(stage=stage, run=run, points=len(idx), padded=padded, broken=broken,
                                    seconds=time.perf_counter() - t0))
                bar.update(1)
            per_stage[stage] = float(robust.mean()) if n else 0.0
        bar.set_description(f"autoattack: {int(robust.sum())} robust of {n}")
    return AutoAttackResult(robust=robust, x_adv=x_adv, broken_by=broken_by.astype(str), per_stage=per_stage)
