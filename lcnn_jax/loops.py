"""How loops run on each backend: the ONE place that decides between a rolled loop, an unrolled one and a loop
driven from the host, and how a sweep's K members share one compiled step.

Why this module exists: the fastest way to run the same loop differs by backend, and the difference is large.

* **Short loops are unrolled** (:func:`auto_unroll`). XLA:CPU leaves a convolution's backward pass inside a
  ``while`` loop on a slow path (about 3x slower per step: ``experiments/bench_attack_unroll.py``), and an
  unrolled loop of a few steps compiles quickly; beyond :data:`MAX_AUTO_UNROLL` iterations a rolled loop keeps
  the compile time bounded. Power iterations, Lanczos, Hutchinson and the attacks all ask here.
* **Long attack loops on convolutional nets run from the host** in compiled segments
  (:func:`lcnn_jax.attacks.apgd_stepwise`, :data:`HOST_SEGMENT` steps per compiled call), for the same reason.
* **Some values are stored once** (:func:`materialize`). XLA:CPU fuses a value's producers (batch norms,
  residual sums, the nonlinearity) into every consumer, the strided transposes of the weight-gradient
  convolutions included, where a ResNet's whole residual chain is recomputed with a poor memory access pattern (a
  softplus ResNet-18 step paid about a fifth more than a ReLU one for it). The plain ResNet block's input passes
  through :func:`materialize`, which XLA cannot fuse across (``experiments/bench_resnet.py``'s ``_fused`` rows: the
  library without it). The attacks store each iterate and gradient: unrolled, XLA would otherwise fuse every
  earlier step's update into each later step (with first-layer shifted sums, PGD-20 ran 1.5x slower); the input of
  a first-layer convolution computed as shifted sums (:mod:`lcnn_jax.nn.conv`) is stored for the same reason. Not
  everywhere: each stored value ends a fusion and can cost more than it saves (the LCNN block, or a small CNN's
  activations, ran slower with it), so it goes where a benchmark shows a gain.
* **A sweep's members** (:func:`member_loop`) are ``jax.vmap``-ped on accelerators and for dense nets; on the
  CPU a member-batched convolution becomes one grouped convolution, which XLA:CPU runs 3-4x slower per member
  than K plain ones, so there the members of a convolutional net are unrolled inside the one compiled step
  (``experiments/bench_sweep.py`` prints the ratios; ``experiments/results/loops.md`` keeps the figures).

Every public function that runs such a loop keeps an explicit override (``unroll=``, ``host_loop=``,
``member_loop=``); left at its default, the choice made here applies. Measured figures live in
``experiments/results/``, not in docstrings, so they cannot go stale silently.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.errors import ConfigError

__all__ = ["MAX_AUTO_UNROLL", "HOST_SEGMENT", "MATERIALIZE", "materialize", "MEMBER_LOOPS", "MAX_UNROLLED_MEMBERS",
           "auto_unroll", "default_platform", "uses_convolution", "check_member_loop", "member_loop", "is_traced",
           "host_loop"]

#: Loops of at most this many iterations are unrolled by default (see :func:`auto_unroll`). Tests set it to 0,
#: since they compile unoptimised and unrolling only multiplies their compile time.
MAX_AUTO_UNROLL = 20

#: Steps per compiled call of a host-driven attack loop (APGD on the host, ``attacks.apgd_stepwise``).
HOST_SEGMENT = 5

#: Whether :func:`materialize` stores its value on the CPU (read while tracing; ``bench_resnet.py`` turns it off
#: for its ``_fused`` rows, to show the difference in one run).
MATERIALIZE = True

#: How the K members of one compiled sweep step are computed: ``"vmap"`` (``jax.vmap`` over the member axis),
#: ``"unroll"`` (K copies of the single-model step inside the one program: K x the compile time; ``lax.map``
#: would compile once but puts the backward convolutions inside a loop, on XLA:CPU's slow path) or ``"auto"``
#: (:func:`member_loop`).
MEMBER_LOOPS = ("auto", "vmap", "unroll")

#: ``"auto"`` unrolls at most this many members (the compile time grows with K).
MAX_UNROLLED_MEMBERS = 16


def auto_unroll(num_iters: int, unroll: int | bool | None = None) -> int | bool:
    """The ``unroll`` a loop of ``num_iters`` iterations gets: the caller's choice if given, else a full unroll
    for short loops (``num_iters <= MAX_AUTO_UNROLL``) and a rolled loop beyond (bounded compilation time)."""
    return (num_iters <= MAX_AUTO_UNROLL) if unroll is None else unroll


def _stored(x):
    # A while loop that runs zero times, which XLA cannot see (its trip count hides behind an optimization barrier),
    # so it neither removes the loop nor fuses across it. lax.optimization_barrier on x itself would say this
    # directly, but XLA:CPU expands barriers before it fuses. The count depends on no data, so a sharded x needs no
    # collective; the body (x + 0 on its first iteration) would return x anyway.
    n = jax.lax.optimization_barrier(jnp.int32(0))
    return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] + c[0].astype(c[1].dtype)),
                              (jnp.int32(0), x))[1]


@jax.custom_jvp
def _materialized(x):
    return jax.lax.platform_dependent(x, cpu=_stored, default=lambda v: v)


@_materialized.defjvp
def _materialized_jvp(primals, tangents):
    return _materialized(primals[0]), tangents[0]


def materialize(x):
    """``x`` unchanged, computed once and stored on the CPU instead of recomputed inside each consumer.

    The identity in value and in every derivative (the tangent passes through untouched, so gradients, HVPs and
    higher derivatives are those of the function without it), under ``jit``, ``vmap`` and ``grad``. On XLA:CPU
    it ends fusion: the consumers read the stored value. On other platforms, or with :data:`MATERIALIZE` off,
    it is nothing at all. Why: see the module docstring (some values are stored once).

    Cost: one write of ``x`` (and a loop that runs zero times) on the CPU; none elsewhere."""
    if not MATERIALIZE or not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.inexact) or x.size == 0:
        return x
    return _materialized(x)


def default_platform(devices=None) -> str:
    """The platform (``"cpu"``, ``"gpu"``, ``"tpu"``) of the first of ``devices`` (default: JAX's default
    devices)."""
    devices = jax.devices() if devices is None else devices
    return np.asarray(devices).reshape(-1)[0].platform


def _jaxprs_in(value):
    """The jaxprs held by one equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _jaxprs_in(v)


def uses_convolution(fn: Callable, *args) -> bool:
    """Whether ``fn(*args)`` (arrays or ``jax.ShapeDtypeStruct``; traced, not run) performs a convolution
    anywhere, inside ``jit``/``scan``/``cond``/custom-derivative bodies included. Cost: one trace of ``fn``."""
    todo = [jax.make_jaxpr(fn)(*args).jaxpr]
    while todo:
        jaxpr = todo.pop()
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                return True
            for v in eqn.params.values():
                todo.extend(_jaxprs_in(v))
    return False


def check_member_loop(member_loop) -> None:
    """Raise :class:`~lcnn_jax.errors.ConfigError` for a ``member_loop`` outside :data:`MEMBER_LOOPS`."""
    if member_loop not in MEMBER_LOOPS:
        raise ConfigError(f"member_loop={member_loop!r} is unknown; use one of {MEMBER_LOOPS}.")


def member_loop(requested: str, *, platform: str, member_shards: int, num_members: int, convolves) -> str:
    """``"vmap"`` or ``"unroll"`` for a sweep step. ``requested`` other than ``"auto"`` is returned as is;
    ``"auto"`` unrolls on the CPU when the members are not split over devices, ``num_members <=
    MAX_UNROLLED_MEMBERS`` and the step convolves (``convolves``: a bool, or a zero-argument callable called only
    when needed, since tracing costs a little); every other case is vmapped.

    Raises:
      ConfigError: an unknown ``requested``."""
    check_member_loop(requested)
    if requested != "auto":
        return requested
    if platform != "cpu" or member_shards != 1 or num_members > MAX_UNROLLED_MEMBERS:
        return "vmap"
    return "unroll" if (convolves() if callable(convolves) else convolves) else "vmap"


def is_traced(tree) -> bool:
    """Whether any leaf of ``tree`` is a tracer (the caller runs inside ``jit``/``vmap``/``grad``), where a loop
    cannot be driven from the host."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def host_loop(requested: bool | None, fn: Callable, *args) -> bool:
    """Whether an estimator's loop of matvecs of ``fn`` runs from the host, one compiled matvec called per
    iteration, instead of as one traced loop. ``requested`` (True / False) is returned as is; ``None`` picks the
    host loop on the CPU when ``args`` are concrete arrays (not inside a trace) and ``fn(*args)`` convolves: there
    a rolled loop runs the backward convolutions on XLA:CPU's slow path and an unrolled one compiles every
    iteration (minutes for a ResNet), while the host loop compiles one matvec. Cost of the decision: one trace of
    ``fn`` (only on the CPU, outside a trace)."""
    if requested is not None:
        return bool(requested)
    if is_traced(args) or default_platform() != "cpu":
        return False
    return uses_convolution(fn, *args)
