"""Auto-PGD (Croce & Hein, ICML 2020), its host-driven variant, and the per-example worst case over attacks.

Two step-size schedules, ``schedule=``:

* ``"reference"`` (default): the decisions of the authors' code, fra31/auto-attack ``autopgd_base.py``
  (``APGDAttack.attack_single_run`` / ``perturb``), the code behind every published AutoAttack number;
* ``"paper"``: the text of Croce & Hein (2020), Sec. 3 (this library's APGD before the reference schedule existed).

Run from the same start in float64 the two give identical iterates until one of these decisions differs
(``tests/test_autoattack.py`` checks the first 30 iterates of ``"reference"`` against a NumPy restatement of the
reference loop):

==  =====================================  ===================================  ===================================
#   decision                               ``"paper"``                          ``"reference"``
==  =====================================  ===================================  ===================================
1   halve when the successful steps are    ``< rho * period``                   ``<= rho * period``
2   a step is a success when its loss      that of the point it stepped from    that of the previous iterate before
    exceeds                                (``x_max`` after a restart; the      any restart; the first step is
                                           start's loss for the first step)     compared with 0 (an unfilled row)
3   checkpoints ``w_j`` for N steps        ``ceil(p_j N)``, the paper's         periods ``int(0.22 N)``, shrinking
                                           ``p_j``                              by ``int(0.03 N)`` to
                                                                                ``int(0.06 N)`` (each at least 1);
                                                                                equal for N = 100, not for N = 10,
                                                                                20, 25, 50
4   "halved at the previous checkpoint"    False (condition 2 may fire at       True (condition 2 cannot fire
    before the first checkpoint            the first checkpoint)                there)
5   the returned point                     the first misclassified iterate,     the last misclassified iterate,
                                           else the point of highest loss       else the clean input
==  =====================================  ===================================  ===================================

Also under ``"reference"``: the L2 direction ``g / (||g|| + 1e-12)`` and the L2 projection
``x0 + d / (||d|| + 1e-12) * min(eps, ||d||)`` in the reference's form (differences of 1e-12 that the DLR loss, whose
denominator can be tiny, amplifies). Common to both: the start on the eps-sphere, ``eta = 2 eps``, momentum 0.75
(none on the first step), the CE and DLR losses, APGD-T's target (the ``r``-th largest non-label logit at the
clean input, the reference's ``sort(logits)[-(r + 1)]`` for a correctly classified point), restarts on the points
still robust. The default is ``"reference"`` because robust accuracies are compared with numbers that fra31's code
produced; side by side on identical weights (small CNN, L-inf 0.1, L2 1 and 2, 25 and 100 steps) the two never
changed a verdict by more than one example, so ``"paper"`` remains a faithful reading of the text. The fidelity
table of the whole suite is in ``experiments/results/autoattack/fidelity.md``.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcnn_jax.attacks.base import (Clip, LogitsFn, NO_PARAMS, attack_unroll, bind, box, check_clip, check_inputs,
                                   check_nonneg, check_step_count, chunks, cross_entropy, pad, per_example, project,
                                   SEGMENT)
from lcnn_jax.autodiff import check_positive_int, safe_norm
from lcnn_jax.loops import materialize
from lcnn_jax.types import Array, PRNGKey

__all__: list = []

# ------------------------------------------------------------------------------------------------
# Auto-PGD (Croce & Hein, ICML 2020) and the per-example worst case over several attacks
# ------------------------------------------------------------------------------------------------

#: APGD's momentum weight ``alpha`` (the paper's 0.75; the first step has none).
APGD_MOMENTUM = 0.75
#: APGD's threshold ``rho``: the step size is halved at a checkpoint where fewer than this fraction of the steps
#: since the previous checkpoint raised the loss.
APGD_RHO = 0.75
APGD_LOSSES = ("ce", "dlr", "dlr_targeted")


#: The step-size schedules of :func:`apgd`: ``"reference"`` (fra31/auto-attack's code, the default) and ``"paper"``
#: (the text of Croce & Hein 2020); see the module docstring for the five points where they differ.
APGD_SCHEDULES = ("reference", "paper")
APGD_SCHEDULE = "reference"


def apgd_checkpoints(num_steps: int, schedule: str = APGD_SCHEDULE) -> tuple:
    """The iterations ``w_j`` (j >= 1, counted from 1, ``N = num_steps``) after which APGD reconsiders its step size.

    ``schedule="paper"``: ``w_j = ceil(p_j N)`` with ``p_0 = 0``, ``p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (Croce & Hein 2020, Sec. 3.2): the first period is 22 % of
    the budget, each later one 3 % shorter, but at least 6 %; computed in integer hundredths, so no float rounding
    moves a checkpoint. ``schedule="reference"`` (fra31/auto-attack): periods in whole iterations, the first
    ``k_1 = max(int(0.22 N), 1)``, then ``k_{j+1} = max(k_j - max(int(0.03 N), 1), max(int(0.06 N), 1))``
    (Python's float products truncated by ``int``), checkpoints at the running sums that do not exceed ``N``.
    The two agree for N = 100 (22, 41, 57, 70, 80, 87, 93, 99) and differ for N = 10, 20, 25, 50, e.g. N = 25:
    paper (6, 11, 15, 18, 20, 22, 24, 25), reference (5, 9, 12, 14, 15, 16, ..., 25), every step after the fifth.
    """
    if schedule not in APGD_SCHEDULES:
        raise ValueError(f"schedule must be one of {APGD_SCHEDULES}, got {schedule!r}.")
    n = int(num_steps)
    if n <= 0:
        return ()
    if schedule == "reference":
        k, decr, k_min = max(int(0.22 * n), 1), max(int(0.03 * n), 1), max(int(0.06 * n), 1)
        out, w = [], k
        while w <= n:
            out.append(w)
            k = max(k - decr, k_min)
            w += k
        return tuple(out)
    p = [0, 22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 3, 6)
        if nxt > 100:
            break
        p.append(nxt)
    return tuple(sorted({-(-q * n // 100) for q in p[1:]}))


def dlr_loss(logits: Array, ys: Array, *, targets: Array | None = None) -> Array:
    """Difference-of-logits-ratio loss per example, shape (B,) (Croce & Hein 2020, Sec. 4).

    Untargeted: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` with ``z_pi1 >= z_pi2 >= ...`` the sorted
    logits (needs K >= 3). Targeted (``targets`` = one class per example): ``-(z_y - z_t) / (z_pi1 - (z_pi3 +
    z_pi4) / 2 + 1e-12)`` (needs K >= 4). Invariant to shifting the logits and to scaling them by a positive factor,
    so a network cannot hide behind a large or small logit scale (unlike the cross-entropy, whose gradient vanishes
    on confident examples).
    """
    k = logits.shape[-1]
    need = 3 if targets is None else 4
    if k < need:
        raise ValueError(f"the {'targeted ' if targets is not None else ''}DLR loss needs at least {need} classes, "
                         f"got logits with {k}; use loss='ce'.")
    ys = ys.astype(jnp.int32)
    z_y = jnp.take_along_axis(logits, ys[:, None], -1)[:, 0]
    top = lax.top_k(logits, need)[0]
    if targets is None:
        others = jnp.where(jax.nn.one_hot(ys, k, dtype=bool), -jnp.inf, logits)
        return -(z_y - jnp.max(others, axis=-1)) / (top[:, 0] - top[:, 2] + 1e-12)
    z_t = jnp.take_along_axis(logits, targets.astype(jnp.int32)[:, None], -1)[:, 0]
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def target_classes(logits: Array, ys: Array, rank) -> Array:
    """The class with the ``rank``-th largest logit among those that are not the label (rank 1 = the runner-up;
    ``rank`` may be traced). For a correctly classified example this is the reference's ``sort(logits)[-(rank + 1)]``,
    the target of APGD-T and FAB-T."""
    masked = jnp.where(jax.nn.one_hot(ys, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    order = jnp.argsort(-masked, axis=-1, stable=True)
    return jnp.take_along_axis(order, jnp.full((logits.shape[0], 1), rank - 1, jnp.int32), -1)[:, 0]


def _check_apgd(logits_fn, xs, ys, *, norm, eps, num_steps, loss, key, restarts, target_rank, rho, momentum,
                clip, schedule=APGD_SCHEDULE) -> tuple[int, int]:
    """Every check of :func:`apgd`'s arguments (before any work); returns ``(restarts, target_rank)``."""
    check_inputs(xs, ys)
    if schedule not in APGD_SCHEDULES:
        raise ValueError(f"schedule must be one of {APGD_SCHEDULES} ('reference': fra31/auto-attack's code, "
                         f"'paper': Croce & Hein 2020's text), got {schedule!r}.")
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
    if loss not in APGD_LOSSES:
        raise ValueError(f"loss must be one of {APGD_LOSSES}, got {loss!r}.")
    check_nonneg(eps, "eps")
    check_clip(clip)
    check_step_count(num_steps)
    restarts = check_positive_int(restarts, "restarts")
    target_rank = check_positive_int(target_rank, "target_rank")
    if not 0.0 < float(rho) <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho!r}.")
    if not 0.0 < float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in (0, 1] (1 = no momentum), got {momentum!r}.")
    if key is None:
        raise ValueError("apgd starts at a random point of the eps-sphere: pass key=jax.random.key(...).")
    out_shape = jax.eval_shape(logits_fn, xs).shape
    if len(out_shape) != 2 or out_shape[0] != xs.shape[0]:
        raise ValueError(f"logits_fn(xs) must return logits of shape (batch, classes), got {out_shape}.")
    num_classes = out_shape[1]
    if loss == "dlr" and num_classes < 3 or loss == "dlr_targeted" and num_classes < 4:
        raise ValueError(f"loss={loss!r} needs at least {3 if loss == 'dlr' else 4} classes, the model has "
                         f"{num_classes}; use loss='ce'.")
    if loss == "dlr_targeted" and target_rank > num_classes - 1:
        raise ValueError(f"target_rank={target_rank} exceeds the {num_classes - 1} non-label classes.")
    return restarts, target_rank


def apgd(
    logits_fn: LogitsFn,
    xs: Array,
    ys: Array,
    *,
    norm: str = "linf",
    eps: float,
    num_steps: int = 100,
    loss: str = "ce",
    key: PRNGKey,
    restarts: int = 1,
    target_rank: int = 1,
    rho: float = APGD_RHO,
    momentum: float = APGD_MOMENTUM,
    clip: Clip = (0.0, 1.0),
    unroll: int | bool | None = None,
    schedule: str = APGD_SCHEDULE,
) -> Array:
    """Auto-PGD (Croce & Hein, ICML 2020): PGD without a step-size parameter, batched and traceable.

    Per example, from a random point ``x^(0)`` on the eps-sphere (L-inf: ``x0 + eps t / ||t||_inf``, t uniform
    in the cube; L2: ``x0 + eps n / ||n||``, n Gaussian; then into the box), step size ``eta = 2 eps``::

        z^(k+1) = P(x^(k) + eta s(grad f(x^(k))))       s = sign (L-inf) or g / ||g|| (L2)
        x^(k+1) = P(x^(k) + a (z^(k+1) - x^(k)) + (1 - a)(x^(k) - x^(k-1)))    a = 0.75 (momentum), 1 at k = 0

    ``P`` projects onto the eps-ball around ``x0`` and then clips to the box ``clip``, the convention of the
    authors' code (the clip moves each coordinate towards ``x0``, which is in the box, so the point stays in the
    ball). At the checkpoints :func:`apgd_checkpoints` ``w_j`` the step size of an example is halved, and its
    iterate restarted from the best point so far ``x_max`` (with that point's gradient), when

    1. fewer than ``rho`` (0.75) of the steps since ``w_{j-1}`` raised the loss (``f(x^(i+1)) > f(x^(i))``), or
    2. its step size was not halved at ``w_{j-1}`` and its best loss ``f_max`` has not grown since then.

    ``schedule``: ``"reference"`` (default, fra31/auto-attack's decisions) or ``"paper"`` (the text); they differ in
    five points (the module docstring's table): "fewer than" in 1. becomes "at most", successes are counted against the
    previous iterate's loss (the first against 0), the checkpoints follow the reference's integer periods, condition
    2 cannot fire at the first checkpoint, and the returned point is the last misclassified iterate, else the clean
    input.

    ``loss``: ``"ce"`` (cross-entropy), ``"dlr"`` (:func:`dlr_loss`, K >= 3) or ``"dlr_targeted"`` (K >= 4;
    the target is the class with the ``target_rank``-th largest non-label logit at the clean input, as
    AutoAttack's APGD-T runs ranks 1..9 as separate attacks). ``restarts``: independent runs from fresh random
    starts (``fold_in(key, r)``), each example keeping its first success.

    Returns, per example (``"paper"``), the first misclassified point found (the clean input itself if it is
    misclassified; every iterate and the random start are checked), else the point of highest loss;
    (``"reference"``) the last misclassified iterate of the first successful run, else the clean input. Every
    returned point lies in the eps-ball (L-inf exactly; L2 up to the float rounding of the coordinates) and in the
    box.

    Cost: ``restarts * (num_steps + 1)`` forward and backward passes, plus one forward pass on the clean input.
    ``unroll`` is passed to the step loop's ``lax.fori_loop`` (see :func:`pgd`).

    Example::

        import jax, jax.numpy as jnp
        from lcnn_jax import attacks
        w = jax.random.normal(jax.random.key(0), (16, 3))
        logits_fn = lambda xs: xs.reshape(len(xs), -1) @ w
        xs = jax.random.uniform(jax.random.key(1), (8, 4, 4, 1))
        ys = jnp.argmax(logits_fn(xs), axis=-1)
        run = jax.jit(lambda x, y, k: attacks.apgd(logits_fn, x, y, norm="l2", eps=0.5, num_steps=20, key=k))
        x_adv = run(xs, ys, jax.random.key(2))                  # one compiled program
    """
    restarts, target_rank = _check_apgd(logits_fn, xs, ys, norm=norm, eps=eps, num_steps=num_steps, loss=loss,
                                        key=key, restarts=restarts, target_rank=target_rank, rho=rho,
                                        momentum=momentum, clip=clip, schedule=schedule)
    x0, ys = xs, ys.astype(jnp.int32)
    clean_logits = logits_fn(x0)
    targets = target_classes(clean_logits, ys, target_rank) if loss == "dlr_targeted" else None
    start, body, outcome = apgd_machine(logits_fn, x0, ys, targets, jnp.asarray(eps, xs.dtype), norm=norm,
                                         loss=loss, num_steps=num_steps, rho=rho, momentum=momentum, clip=clip,
                                         schedule=schedule)

    def restart(r, carry):
        s = lax.fori_loop(0, int(num_steps), body, start(jax.random.fold_in(key, r)),
                          unroll=attack_unroll(num_steps, unroll))
        return _apgd_merge(carry, outcome(s))

    carry = lax.fori_loop(0, restarts, restart, _apgd_carry(x0, clean_logits, ys))
    return _apgd_result(carry, x0, schedule)


def apgd_machine(logits_fn, x0, ys, targets, eps, *, norm, loss, num_steps, rho=APGD_RHO, momentum=APGD_MOMENTUM,
                 clip=(0.0, 1.0), schedule=APGD_SCHEDULE):
    """APGD's pieces for one run on the batch ``x0``: ``start(run_key) -> state`` (the random start and its
    gradient), ``body(i, state) -> state`` (iteration ``i``, 0-based; checkpoint ``i + 1`` is applied after it) and
    ``outcome(state) -> (x_adv, fooled, x_max, f_max)``. :func:`apgd` runs ``body`` in a ``lax.fori_loop``;
    :func:`apgd_stepwise` calls it from the host in compiled segments (the same operations, so the same values).
    ``state["x"]`` is the iterate (after a checkpoint's restart from the best point); no argument checks here.

    ``schedule="reference"`` follows fra31/auto-attack's ``attack_single_run``: its checkpoints, ``<=`` in the
    oscillation test, the success count comparing each step's loss with the previous *iterate's* loss (0 for the
    first step, where the reference reads an unfilled row), the "halved at the last checkpoint" flag starting True,
    the last misclassified iterate as the adversarial point, and ``g / (||g|| + 1e-12)`` as the L2 direction."""
    dtype, n = x0.dtype, x0.shape[0]
    reference = schedule == "reference"

    def per_example_loss(logits):
        if loss == "ce":
            return cross_entropy(logits, ys)
        return dlr_loss(logits, ys, targets=targets)

    def loss_grad(x):
        def total(x_):
            logits = logits_fn(x_)
            values = per_example_loss(logits)
            return jnp.sum(values), (values, logits)

        g, (values, logits) = jax.grad(total, has_aux=True)(x)
        # stored: XLA would otherwise fuse the gradient's last operations into each of its uses, and across
        # unrolled steps the whole chain of earlier updates into each later one (lcnn_jax.loops.materialize)
        return values, materialize(g), jnp.argmax(logits, axis=-1) != ys

    def direction(g):
        if norm == "linf":
            return jnp.sign(g)
        gn = safe_norm(g.reshape(n, -1), axis=1)
        if reference:
            return g / per_example(gn + 1e-12, g)
        return g * per_example(jnp.where(gn > 0, 1.0 / jnp.where(gn > 0, gn, 1.0), 0.0), g)

    checkpoints = apgd_checkpoints(num_steps, schedule)
    is_check = np.zeros(int(num_steps) + 1, bool)
    period = np.zeros(int(num_steps) + 1, np.int32)
    for prev, w in zip((0,) + checkpoints, checkpoints):
        is_check[w], period[w] = True, w - prev
    is_check, period = jnp.asarray(is_check), jnp.asarray(period)
    alpha = jnp.asarray(momentum, dtype)

    def proj(x):
        if reference and norm == "l2":  # the reference's form: x0 + d / (||d|| + 1e-12) * min(eps, ||d||), then the box
            d = x - x0
            dn = safe_norm(d.reshape(n, -1), axis=1)
            return box(x0 + d * per_example(jnp.minimum(eps, dn) / (dn + 1e-12), d), clip)
        return project(x, x0, eps, norm, clip)

    def start(r_key):
        if norm == "linf":
            t = jax.random.uniform(r_key, x0.shape, dtype, -1.0, 1.0)
            tn = jnp.max(jnp.abs(t.reshape(n, -1)), axis=1)
        else:
            t = jax.random.normal(r_key, x0.shape, dtype)
            tn = safe_norm(t.reshape(n, -1), axis=1)
        x_start = project(x0 + eps * t * per_example(1.0 / jnp.maximum(tn, jnp.finfo(dtype).tiny), t), x0, eps,
                           norm, clip)
        f0, g0, wrong0 = loss_grad(x_start)
        # reference: the first step is compared with 0 (its unfilled row; with N = 1 the row is the step's own)
        f_prev = jnp.full_like(f0, 0.0 if int(num_steps) > 1 else jnp.inf) if reference else f0
        return dict(x=x_start, x_prev=x_start, g=g0, f=f_prev, eta=jnp.full((n,), 2.0, dtype) * eps,
                    x_max=x_start, g_max=g0, f_max=f0, successes=jnp.zeros((n,), jnp.int32),
                    f_max_check=f0, halved_check=jnp.full((n,), reference), x_adv=x_start, fooled=wrong0)

    def body(i, s):
        a = jnp.where(i == 0, jnp.asarray(1.0, dtype), alpha)
        eta = per_example(s["eta"], s["x"])
        z = proj(s["x"] + eta * direction(s["g"]))
        x_new = materialize(proj(s["x"] + a * (z - s["x"]) + (1 - a) * (s["x"] - s["x_prev"])))
        f_new, g_new, wrong = loss_grad(x_new)
        take = wrong if reference else wrong & ~s["fooled"]  # the last misclassified iterate, or the first
        x_adv = jnp.where(per_example(take, x_new), x_new, s["x_adv"])
        successes = s["successes"] + (f_new > s["f"]).astype(jnp.int32)
        better = f_new > s["f_max"]
        x_max = jnp.where(per_example(better, x_new), x_new, s["x_max"])
        g_max = jnp.where(per_example(better, x_new), g_new, s["g_max"])
        f_max = jnp.where(better, f_new, s["f_max"])
        # checkpoint k = i + 1: halve and restart from x_max where condition 1 or 2 holds
        check = is_check[i + 1]
        threshold = jnp.asarray(rho, dtype) * period[i + 1].astype(dtype)
        cond1 = successes.astype(dtype) <= threshold if reference else successes.astype(dtype) < threshold
        cond2 = ~s["halved_check"] & (f_max <= s["f_max_check"])
        halve = check & (cond1 | cond2)
        hb = per_example(halve, x_new)
        return dict(
            x=jnp.where(hb, x_max, x_new), x_prev=s["x"], g=jnp.where(hb, g_max, g_new),
            f=f_new if reference else jnp.where(halve, f_max, f_new), eta=jnp.where(halve, s["eta"] / 2, s["eta"]),
            x_max=x_max, g_max=g_max, f_max=f_max,
            successes=jnp.where(check, 0, successes),
            f_max_check=jnp.where(check, f_max, s["f_max_check"]),
            halved_check=jnp.where(check, halve, s["halved_check"]),
            x_adv=x_adv, fooled=s["fooled"] | wrong)

    def outcome(s):
        return s["x_adv"], s["fooled"], s["x_max"], s["f_max"]

    return start, body, outcome


def _apgd_carry(x0, clean_logits, ys):
    """Before the first run: nothing found (the clean input counts when it is already misclassified)."""
    return (x0, jnp.argmax(clean_logits, axis=-1) != ys, x0, jnp.full((x0.shape[0],), -jnp.inf, x0.dtype))


def _apgd_merge(carry, run):
    """Fold one run's outcome into the carry: each example keeps its first success and its highest-loss point."""
    x_adv, fooled, x_best, f_best = carry
    a, fo, xm, fm = run
    take = fo & ~fooled
    x_adv = jnp.where(per_example(take, a), a, x_adv)
    better = fm > f_best
    x_best = jnp.where(per_example(better, xm), xm, x_best)
    return x_adv, fooled | fo, x_best, jnp.where(better, fm, f_best)


def _apgd_result(carry, x0, schedule):
    """Per example: the adversarial point where one was found, else the clean input (reference) or the point of
    highest loss over all runs (paper)."""
    x_adv, fooled, x_best, _ = carry
    return jnp.where(per_example(fooled, x_adv), x_adv, x0 if schedule == "reference" else x_best)


#: Iterations per compiled segment of :func:`apgd_stepwise`.
APGD_SEGMENT = SEGMENT  # lcnn_jax.loops.HOST_SEGMENT


@functools.lru_cache(maxsize=64)
def _apgd_programs(logits_fn, norm, loss, num_steps, rho, momentum, clip, segment, schedule):
    """The jitted pieces of :func:`apgd_stepwise` for one ``logits_fn(params, xs)`` and setting (cached, so a
    network of the same architecture, another radius or another batch of the same shape compiles nothing)."""

    def machine(params, x, y, targets, eps):
        f = functools.partial(logits_fn, params)
        return apgd_machine(f, x, y, targets, jnp.asarray(eps, x.dtype), norm=norm, loss=loss,
                            num_steps=num_steps, rho=rho, momentum=momentum, clip=clip, schedule=schedule)

    @jax.jit
    def begin(params, x, y, target_rank):
        clean = logits_fn(params, x)
        targets = target_classes(clean, y, target_rank) if loss == "dlr_targeted" else jnp.zeros_like(y)
        return _apgd_carry(x, clean, y), targets

    def targets_or_none(targets):
        return targets if loss == "dlr_targeted" else None

    @jax.jit
    def start(params, x, y, targets, eps, run_key):
        return machine(params, x, y, targets_or_none(targets), eps)[0](run_key)

    @functools.partial(jax.jit, static_argnums=6, donate_argnums=5)
    def advance(params, x, y, targets, eps, s, count, first):
        body = machine(params, x, y, targets_or_none(targets), eps)[1]
        return lax.fori_loop(0, count, lambda j, st: body(first + j, st), s, unroll=True)

    @jax.jit
    def finish_run(params, x, y, targets, eps, carry, s):
        return _apgd_merge(carry, machine(params, x, y, targets_or_none(targets), eps)[2](s))

    return begin, start, advance, finish_run, jax.jit(functools.partial(_apgd_result, schedule=schedule))


def apgd_stepwise(
    logits_fn: Callable,
    xs: Array,
    ys: Array,
    *,
    params,
    norm: str = "linf",
    eps: float,
    num_steps: int = 100,
    loss: str = "ce",
    key: PRNGKey,
    restarts: int = 1,
    target_rank: int = 1,
    rho: float = APGD_RHO,
    momentum: float = APGD_MOMENTUM,
    clip: Clip = (0.0, 1.0),
    segment: int = APGD_SEGMENT,
    schedule: str = APGD_SCHEDULE,
) -> Array:
    """:func:`apgd` driven from the host: the same iterations, run as compiled segments of ``segment`` unrolled
    steps (the state stays on the device between them), with ``logits_fn(params, xs)`` and ``params`` an argument.

    Same arguments and result as :func:`apgd` (up to float reassociation). Not traceable: call it outside jit. Why:
    XLA:CPU runs the backward convolution of a network inside a ``while`` loop several times slower than outside one
    (inside the loop the backward convolution keeps a kernel layout, ``01oi``, that XLA:CPU does not rewrite to the
    ``01io`` form of its fast path, as it does outside loops), so APGD's long rolled loop is slow on CPU, and
    unrolling 100 steps would compile for minutes. ``python experiments/bench_attack_unroll.py --apgd`` (APGD-CE,
    100 steps, 512 images, small CNN at width 0.5, 2 CPU cores): rolled 72.5 s, stepwise 21.8 s (3.3x). On GPU the
    two run alike. The compiled pieces are cached
    per ``logits_fn`` (pass the same function object each time) and setting; ``eps`` and ``key`` are arguments.

    Cost: as :func:`apgd`, ``restarts * (num_steps + 1)`` forward and backward passes plus one forward pass on the
    clean input, in ``restarts * (ceil(num_steps / segment) + 2) + 2`` compiled calls.
    """
    restarts, target_rank = _check_apgd(functools.partial(logits_fn, params), xs, ys, norm=norm, eps=eps,
                                        num_steps=num_steps, loss=loss, key=key, restarts=restarts,
                                        target_rank=target_rank, rho=rho, momentum=momentum, clip=clip,
                                        schedule=schedule)
    segment = check_positive_int(segment, "segment")
    begin, start, advance, finish_run, result = _apgd_programs(
        logits_fn, norm, loss, int(num_steps), float(rho), float(momentum), None if clip is None else tuple(clip),
        segment, schedule)
    ys = jnp.asarray(ys, jnp.int32)
    eps = jnp.asarray(eps, xs.dtype)
    carry, targets = begin(params, xs, ys, jnp.asarray(target_rank, jnp.int32))
    for r in range(restarts):
        s = start(params, xs, ys, targets, eps, jax.random.fold_in(key, r))
        for first in range(0, int(num_steps), segment):
            count = min(segment, int(num_steps) - first)
            s = advance(params, xs, ys, targets, eps, s, count, jnp.asarray(first, jnp.int32))
        carry = finish_run(params, xs, ys, targets, eps, carry, s)
    return result(carry, xs)


class WorstCase(NamedTuple):
    """Result of :func:`robust_accuracy_worst_case`.

    accuracy: the fraction of examples classified correctly on the clean input AND on the output of every attack.
    clean_accuracy: the fraction classified correctly on the clean input.
    per_attack: ``name -> accuracy`` under that attack alone (on its output only, as :func:`robust_accuracy`).
    robust: (N,) bool per example, the worst case (numpy).
    """

    accuracy: float
    clean_accuracy: float
    per_attack: dict
    robust: np.ndarray


def robust_accuracy_worst_case(
    logits_fn: LogitsFn,
    xs: Array,
    ys: Array,
    *,
    attacks: "Mapping[str, Callable[..., Array]] | Sequence[Callable[..., Array]]",
    key: PRNGKey | None = None,
    batch_size: int | None = None,
    params=NO_PARAMS,
) -> WorstCase:
    """Per-example worst case over a list of attacks (the AutoAttack protocol): an example counts as robust only
    if it is classified correctly on the clean input and every attack fails on it.

    ``attacks``: ``{name: attack}`` (or a sequence, named ``attack0``, ``attack1``, ...), each called as in
    :func:`robust_accuracy`: ``attack(logits_fn, xs, ys)`` or, when ``key`` is given, with ``key=``; e.g.
    :func:`apgd_attacks` (APGD-CE and APGD-DLR). Runs outside jit: all attacks and the model are jitted as ONE
    program applied to chunks of ``batch_size`` examples (the last chunk padded, one compilation); attack ``i`` of
    chunk ``c`` gets ``fold_in(fold_in(key, c), i)``. Cost: the sum of the attacks' costs, plus one forward pass
    per attack and one on the clean input. (AutoAttack runs each attack only on the examples still robust; with
    fixed shapes under jit every attack sees every example, which costs more and changes nothing in the result.)
    Long APGD runs on CPU: see :func:`apgd_stepwise` (what :func:`lcnn_jax.report.robustness` uses).
    ``params``: the model's variables as an argument of the program, with ``logits_fn(params, xs)`` (see
    :func:`robust_accuracy`).
    """
    check_inputs(xs, ys)
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
    named = dict(attacks) if isinstance(attacks, Mapping) else {f"attack{i}": a for i, a in enumerate(attacks)}
    if not named:
        raise ValueError("robust_accuracy_worst_case needs at least one attack, e.g. attacks=apgd_attacks('l2', 1.0).")
    for name, a in named.items():
        if not callable(a):
            raise ValueError(f"attack {name!r} is not callable: {a!r}.")
    items = list(named.items())

    def correct(p, x, y, k):
        f = bind(logits_fn, p)
        out = {"clean": jnp.argmax(f(x), axis=-1) == y}
        for i, (name, attack) in enumerate(items):
            xa = attack(f, x, y) if k is None else attack(f, x, y, key=jax.random.fold_in(k, i))
            out[name] = jnp.argmax(f(xa), axis=-1) == y
        return out

    correct = jax.jit(correct, static_argnums=0) if params is NO_PARAMS else jax.jit(correct)
    hits: dict = {}
    for c, (start, stop, size) in enumerate(chunks(xs.shape[0], batch_size)):
        k = None if key is None else jax.random.fold_in(key, c)
        res = correct(params, pad(xs[start:stop], size), pad(ys[start:stop], size), k)
        for name, v in res.items():
            hits.setdefault(name, []).append(np.asarray(v)[: stop - start])
    hits = {name: np.concatenate(v) for name, v in hits.items()}
    robust = hits["clean"].copy()
    for name, _ in items:
        robust &= hits[name]
    return WorstCase(accuracy=float(robust.mean()), clean_accuracy=float(hits["clean"].mean()),
                     per_attack={name: float(hits[name].mean()) for name, _ in items}, robust=robust)


def apgd_attacks(norm: str, eps: float, *, num_steps: int = 100, losses: Sequence[str] = ("ce", "dlr"),
                 restarts: int = 1, target_ranks: Sequence[int] = (1,), schedule: str = APGD_SCHEDULE) -> dict:
    """``{name: attack}`` for :func:`robust_accuracy_worst_case`: APGD with each loss of ``losses`` at one radius,
    named ``apgd_ce``, ``apgd_dlr``, ``apgd_dlr_targeted<r>`` (one per rank of ``target_ranks``; AutoAttack's
    APGD-T uses ranks 1..9). The default pair APGD-CE + APGD-DLR is AutoAttack's parameter-free core without its
    targeted and black-box members."""
    out = {}
    for loss in losses:
        if loss not in APGD_LOSSES:
            raise ValueError(f"losses: {loss!r} is not one of {APGD_LOSSES}.")
        ranks = target_ranks if loss == "dlr_targeted" else (1,)
        for r in ranks:
            name = f"apgd_{loss}" + (str(r) if loss == "dlr_targeted" else "")
            out[name] = functools.partial(apgd, norm=norm, eps=float(eps), num_steps=num_steps, loss=loss,
                                          restarts=restarts, target_rank=int(r), schedule=schedule)
    return out


__all__ += ["APGD_MOMENTUM", "APGD_RHO", "APGD_LOSSES", "APGD_SEGMENT", "APGD_SCHEDULES", "APGD_SCHEDULE",
            "apgd_checkpoints", "dlr_loss", "apgd", "apgd_machine", "target_classes",
            "apgd_stepwise", "WorstCase",
            "robust_accuracy_worst_case", "apgd_attacks"]

