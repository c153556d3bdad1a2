"""Shared pieces of the attacks: argument checks, the box and the eps-ball projections, chunking, binding
``params`` and the host driver of compiled segments (:func:`drive_segments`).

Every attack of :mod:`lcnn_jax.attacks` takes ``logits_fn(xs) -> logits`` (B, K), a batch of inputs in the box
``clip`` (default ``(0, 1)``) and integer labels; the names here are public within the package so that each attack
module uses the same checks and the same projection.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcnn_jax.autodiff import check_example_batch, check_labels, safe_norm
from lcnn_jax.loops import HOST_SEGMENT, auto_unroll
from lcnn_jax.types import Array

LogitsFn = Callable[[Array], Array]
Clip = Optional[Tuple[float, float]]

def cross_entropy(logits: Array, ys: Array) -> Array:
    """Per-example softmax cross-entropy ``logsumexp(z) - z_y``, shape (B,)."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, ys[:, None].astype(jnp.int32), -1)[:, 0]


def check_inputs(xs: Array, ys: Array) -> None:
    check_example_batch(xs)
    check_labels(xs, ys)
    if jnp.ndim(ys) != 1 or not jnp.issubdtype(jnp.result_type(ys), jnp.integer):
        raise ValueError(
            f"ys must be integer class labels of shape (batch,), got {jnp.result_type(ys)} {jnp.shape(ys)}."
        )


def check_nonneg(value, name: str) -> None:
    # Traced values (e.g. eps swept under vmap) cannot be inspected; concrete ones are validated.
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value)
    if arr.ndim != 0 or not np.isfinite(arr) or arr < 0:
        raise ValueError(f"{name} must be a finite non-negative scalar, got {value!r}.")


def check_clip(clip: Clip) -> None:
    if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
        raise ValueError(f"clip must be None or a pair (low, high) with low < high, got {clip!r}.")


def box(x: Array, clip: Clip) -> Array:
    return x if clip is None else jnp.clip(x, clip[0], clip[1])


def per_example(a: Array, like: Array) -> Array:
    """Reshape a (B,) array to broadcast against (B, ...)."""
    return a.reshape((-1,) + (1,) * (like.ndim - 1))


def input_grad(logits_fn: LogitsFn, xs: Array, ys: Array) -> Array:
    # The gradient of the summed loss holds each example's own gradient (examples are independent).
    return jax.grad(lambda x: jnp.sum(cross_entropy(logits_fn(x), ys)))(xs)


def attack_unroll(num_steps: int, unroll: int | bool | None = None) -> int | bool:
    """The ``unroll`` of an attack's step loop: the user's choice if given, else the estimators' rule
    (:func:`lcnn_jax.loops.auto_unroll`): fully unrolled for at most ``MAX_AUTO_UNROLL`` (20) steps, a rolled
    loop beyond. Measured on XLA:CPU (``experiments/bench_attack_unroll.py``: PGD-Linf, 20 steps, small CNN at width
    0.5, 512 images, weights as arguments):
    rolled 16.1 s, 5 steps per iteration 16.3 s, fully unrolled 5.0 s, for 1.4 / 1.6 / 3.2 s of compilation; a
    partial unroll does not help, so long attacks (APGD's 100 steps) stay rolled to keep compilation bounded."""
    full = auto_unroll(int(num_steps), unroll)
    return 1 if full is False else full


def project(x: Array, x0: Array, eps: Array, norm: str, clip: Clip) -> Array:
    """Onto the eps-ball around x0, then the box. The box step keeps the point in the ball: x0 is in
    the box, and clipping moves each coordinate towards it, so no |x_i - x0_i| grows."""
    if norm == "linf":
        x = jnp.clip(x, x0 - eps, x0 + eps)
    else:
        d = x - x0
        n = safe_norm(d.reshape(d.shape[0], -1), axis=1)
        factor = jnp.where(n > eps, eps / jnp.where(n > 0, n, 1.0), 1.0)
        x = x0 + d * per_example(factor, d)
    return box(x, clip)


def chunks(n: int, batch_size: int | None):
    size = n if batch_size is None else batch_size
    for start in range(0, n, size):
        yield start, min(start + size, n), size


def pad(a: Array, size: int) -> Array:
    """Pad the leading axis to ``size`` by repeating the first row, so every chunk has one shape."""
    short = size - a.shape[0]
    return a if short == 0 else jnp.concatenate([a, jnp.repeat(a[:1], short, axis=0)], axis=0)


NO_PARAMS = object()


def bind(logits_fn: Callable, params) -> Callable[[Array], Array]:
    """``logits_fn`` itself, or with ``params`` given, ``xs -> logits_fn(params, xs)``."""
    return logits_fn if params is NO_PARAMS else functools.partial(logits_fn, params)



def check_step_count(num_steps, name: str = "num_steps") -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {num_steps!r}.")



# ------------------------------------------------------------------------------------------------
# Attacks as machines: start / body / outcome, run traced (lax.fori_loop) or from the host in compiled segments
# ------------------------------------------------------------------------------------------------

#: Iterations per compiled segment when an attack is driven from the host (:func:`drive_segments`).
SEGMENT = HOST_SEGMENT  # lcnn_jax.loops decides it for every host-driven loop


@functools.lru_cache(maxsize=64)
def two_arg(logits_fn: Callable) -> Callable:
    """``(params, xs) -> logits_fn(xs)``: a closure ``logits_fn`` in the ``logits_fn(params, xs)`` convention of the
    host-driven attacks (cached, so the same function gives the same wrapper and its compiled programs are reused)."""
    return lambda _params, xs: logits_fn(xs)


@functools.lru_cache(maxsize=64)
def jitted(fn: Callable) -> Callable:
    """``jax.jit(fn)``, one per function object (so repeated calls of a driver reuse its compiled programs)."""
    return jax.jit(fn)


def as_two_arg(logits_fn: Callable, params) -> tuple:
    """``(fn, params)`` with ``fn(params, xs)`` the logits, for ``params`` given (None or ``NO_PARAMS``: none)."""
    if params is None or params is NO_PARAMS:
        return two_arg(logits_fn), ()
    return logits_fn, params


def run_traced(build: Callable, logits_fn: LogitsFn, x0: Array, ys: Array, aux, static, key, num_steps: int,
               unroll=None):
    """Run a machine ``build(logits_fn, x0, ys, aux, static) -> (start(key), body(i, state), outcome(state))``
    inside the caller's trace: ``outcome(fori_loop(0, num_steps, body, start(key)))``."""
    start, body, outcome = build(logits_fn, x0, ys, aux, static)
    state = lax.fori_loop(0, int(num_steps), body, start(key), unroll=attack_unroll(num_steps, unroll))
    return outcome(state)


@functools.lru_cache(maxsize=128)
def segment_programs(build: Callable, logits_fn: Callable, static) -> tuple:
    """The jitted ``start``, ``advance`` (``count`` unrolled steps from iteration ``first``) and ``finish`` of one
    machine for ``logits_fn(params, xs)`` (cached per function and static setting: another network of the same
    architecture, another radius or another batch of the same shape compiles nothing)."""

    def machine(params, x0, ys, aux):
        return build(functools.partial(logits_fn, params), x0, ys, aux, static)

    @jax.jit
    def start(params, x0, ys, aux, key):
        return machine(params, x0, ys, aux)[0](key)

    @functools.partial(jax.jit, static_argnums=5, donate_argnums=4)
    def advance(params, x0, ys, aux, state, count, first):
        body = machine(params, x0, ys, aux)[1]
        return lax.fori_loop(0, count, lambda j, st: body(first + j, st), state, unroll=True)

    @jax.jit
    def finish(params, x0, ys, aux, state):
        return machine(params, x0, ys, aux)[2](state)

    return start, advance, finish


def drive_segments(build: Callable, logits_fn: Callable, static, params, x0: Array, ys: Array, aux, key,
                   num_steps: int, segment: int = SEGMENT):
    """The same computation as :func:`run_traced`, driven from the host: ``start``, then ``ceil(num_steps /
    segment)`` compiled calls of ``segment`` unrolled steps (the state stays on the device), then ``outcome``.
    Why: XLA:CPU runs a convolution's backward pass several times slower inside a rolled ``while`` loop than outside
    one (see :func:`lcnn_jax.attacks.apgd_stepwise`), and unrolling a hundred steps compiles for minutes."""
    start, advance, finish = segment_programs(build, logits_fn, static)
    state = start(params, x0, ys, aux, key)
    for first in range(0, int(num_steps), segment):
        state = advance(params, x0, ys, aux, state, min(segment, int(num_steps) - first), jnp.asarray(first, jnp.int32))
    return finish(params, x0, ys, aux, state)


def check_norm(norm) -> None:
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")


def check_eps_positive(eps) -> None:
    if isinstance(eps, jax.core.Tracer):
        return
    arr = np.asarray(eps)
    if arr.ndim != 0 or not np.isfinite(arr) or arr <= 0:
        raise ValueError(f"eps must be a finite positive scalar (the radius of the ball), got {eps!r}.")


def num_classes(logits_fn: LogitsFn, xs: Array) -> int:
    """The number of classes of ``logits_fn`` (from its output shape, no computation), checking the shape."""
    out_shape = jax.eval_shape(logits_fn, xs).shape
    if len(out_shape) != 2 or out_shape[0] != xs.shape[0]:
        raise ValueError(f"logits_fn(xs) must return logits of shape (batch, classes), got {out_shape}.")
    return int(out_shape[1])


def lp_norm(d: Array, norm: str) -> Array:
    """Per-example L-inf or L2 norm of a batch (B, ...) -> (B,)."""
    flat = d.reshape(d.shape[0], -1)
    return jnp.max(jnp.abs(flat), axis=1) if norm == "linf" else jnp.sqrt(jnp.sum(flat * flat, axis=1))
