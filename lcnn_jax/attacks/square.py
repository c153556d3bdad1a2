"""The Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): random search, no gradients.

A score-based black-box attack: it only reads the logits, so it is blind to gradient masking (a network whose
gradients are useless, e.g. through ``stop_gradient``, a shattered or saturated activation, is still attacked). Per
example it minimises the margin ``m(x) = z_y(x) - max_{j != y} z_j(x)`` (misclassified when ``m <= 0``):

* **start** (L-inf): ``x0 + eps * s`` with one random sign per (column, channel), i.e. vertical stripes; (L2): a grid
  of ``h // 5``-sized tiles, each holding the centred pattern ``eta(s)`` (two opposite halves of nested squares
  weighted ``1 / (k + 1)^2``, unit L2 norm, transposed at random) with a random sign per channel, scaled to norm
  ``eps``; then into the box;
* **iteration** ``i``: the square side ``s_i = round(sqrt(p_i * h * w))`` (L-inf: at least 1; L2: at least 3 and odd;
  at most ``min(h, w)``) with ``p_i`` the reference's schedule, ``p_init = 0.8`` halved at queries 10, 50, 200, 500,
  1000, 2000, 4000, 6000, 8000 (``rescale_schedule=True`` maps those onto ``num_queries`` as if it were 10000).
  L-inf: one random window (the same for the whole batch) gets ``+-2 eps`` per channel (one random sign per channel,
  shared too), then back into the ball and the box. L2: the perturbation in a window is replaced by ``eta(s)`` times a
  random sign per (example, channel) plus its old content, rescaled to use the norm budget left, a second window is
  emptied, and the whole perturbation is rescaled to norm ``eps``.
* the proposal is kept where it lowers the margin or misclassifies; examples already misclassified stop.

Settings and schedule are the reference code's (fra31/auto-attack ``square.py``, as AutoAttack calls it:
``p_init = 0.8``, 5000 queries, no rescaling, one restart). Window corners are drawn in ``[0, h - s)``, as the
reference's ``random_int`` does (the last position is never drawn). Images are (B, H, W, C), channels last.

Cost: ``1 + restarts * num_queries`` forward passes, no backward pass. The query loop is compiled in chunks with a
static square side (the side only changes at the schedule's ten breakpoints), so each side compiles once.

Example::

    import jax, jax.numpy as jnp
    from lcnn_jax import attacks
    w = jax.random.normal(jax.random.key(0), (64, 10))
    logits_fn = lambda xs: xs.reshape(len(xs), -1) @ w
    xs = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))
    ys = jnp.argmax(logits_fn(xs), axis=-1)
    x_adv = attacks.square(logits_fn, xs, ys, norm="linf", eps=0.1, key=jax.random.key(2), num_queries=300)
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcnn_jax.attacks.base import (Clip, LogitsFn, as_two_arg, check_clip, check_eps_positive, check_inputs,
                                   check_norm, check_step_count, jitted, num_classes, per_example)
from lcnn_jax.autodiff import check_positive_int
from lcnn_jax.types import Array, PRNGKey

__all__ = ["SQUARE_P_INIT", "SQUARE_QUERIES", "SQUARE_CHUNK", "square_p", "square_sizes", "square", "square_stepwise"]

#: The reference's initial fraction of pixels changed per query, and AutoAttack's query budget.
SQUARE_P_INIT, SQUARE_QUERIES = 0.8, 5000
#: Queries per compiled call of :func:`square_stepwise` (a rolled loop of forward passes).
SQUARE_CHUNK = 250


def square_p(i: int, num_queries: int, p_init: float = SQUARE_P_INIT, rescale_schedule: bool = False) -> float:
    """The reference's fraction ``p`` of the image that the square covers at query ``i`` (0-based)."""
    it = int(i / num_queries * 10000) if rescale_schedule else int(i)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def square_sizes(num_queries: int, shape, norm: str, p_init: float = SQUARE_P_INIT,
                 rescale_schedule: bool = False) -> list:
    """``[(side, first, count), ...]``: runs of consecutive queries with the same square side, for images of
    ``shape = (h, w, c)``."""
    h, w = shape[0], shape[1]
    out = []
    for i in range(int(num_queries)):
        side = int(round(math.sqrt(square_p(i, num_queries, p_init, rescale_schedule) * h * w)))
        if norm == "linf":
            side = max(side, 1)
        else:
            side = max(side, 3)
            side += side % 2 == 0
        side = min(side, h, w)
        if out and out[-1][0] == side:
            out[-1][2] += 1
        else:
            out.append([side, i, 1])
    return [tuple(r) for r in out]


def _rectangles(rows: int, cols: int) -> np.ndarray:
    """Nested rectangles around the centre, ring k weighted 1 / (k + 1)^2, unit L2 norm (the reference's
    ``eta_rectangles``)."""
    delta = np.zeros((rows, cols))
    r0, c0 = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        delta[max(r0 - k, 0):min(r0 - k + 2 * k + 1, rows), max(c0 - k, 0):min(c0 - k + 2 * k + 1, cols)] += \
            1.0 / (k + 1) ** 2
    n = np.sqrt((delta ** 2).sum())
    return delta / n if n > 0 else delta


def _eta(s: int) -> np.ndarray:
    """The L2 square pattern of side s: the top half positive rectangles, the bottom half negative, unit norm."""
    delta = np.zeros((s, s))
    if s // 2 > 0:
        delta[: s // 2] = _rectangles(s // 2, s)
    delta[s // 2:] = -_rectangles(s - s // 2, s)
    return delta / np.sqrt((delta ** 2).sum())


@functools.lru_cache(maxsize=32)
def _l2_tiling(h: int, w: int) -> tuple:
    """The reference's L2 start as static maps: ``h // 5``-sized tiles from ``(h - 5 s) // 2`` (those cut by the
    border keep their top-left part). Returns per pixel the tile index (-1 outside every tile) and the value of
    ``eta(s)`` there, as is and transposed."""
    s = max(h // 5, 1)
    start = (h - s * 5) // 2
    pattern = _eta(s)
    tile_id = -np.ones((h, w), np.int64)
    values, values_t = np.zeros((h, w)), np.zeros((h, w))
    t = 0
    for vh in range(start, start + s * (h // s), s):
        for vw in range(start, start + s * (w // s), s):
            if vh >= h or vw >= w:
                continue
            rh, rw = min(s, h - vh), min(s, w - vw)
            tile_id[vh:vh + rh, vw:vw + rw] = t
            values[vh:vh + rh, vw:vw + rw] = pattern[:rh, :rw]
            values_t[vh:vh + rh, vw:vw + rw] = pattern.T[:rh, :rw]
            t += 1
    return tile_id, values, values_t


def _margin(logits, ys):
    onehot = jax.nn.one_hot(ys, logits.shape[-1], dtype=bool)
    z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    return z_y - jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)


class _SquareStatic(NamedTuple):
    norm: str
    clip: Clip


def _box(x, clip):
    return x if clip is None else jnp.clip(x, clip[0], clip[1])


def _l2n(a, axes):
    return jnp.sqrt(jnp.sum(a * a, axis=axes, keepdims=True))


def _square_init(logits_fn, x0, ys, eps, key, static: _SquareStatic):
    n, h, w, c = x0.shape
    dtype = x0.dtype
    if static.norm == "linf":
        signs = jnp.sign(jax.random.uniform(key, (n, 1, w, c), dtype, -1.0, 1.0))
        x_best = _box(x0 + eps * signs, static.clip)
    else:
        tile_id, values, values_t = _l2_tiling(h, w)
        num_tiles = int(tile_id.max()) + 1
        k_flip, k_sign = jax.random.split(key)
        flip = jax.random.uniform(k_flip, (num_tiles,)) > 0.5  # the reference transposes each tile's pattern at random
        signs = jnp.sign(jax.random.uniform(k_sign, (n, num_tiles, c), dtype, -1.0, 1.0))
        ids = jnp.asarray(np.maximum(tile_id, 0))
        pattern = jnp.where(flip[ids], jnp.asarray(values_t, dtype), jnp.asarray(values, dtype))  # (h, w)
        delta = jnp.where(jnp.asarray(tile_id >= 0)[None, :, :, None], pattern[None, :, :, None] * signs[:, ids, :],
                          0.0)
        x_best = _box(x0 + eps * delta / (_l2n(delta, (1, 2, 3)) + 1e-12), static.clip)
    margin = _margin(logits_fn(x_best), ys)
    return dict(x_best=x_best, margin=margin, loss=margin, queries=jnp.ones((n,), jnp.int32))


def _square_steps(logits_fn, x0, ys, eps, key, state, first, count, side: int, static: _SquareStatic):
    """``count`` queries from query ``first`` with square side ``side`` (static), as a rolled loop."""
    n, h, w, c = x0.shape
    dtype = x0.dtype
    pattern = jnp.asarray(_eta(side), dtype) if static.norm == "l2" else None

    def body(j, st):
        k = jax.random.fold_in(key, first + j)
        k1, k2, k3, k4 = jax.random.split(k, 4)
        vh, vw = jax.random.randint(k1, (2,), 0, max(h - side, 1)), jax.random.randint(k2, (2,), 0, max(w - side, 1))
        x_best = st["x_best"]
        if static.norm == "linf":
            signs = jnp.sign(jax.random.uniform(k3, (c,), dtype, -1.0, 1.0))
            patch = jnp.broadcast_to(2.0 * eps * signs, (n, side, side, c))
            x_new = lax.dynamic_update_slice(x_best, lax.dynamic_slice(x_best, (0, vh[0], vw[0], 0), (n, side, side, c))
                                             + patch, (0, vh[0], vw[0], 0))
            x_new = _box(jnp.clip(x_new, x0 - eps, x0 + eps), static.clip)
        else:
            delta = x_best - x0
            rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]

            def window(a, b):
                return ((rows >= a) & (rows < a + side) & (cols >= b) & (cols < b + side))[None, :, :, None]

            union = window(vh[0], vw[0]) | window(vh[1], vw[1])
            old = lax.dynamic_slice(delta, (0, vh[0], vw[0], 0), (n, side, side, c))
            norm_image = _l2n(delta, (1, 2, 3))
            norm_union = _l2n(jnp.where(union, delta, 0.0), (1, 2))
            tile = jnp.where(jax.random.uniform(k4) > 0.5, pattern.T, pattern)[None, :, :, None]
            sign = jnp.sign(jax.random.uniform(k3, (n, 1, 1, c), dtype, -1.0, 1.0))
            new = tile * sign + old / (1e-12 + _l2n(old, (1, 2)))
            budget = jnp.sqrt(jnp.maximum(eps ** 2 - norm_image ** 2, 0.0) / c + norm_union ** 2)
            new = new / (1e-12 + _l2n(new, (1, 2))) * budget
            delta = jnp.where(window(vh[1], vw[1]), 0.0, delta)
            delta = lax.dynamic_update_slice(delta, new, (0, vh[0], vw[0], 0))
            x_new = _box(x0 + eps * delta / (_l2n(delta, (1, 2, 3)) + 1e-12), static.clip)
        margin = _margin(logits_fn(x_new), ys)
        active = st["margin"] > 0
        improved = margin < st["loss"]
        accept = active & (improved | (margin <= 0))
        return dict(x_best=jnp.where(per_example(accept, x0), x_new, x_best),
                    margin=jnp.where(accept, margin, st["margin"]),
                    loss=jnp.where(active & improved, margin, st["loss"]),
                    queries=st["queries"] + active.astype(jnp.int32))

    return lax.fori_loop(0, count, body, state)


def _check_square(logits_fn, xs, ys, *, norm, eps, key, num_queries, p_init, restarts, clip) -> int:
    check_inputs(xs, ys)
    check_norm(norm)
    check_eps_positive(eps)
    check_clip(clip)
    check_step_count(num_queries, "num_queries")
    restarts = check_positive_int(restarts, "restarts")
    if key is None:
        raise ValueError("square is a random search: pass key=jax.random.key(...).")
    if xs.ndim != 4:
        raise ValueError(f"square needs images (batch, height, width, channels), got shape {xs.shape}; reshape flat "
                         f"inputs to (batch, h, w, 1) and let logits_fn flatten them.")
    if not 0.0 < float(p_init) <= 1.0:
        raise ValueError(f"p_init must be in (0, 1], got {p_init!r} (the reference's: {SQUARE_P_INIT}).")
    if num_classes(logits_fn, xs) < 2:
        raise ValueError("square needs a model with at least 2 classes.")
    return restarts


def _square_run(init, steps, predict, xs, ys, *, norm, eps, key, num_queries, p_init, restarts, rescale_schedule):
    """Shared driver: ``init(key) -> state``, ``steps(state, key, first, count, side) -> state``."""
    eps = jnp.asarray(eps, xs.dtype)
    groups = square_sizes(num_queries, xs.shape[1:], norm, p_init, rescale_schedule)
    x_adv, fooled = xs, jnp.argmax(predict(xs), axis=-1) != ys
    for r in range(restarts):
        k_init, k_steps = jax.random.split(jax.random.fold_in(key, r))
        state = init(k_init)
        for side, first, count in groups:
            state = steps(state, k_steps, first, count, side)
        success = (state["margin"] <= 0) & ~fooled
        x_adv = jnp.where(per_example(success, xs), state["x_best"], x_adv)
        fooled = fooled | success
    return x_adv


def square(
    logits_fn: LogitsFn,
    xs: Array,
    ys: Array,
    *,
    norm: str = "linf",
    eps: float,
    key: PRNGKey,
    num_queries: int = SQUARE_QUERIES,
    p_init: float = SQUARE_P_INIT,
    restarts: int = 1,
    rescale_schedule: bool = False,
    clip: Clip = (0.0, 1.0),
) -> Array:
    """The Square attack (see the module docstring): per example a misclassified point of the eps-ball (and the
    box) found by random search on the margin, else ``xs`` itself. Traceable (one rolled loop per square side).

    ``restarts``: independent searches (``fold_in(key, r)``), each example keeping its first success. Cost:
    ``restarts * (num_queries + 1) + 1`` forward passes, no gradients.
    """
    restarts = _check_square(logits_fn, xs, ys, norm=norm, eps=eps, key=key, num_queries=num_queries, p_init=p_init,
                             restarts=restarts, clip=clip)
    static = _SquareStatic(norm, None if clip is None else tuple(clip))
    ys = ys.astype(jnp.int32)
    e = jnp.asarray(eps, xs.dtype)
    return _square_run(lambda k: _square_init(logits_fn, xs, ys, e, k, static),
                       lambda st, k, first, count, side: _square_steps(logits_fn, xs, ys, e, k, st, first, count,
                                                                       side, static),
                       logits_fn, xs, ys, norm=norm, eps=eps, key=key, num_queries=num_queries, p_init=p_init,
                       restarts=restarts, rescale_schedule=rescale_schedule)


@functools.lru_cache(maxsize=64)
def _square_programs(fn, static):
    init = jax.jit(lambda p, x0, ys, eps, k: _square_init(functools.partial(fn, p), x0, ys, eps, k, static))

    @functools.partial(jax.jit, static_argnums=8, donate_argnums=5)
    def steps(p, x0, ys, eps, k, state, first, count, side):
        return _square_steps(functools.partial(fn, p), x0, ys, eps, k, state, first, count, side, static)

    return init, steps, jitted(fn)


def square_stepwise(
    logits_fn: Callable,
    xs: Array,
    ys: Array,
    *,
    params=None,
    norm: str = "linf",
    eps: float,
    key: PRNGKey,
    num_queries: int = SQUARE_QUERIES,
    p_init: float = SQUARE_P_INIT,
    restarts: int = 1,
    rescale_schedule: bool = False,
    clip: Clip = (0.0, 1.0),
    chunk: int = SQUARE_CHUNK,
) -> Array:
    """:func:`square` driven from the host: the same queries, in compiled calls of at most ``chunk`` queries (one
    program per square side, the count an argument), with ``logits_fn(params, xs)`` and ``params`` an argument
    (``params=None``: ``logits_fn(xs)``). Not traceable."""
    fn, p = as_two_arg(logits_fn, params)
    restarts = _check_square(lambda x: fn(p, x), xs, ys, norm=norm, eps=eps, key=key, num_queries=num_queries,
                             p_init=p_init, restarts=restarts, clip=clip)
    chunk = check_positive_int(chunk, "chunk")
    static = _SquareStatic(norm, None if clip is None else tuple(clip))
    init, steps, predict = _square_programs(fn, static)
    ys = jnp.asarray(ys, jnp.int32)
    e = jnp.asarray(eps, xs.dtype)

    def run_steps(st, k, first, count, side):
        for f in range(first, first + count, chunk):
            st = steps(p, xs, ys, e, k, st, jnp.asarray(f, jnp.int32), jnp.asarray(min(chunk, first + count - f)),
                       side)
        return st

    return _square_run(lambda k: init(p, xs, ys, e, k), run_steps, lambda x: predict(p, x), xs, ys, norm=norm,
                       eps=eps, key=key, num_queries=num_queries, p_init=p_init, restarts=restarts,
                       rescale_schedule=rescale_schedule)
