"""FAB, the fast adaptive boundary attack (Croce & Hein, ICML 2020), L-inf and L2, untargeted and targeted.

FAB looks for the *smallest* perturbation that changes the decision, by repeatedly projecting onto the linearised
decision boundary. Per example, with ``x0`` the clean input and ``x`` the current iterate (``x = x0`` at first):

1. linearise at ``x``: for every class ``j != y``, ``f_j - f_y`` and its input gradient ``g_j - g_y``
   (untargeted; the targeted version uses only ``j = t``); pick the class whose linearised boundary is closest,
   ``j* = argmin_j |f_j - f_y| / ||g_j - g_y||_*`` (dual norm: L1 for L-inf, L2 for L2);
2. project ``x`` and ``x0`` onto that hyperplane *within the box* (:func:`project_hyperplane`, exact): steps
   ``d1``, ``d2``;
3. move to ``(x + eta d1)(1 - a) + (x0 + eta d2) a`` with ``a = clip(||d1|| / (||d1|| + ||d2||), 0, alpha_max)``
   (a step that leans back towards ``x0``; ``eta`` overshoots the boundary a little), then into the box;
4. if the new point is misclassified, keep it when it is the closest to ``x0`` so far, and pull it back towards
   ``x0``: ``x <- x0 + beta (x - x0)``.

Settings are the reference code's (fra31/auto-attack ``fab_base.py``): ``alpha_max = 0.1``, ``eta = 1.05``,
``beta = 0.9``, 100 iterations; restarts after the first start at ``x0 + eps / 2 * u / ||u||`` (u uniform in the
cube for L-inf, Gaussian for L2). The result counts only within the radius: like the reference's ``perturb``, an
example gets its closest adversarial point if that lies within ``eps`` of ``x0``, else the clean input.

Cost per iteration: one forward pass and ``K`` backward passes (untargeted: the full input Jacobian) or one backward
pass (targeted), plus one forward pass to test the new point; ``restarts * num_steps`` iterations.

Example::

    import jax, jax.numpy as jnp
    from lcnn_jax import attacks
    w = jax.random.normal(jax.random.key(0), (16, 4))
    logits_fn = lambda xs: xs.reshape(len(xs), -1) @ w
    xs = jax.random.uniform(jax.random.key(1), (8, 4, 4, 1))
    ys = jnp.argmax(logits_fn(xs), axis=-1)
    x_adv = attacks.fab(logits_fn, xs, ys, norm="l2", eps=1.0, key=jax.random.key(2), num_steps=20)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from lcnn_jax.attacks.apgd import target_classes
from lcnn_jax.attacks.base import (SEGMENT, Clip, LogitsFn, as_two_arg, check_clip, check_eps_positive, check_inputs,
                                   check_norm, check_step_count, drive_segments, jitted, lp_norm, num_classes,
                                   per_example, run_traced)
from lcnn_jax.autodiff import check_positive_int
from lcnn_jax.types import Array, PRNGKey

__all__ = ["FAB_ALPHA_MAX", "FAB_ETA", "FAB_BETA", "project_hyperplane", "fab", "fab_stepwise"]

#: The reference's FAB settings: the largest step back towards ``x0``, the overshoot and the backward step.
FAB_ALPHA_MAX, FAB_ETA, FAB_BETA = 0.1, 1.05, 0.9


def project_hyperplane(t: Array, w: Array, b: Array, *, norm: str, clip: Clip = (0.0, 1.0)) -> Array:
    """The smallest step ``d`` (in the L-inf or L2 norm) from ``t`` onto the hyperplane ``<w, t + d> = b`` with
    ``t + d`` in the box, for one flat vector (vmap it over a batch); returns ``d``.

    Orient ``w`` so that ``c = <w, t> - b >= 0``; the step moves each coordinate against ``sign(w_i)`` by
    ``min(lam |w_i|, cap_i)`` (L2) or ``min(lam, cap_i)`` (L-inf), ``cap_i`` the room left in the box in that
    direction. The decrease ``R(lam) = sum_i a_i min(lam, r_i)`` (L2: ``a = w^2``, ``r = cap / |w|``; L-inf:
    ``a = |w|``, ``r = cap``) is piecewise linear and increasing; ``R(lam) = c`` (the KKT conditions of the
    box-constrained problem) is solved by :func:`_breakpoint_root`. When the hyperplane is out of the box's reach
    the step goes to the box's extreme point (``lam = inf``), as the reference does. Coordinates with ``w_i = 0``
    (L2: ``|w_i| <= 1e-8``, the reference's threshold) do not move. Cost: ``O(d)`` per bisection step, 31 steps in
    float32 (63 in float64), no sort.
    """
    lo, hi = (-jnp.inf, jnp.inf) if clip is None else clip
    dtype = t.dtype
    c = jnp.dot(w, t) - b
    sgn = jnp.where(c >= 0, 1.0, -1.0).astype(dtype)
    w, c = w * sgn, c * sgn
    aw = jnp.abs(w)
    zero = aw <= (1e-8 if norm == "l2" else 0.0)
    cap = jnp.where(w > 0, t - lo, hi - t)
    cap = jnp.maximum(jnp.where(zero, 0.0, cap), 0.0)
    safe_aw = jnp.where(zero, 1.0, aw)
    a = jnp.where(zero, 0.0, w * w if norm == "l2" else aw)
    r = jnp.where(zero, jnp.inf, cap / safe_aw if norm == "l2" else cap)
    lam = jnp.where(c > 0, _breakpoint_root(a, r, c), 0.0)
    move = jnp.minimum(lam * safe_aw, cap) if norm == "l2" else jnp.minimum(lam, cap)
    return jnp.where(zero, 0.0, -jnp.sign(w) * move)


def _breakpoint_root(a: Array, r: Array, c: Array) -> Array:
    """The root of ``R(lam) = sum_i a_i min(lam, r_i) = c`` (``a >= 0``, ``c > 0``), ``inf`` when ``R`` never reaches
    ``c``.

    The reference (and our first version) sorts the breakpoints ``r`` and walks their partial sums; XLA:CPU's sort
    is a comparator loop (~28 ms for 256 x 784 numbers on this machine, two per FAB iteration, as much as the
    network's forward and backward pass). Instead: bisection on the bit pattern of ``lam`` (non-negative floats
    order like their bits), which ends at two adjacent floats ``lo < hi`` with ``R(lo) < c <= R(hi)`` after as many
    steps as the float has bits below the sign; no breakpoint lies strictly between them, so the linear piece
    through ``lo`` is known (``S = {i: r_i <= lo}``) and ``lam = (c - sum_S a_i r_i) / sum_{not S} a_i``, kept in
    ``[lo, hi]``: the exact root, up to the rounding of the sums.
    """
    dtype = r.dtype
    bits = jnp.dtype(dtype).itemsize * 8
    itype = {16: jnp.int16, 32: jnp.int32, 64: jnp.int64}[bits]
    steps = bits - 1  # the exponent and mantissa bits: halving them this often leaves adjacent floats
    finite = jnp.isfinite(r)
    reach = jnp.sum(a * jnp.where(finite, r, 0.0)) + jnp.where(jnp.any(~finite & (a > 0)), jnp.inf, 0.0)
    as_float = lambda bits: jax.lax.bitcast_convert_type(bits, dtype)  # noqa: E731
    decrease = lambda lam: jnp.sum(a * jnp.minimum(lam, r))  # noqa: E731

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        up = decrease(as_float(mid)) >= c
        return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

    top = jax.lax.bitcast_convert_type(jnp.asarray(jnp.finfo(dtype).max, dtype), itype)
    lo, hi = jax.lax.fori_loop(0, steps, halve, (jnp.zeros((), itype), top))
    lo, hi = as_float(lo), as_float(hi)
    below = r <= lo
    rest = jnp.sum(jnp.where(below, 0.0, a))
    lam = (c - jnp.sum(jnp.where(below, a * r, 0.0))) / jnp.where(rest > 0, rest, 1.0)
    lam = jnp.where(rest > 0, jnp.clip(lam, lo, hi), hi)
    return jnp.where(reach >= c, lam, jnp.inf)


class _FabStatic(NamedTuple):
    norm: str
    targeted: bool
    alpha_max: float
    eta: float
    beta: float
    clip: Clip


def _fab_machine(logits_fn, x0, ys, aux, static: _FabStatic):
    """FAB's pieces for one run: aux = (eps, targets, random_start flag)."""
    eps, targets, random_start = aux
    norm, clip = static.norm, static.clip
    n, dtype = x0.shape[0], x0.dtype
    flat0 = x0.reshape(n, -1)
    lo, hi = (-jnp.inf, jnp.inf) if clip is None else clip
    big = jnp.asarray(1e10, dtype)
    proj = jax.vmap(lambda t, w, b: project_hyperplane(t, w, b, norm=norm, clip=clip))

    def linearised(x):
        """Per example: the chosen class's logit difference to the label, and its input gradient (flat)."""
        logits, vjp = jax.vjp(logits_fn, x)
        k = logits.shape[-1]
        onehot_y = jax.nn.one_hot(ys, k, dtype=dtype)
        if static.targeted:
            ct = jax.nn.one_hot(targets, k, dtype=dtype) - onehot_y
            df = jnp.sum(logits * ct, axis=-1)
            return df, vjp(ct)[0].reshape(n, -1)
        jac = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, logits.shape))[0])(jnp.eye(k, dtype=dtype))  # (K, B, ...)
        jac = jnp.moveaxis(jac, 0, 1).reshape(n, k, -1)
        z_y = jnp.sum(logits * onehot_y, axis=-1, keepdims=True)
        g_y = jnp.einsum("bk,bkd->bd", onehot_y, jac)[:, None]
        df = jnp.where(onehot_y > 0, big, logits - z_y)
        dg = jac - g_y
        dual = jnp.sum(jnp.abs(dg), -1) if norm == "linf" else jnp.sqrt(jnp.sum(dg * dg, -1))
        j = jnp.argmin(jnp.abs(df) / (1e-12 + dual), axis=-1)
        return jnp.take_along_axis(df, j[:, None], 1)[:, 0], jnp.take_along_axis(dg, j[:, None, None], 1)[:, 0]

    def start(key):
        if norm == "linf":
            u = jax.random.uniform(key, x0.shape, dtype, -1.0, 1.0)
        else:
            u = jax.random.normal(key, x0.shape, dtype)
        un = lp_norm(u, norm)
        x_rand = jnp.clip(x0 + per_example(0.5 * eps / un, u) * u, lo, hi)
        x1 = jnp.where(random_start, x_rand, x0)
        return dict(x=x1, adv=x0, res=jnp.full((n,), big))

    def body(_, s):
        x1 = s["x"]
        df, w = linearised(x1)
        b = -df + jnp.sum(w * x1.reshape(n, -1), axis=-1)
        d1 = proj(x1.reshape(n, -1), w, b)
        d2 = proj(flat0, w, b)
        a1 = jnp.maximum(lp_norm(d1, norm), 1e-8)
        a2 = jnp.maximum(lp_norm(d2, norm), 1e-8)
        alpha = jnp.clip(a1 / (a1 + a2), 0.0, static.alpha_max)[:, None]
        x_new = ((x1.reshape(n, -1) + static.eta * d1) * (1 - alpha) + (flat0 + static.eta * d2) * alpha)
        x_new = jnp.clip(x_new, lo, hi).reshape(x0.shape)
        is_adv = jnp.argmax(logits_fn(x_new), axis=-1) != ys
        t = lp_norm(x_new - x0, norm)
        closer = is_adv & (t < s["res"])
        pulled = x0 + (x_new - x0) * static.beta
        return dict(x=jnp.where(per_example(is_adv, x0), pulled, x_new),
                    adv=jnp.where(per_example(closer, x0), x_new, s["adv"]), res=jnp.where(closer, t, s["res"]))

    def outcome(s):
        return s["adv"], s["res"]

    return start, body, outcome


def _check_fab(logits_fn, xs, ys, *, norm, eps, num_steps, key, restarts, targeted, target_rank, alpha_max, eta, beta,
               clip) -> tuple[int, int]:
    check_inputs(xs, ys)
    check_norm(norm)
    check_eps_positive(eps)
    check_clip(clip)
    check_step_count(num_steps)
    restarts = check_positive_int(restarts, "restarts")
    target_rank = check_positive_int(target_rank, "target_rank")
    if key is None:
        raise ValueError("fab needs key=jax.random.key(...) (its restarts start at random points).")
    if not 0.0 <= float(alpha_max) <= 1.0 or not float(eta) >= 1.0 or not 0.0 < float(beta) < 1.0:
        raise ValueError(f"fab needs 0 <= alpha_max <= 1, eta >= 1 and 0 < beta < 1, got alpha_max={alpha_max!r}, "
                         f"eta={eta!r}, beta={beta!r} (the reference's: {FAB_ALPHA_MAX}, {FAB_ETA}, {FAB_BETA}).")
    k = num_classes(logits_fn, xs)
    if k < 2 or targeted and target_rank > k - 1:
        raise ValueError(f"fab: target_rank={target_rank} exceeds the {k - 1} non-label classes of the model."
                         if k >= 2 else "fab needs a model with at least 2 classes.")
    return restarts, target_rank


def _fab_run(runner, logits_fn, xs, ys, *, norm, eps, key, num_steps, restarts, targeted, target_rank, alpha_max,
             eta, beta, clip, random_start=None):
    """Shared by :func:`fab` and :func:`fab_stepwise`: ``runner(aux, key) -> (adv, res)`` runs one restart."""
    ys = ys.astype(jnp.int32)
    eps = jnp.asarray(eps, xs.dtype)
    clean = logits_fn(xs)
    targets = target_classes(clean, ys, target_rank) if targeted else ys
    x_adv, fooled = xs, jnp.argmax(clean, axis=-1) != ys
    for r in range(restarts):
        rand = r > 0 if random_start is None else bool(random_start)
        adv, res = runner((eps, targets, jnp.asarray(rand)), jax.random.fold_in(key, r))
        success = (jnp.argmax(logits_fn(adv), axis=-1) != ys) & (res <= eps) & ~fooled
        x_adv = jnp.where(per_example(success, xs), adv, x_adv)
        fooled = fooled | success
    return x_adv


def fab(
    logits_fn: LogitsFn,
    xs: Array,
    ys: Array,
    *,
    norm: str = "linf",
    eps: float,
    key: PRNGKey,
    num_steps: int = 100,
    restarts: int = 1,
    targeted: bool = False,
    target_rank: int = 1,
    alpha_max: float = FAB_ALPHA_MAX,
    eta: float = FAB_ETA,
    beta: float = FAB_BETA,
    clip: Clip = (0.0, 1.0),
    unroll: int | bool | None = None,
) -> Array:
    """FAB (see the module docstring): per example the closest misclassified point found within ``eps`` of ``xs``,
    else ``xs`` itself (also where ``xs`` is already misclassified). Traceable (``lax.fori_loop``); on CPU with
    convolutional networks prefer :func:`fab_stepwise`.

    ``targeted``: FAB-T, crossing only the boundary to the class with the ``target_rank``-th largest non-label
    logit at the clean input (AutoAttack runs ranks 1..9). ``restarts``: the first run starts at ``xs``, later ones
    at a random point at distance ``eps / 2``; each example keeps its first success (``fold_in(key, r)``).
    Cost: ``restarts * num_steps * (2 forward + K backward)`` passes (targeted: ``1`` backward), plus
    ``restarts + 1`` forward passes.
    """
    restarts, target_rank = _check_fab(logits_fn, xs, ys, norm=norm, eps=eps, num_steps=num_steps, key=key,
                                       restarts=restarts, targeted=targeted, target_rank=target_rank,
                                       alpha_max=alpha_max, eta=eta, beta=beta, clip=clip)
    static = _FabStatic(norm, bool(targeted), float(alpha_max), float(eta), float(beta),
                        None if clip is None else tuple(clip))
    ys = ys.astype(jnp.int32)

    def runner(aux, k):
        return run_traced(_fab_machine, logits_fn, xs, ys, aux, static, k, num_steps, unroll)

    return _fab_run(runner, logits_fn, xs, ys, norm=norm, eps=eps, key=key, num_steps=num_steps, restarts=restarts,
                    targeted=targeted, target_rank=target_rank, alpha_max=alpha_max, eta=eta, beta=beta, clip=clip)


def fab_stepwise(
    logits_fn: Callable,
    xs: Array,
    ys: Array,
    *,
    params=None,
    norm: str = "linf",
    eps: float,
    key: PRNGKey,
    num_steps: int = 100,
    restarts: int = 1,
    targeted: bool = False,
    target_rank: int = 1,
    alpha_max: float = FAB_ALPHA_MAX,
    eta: float = FAB_ETA,
    beta: float = FAB_BETA,
    clip: Clip = (0.0, 1.0),
    segment: int = SEGMENT,
    random_start: bool | None = None,
) -> Array:
    """:func:`fab` driven from the host in compiled segments of ``segment`` unrolled iterations (the same values;
    not traceable), for ``logits_fn(params, xs)`` with ``params`` an argument of the compiled programs (or
    ``logits_fn(xs)`` with ``params=None``). Compiled pieces are cached per function and setting.
    ``random_start``: None (default) starts the first restart at ``xs`` and later ones at random points; True or
    False forces it for every restart (the AutoAttack cascade runs restart ``r`` as its own call)."""
    fn, p = as_two_arg(logits_fn, params)
    bound = lambda x: fn(p, x)  # noqa: E731
    restarts, target_rank = _check_fab(bound, xs, ys, norm=norm, eps=eps, num_steps=num_steps, key=key,
                                       restarts=restarts, targeted=targeted, target_rank=target_rank,
                                       alpha_max=alpha_max, eta=eta, beta=beta, clip=clip)
    segment = check_positive_int(segment, "segment")
    static = _FabStatic(norm, bool(targeted), float(alpha_max), float(eta), float(beta),
                        None if clip is None else tuple(clip))
    ys = jnp.asarray(ys, jnp.int32)

    def runner(aux, k):
        return drive_segments(_fab_machine, fn, static, p, xs, ys, aux, k, num_steps, segment)

    predict = jitted(fn)
    return _fab_run(runner, lambda x: predict(p, x), xs, ys, norm=norm, eps=eps, key=key, num_steps=num_steps,
                    restarts=restarts, targeted=targeted, target_rank=target_rank, alpha_max=alpha_max, eta=eta,
                    beta=beta, clip=clip, random_start=random_start)
