"""Adversarial and random perturbations of image batches, and (robust) accuracy.

``logits_fn(xs) -> logits`` is the model as a batched function of its inputs (B, ...) -> (B, K),
e.g. ``lambda xs: model.apply(variables, xs)`` in eval mode; it must treat examples independently.
Inputs live in the box ``clip = (0, 1)`` (pass ``clip=None`` to disable it); radii ``eps`` are in
that scale. Attacks maximise the softmax cross-entropy at the true label ``ys`` (integers, (B,)); :func:`apgd`
can also maximise the DLR loss. For evaluation prefer :func:`apgd` (no step size to tune) and the worst case over
several attacks, :func:`robust_accuracy_worst_case`; fixed-step :func:`pgd` is cheaper but can overstate robustness.

The attacks are pure and traceable (``lax.fori_loop``); jit them with ``logits_fn`` closed over.
:func:`apgd_stepwise` runs :func:`apgd`'s iterations from the host in compiled segments instead: the same iterates,
3.3x faster on 2 CPU cores for a small CNN (XLA:CPU runs a convolution's backward pass slowly inside a rolled
loop); ``lcnn-jax measure`` and ``lcnn-jax compare`` use it.
``robust_accuracy`` is a Python driver that jits the attack once and runs it over fixed-size chunks::

    import functools, jax
    from lcnn_jax import attacks

    logits_fn = lambda xs: model.apply(variables, xs)
    x_adv = attacks.pgd(logits_fn, xs, ys, norm="l2", eps=2.0, step_size=0.25, num_steps=100,
                        key=jax.random.key(0))
    attack = functools.partial(attacks.pgd, norm="linf", eps=8 / 255, step_size=2 / 255, num_steps=10)
    acc = attacks.robust_accuracy(logits_fn, xs, ys, attack=attack, key=jax.random.key(0), batch_size=256)
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcnn_jax.attacks.base import (Clip, LogitsFn, NO_PARAMS, attack_unroll, bind, box, check_clip, check_inputs,
                                   check_nonneg, chunks, cross_entropy, input_grad, pad, per_example, project)
from lcnn_jax.autodiff import check_example_batch, check_positive_int, safe_norm
from lcnn_jax.loops import materialize
from lcnn_jax.types import Array, PRNGKey

__all__ = ["fgsm", "pgd", "gaussian_noise", "accuracy", "robust_accuracy"]


def fgsm(logits_fn: LogitsFn, xs: Array, ys: Array, *, eps: float, clip: Clip = (0.0, 1.0)) -> Array:
    """Fast gradient sign method: ``clip(x + eps * sign(grad_x CE(x, y)))``. Cost: one gradient."""
    check_inputs(xs, ys)
    check_nonneg(eps, "eps")
    check_clip(clip)
    g = input_grad(logits_fn, xs, ys)
    return box(xs + jnp.asarray(eps, xs.dtype) * jnp.sign(g), clip)



def pgd(
    logits_fn: LogitsFn,
    xs: Array,
    ys: Array,
    *,
    norm: str = "linf",
    eps: float,
    step_size: float,
    num_steps: int,
    key: PRNGKey | None = None,
    random_start: bool = True,
    clip: Clip = (0.0, 1.0),
    unroll: int | bool | None = None,
    l2_start: str = "ball",
) -> Array:
    """Projected gradient ascent on the cross-entropy within an eps-ball (Madry et al. 2018).

    ``norm="linf"``: ``x <- x + step_size * sign(g)``, projection by clipping to ``[x0 - eps, x0 + eps]``.
    ``norm="l2"``: ``x <- x + step_size * g / ||g||`` (per example), projection by rescaling
    ``x - x0`` to norm ``<= eps``. After every step the point is also clipped to the ``clip`` box,
    so every iterate lies in the intersection of the ball and the box (up to float rounding).
    ``random_start`` (needs ``key``) begins at a uniform point of the ball (L-inf: uniform in the cube;
    L2: uniform in the ball, radius ``eps * U^(1/d)`` along a Gaussian direction, d the input dimension). Returns
    the last iterate. Cost: ``num_steps`` gradients.

    The default L2 start (``l2_start="ball"``) is uniform in the ball, which differs from torchattacks' ``PGDL2``:
    uniform in the ball puts almost all the volume near the sphere (in 784 dimensions the median start lies at
    0.9991 eps from the clean image, 99 % of starts beyond 0.994 eps), while torchattacks scales a Gaussian
    direction by ``eps * U(0, 1)`` (``l2_start="radial"``), eps / 2 from the clean image on average. Both are valid
    starts; use ``"radial"`` to reproduce torchattacks' numbers.

    ``unroll`` is passed to the ``lax.fori_loop``; None (default): :func:`attack_unroll`, fully unrolled up to 20
    steps (on XLA:CPU convolutions inside a rolled loop ran ~3x slower), rolled beyond (compilation time grows
    with the unrolled steps).
    """
    check_inputs(xs, ys)
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
    check_nonneg(eps, "eps")
    check_nonneg(step_size, "step_size")
    check_clip(clip)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}.")
    if random_start and key is None:
        raise ValueError("pgd with random_start=True needs key=jax.random.key(...); or pass random_start=False.")
    if l2_start not in ("ball", "radial"):
        raise ValueError(f"l2_start must be 'ball' (uniform in the ball) or 'radial' (torchattacks: eps * U(0, 1) "
                         f"along a Gaussian direction), got {l2_start!r}.")
    eps = jnp.asarray(eps, xs.dtype)
    step_size = jnp.asarray(step_size, xs.dtype)
    x0 = xs

    if random_start:
        if norm == "linf":
            delta = jax.random.uniform(key, xs.shape, xs.dtype, -1.0, 1.0) * eps
        else:
            k_dir, k_rad = jax.random.split(key)
            z = jax.random.normal(k_dir, xs.shape, xs.dtype)
            zn = safe_norm(z.reshape(z.shape[0], -1), axis=1)
            dim = np.prod(xs.shape[1:])
            u = jax.random.uniform(k_rad, (xs.shape[0],), xs.dtype)
            radius = eps * (u ** (1.0 / dim) if l2_start == "ball" else u)
            delta = z * per_example(radius / jnp.maximum(zn, jnp.finfo(xs.dtype).tiny), z)
        x = project(x0 + delta, x0, eps, norm, clip)
    else:
        x = box(x0, clip)

    def body(_, x):
        g = input_grad(logits_fn, x, ys)
        if norm == "linf":
            direction = jnp.sign(g)
        else:
            gn = safe_norm(g.reshape(g.shape[0], -1), axis=1)
            direction = g * per_example(jnp.where(gn > 0, 1.0 / jnp.where(gn > 0, gn, 1.0), 0.0), g)
        # stored: unrolled, XLA would fuse every earlier step's update (and its gradient) into each later one
        return materialize(project(x + step_size * direction, x0, eps, norm, clip))

    return lax.fori_loop(0, int(num_steps), body, x, unroll=attack_unroll(num_steps, unroll))


def gaussian_noise(xs: Array, *, key: PRNGKey, std: float, clip: Clip = (0.0, 1.0)) -> Array:
    """``clip(x + std * N(0, I))``: the random-noise baseline (CLIP evaluates std = 1 on MNIST)."""
    check_example_batch(xs)
    check_nonneg(std, "std")
    check_clip(clip)
    return box(xs + jnp.asarray(std, xs.dtype) * jax.random.normal(key, xs.shape, xs.dtype), clip)



def accuracy(logits_fn: LogitsFn, xs: Array, ys: Array, *, batch_size: int | None = None,
             params=NO_PARAMS) -> float:
    """Fraction of examples whose argmax logit equals the label (Python float), in chunks of ``batch_size``;
    ``params``: see :func:`robust_accuracy`."""
    return robust_accuracy(logits_fn, xs, ys, attack=None, batch_size=batch_size, params=params)


def robust_accuracy(
    logits_fn: LogitsFn,
    xs: Array,
    ys: Array,
    *,
    attack: Callable[..., Array] | None,
    key: PRNGKey | None = None,
    batch_size: int | None = None,
    params=NO_PARAMS,
) -> float:
    """Accuracy on ``attack(logits_fn, xs, ys, key=...)`` (clean accuracy when ``attack`` is None).

    ``attack`` takes ``(logits_fn, xs, ys)`` and, when ``key`` is given, ``key=`` (e.g.
    ``functools.partial(pgd, norm="l2", eps=2.0, step_size=0.25, num_steps=100)``, or
    ``lambda f, x, y, key: gaussian_noise(x, key=key, std=1.0)``). Runs outside jit: the attack and
    the model are jitted once and applied to chunks of ``batch_size`` examples (the last chunk is
    padded, so there is a single compilation); chunk ``c`` uses ``fold_in(key, c)``.

    ``params`` (recommended): the model's variables, an argument of the compiled program, with ``logits_fn(params,
    xs)`` (e.g. ``lambda v, xs: model.apply(v, xs)``). Without it ``logits_fn(xs)`` closes over the weights, which
    then become constants of the program: a longer compilation, and XLA may fold the network into them.
    """
    check_inputs(xs, ys)
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)

    def correct(p, x, y, k):
        f = bind(logits_fn, p)
        if attack is not None:
            x = attack(f, x, y) if k is None else attack(f, x, y, key=k)
        return jnp.argmax(f(x), axis=-1) == y

    correct_jit = jax.jit(correct, static_argnums=0) if params is NO_PARAMS else jax.jit(correct)
    total = 0
    for c, (start, stop, size) in enumerate(chunks(xs.shape[0], batch_size)):
        k = None if key is None else jax.random.fold_in(key, c)
        hits = correct_jit(params, pad(xs[start:stop], size), pad(ys[start:stop], size), k)
        total += int(jnp.sum(hits[: stop - start]))
    return total / xs.shape[0]


# ------------------------------------------------------------------------------------------------
# The CLIP reference's evaluation protocols (TimRoith/CLIP), to reproduce the paper's numbers only
# ------------------------------------------------------------------------------------------------

#: MNIST's pixel mean and standard deviation (the torchvision normalisation the CLIP reference used).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def gaussian_noise_normalized(xs: Array, *, key: PRNGKey, std: float = 1.0, data_std: float = MNIST_STD,
                              clip: Clip = None) -> Array:
    """Gaussian noise added in a normalised input space, returned in the pixel scale: ``x + data_std * std * N(0, I)``.

    The CLIP paper's noise column was measured on inputs normalised as ``z = (x - mean) / data_std`` with
    ``z + std * N(0, I)``, ``std = 1``, not clipped (the reference code of that time, March 2021; it moved to
    ``clip(x + N(0, I), 0, 1)`` in pixels in April 2021, our :func:`gaussian_noise` with ``std=1``). For a model
    that takes pixels, that is pixel noise of standard deviation ``data_std * std`` (0.3081 on MNIST), unclipped;
    the mean cancels. ``clip`` (default None) optionally clips the result in the pixel scale. Same draws as
    ``gaussian_noise(xs, key=key, std=data_std * std, clip=clip)``.
    """
    check_example_batch(xs)
    check_nonneg(std, "std")
    check_nonneg(data_std, "data_std")
    return gaussian_noise(xs, key=key, std=std * data_std, clip=clip)


def pgd_l2_clip_reference(
    logits_fn: LogitsFn,
    xs: Array,
    ys: Array,
    *,
    key: PRNGKey,
    eps: float = 2.0,
    alpha: float = 0.5,
    num_steps: int = 100,
    clip: Clip = (0.0, 1.0),
    unroll: int | bool | None = None,
) -> Array:
    """The CLIP reference's PGD-L2 (``TimRoith/CLIP``, ``adversarial_attacks.pgd``), for the paper's PGD column only.

    A weaker attack than :func:`pgd` (use that one to evaluate robustness); it differs in four ways:

    * **start on the sphere**: ``delta = U[-eps, eps]`` per input (drawn as
      ``jax.random.uniform(key, xs.shape, xs.dtype, -eps, eps)``), clipped so that ``x + delta`` is in the box,
      then rescaled to ``||delta|| = eps``;
    * **sign steps**: ``delta + alpha * sign(grad_x CE)`` (an L-inf step, of L2 length ``alpha * sqrt(d)``);
    * **sphere, not ball**: each proposal is clipped to the box and then rescaled to norm exactly ``eps``,
      so every iterate lies on the eps-sphere;
    * **per-sample early stop**: a sample's ``delta`` is updated only while the model still classifies
      ``x + delta`` correctly, so the attack stops at the first misclassified iterate.

    The iterates themselves may leave the box (the rescaling follows the clip); the result is
    ``clip(x + delta)``. Defaults: eps 2, alpha 0.5 (the reference's L2 default), 100 steps (its test run).
    Cost: ``num_steps`` gradients (the reference stops early once every sample is misclassified; here the
    remaining steps leave everything unchanged).
    """
    check_inputs(xs, ys)
    check_nonneg(eps, "eps")
    check_nonneg(alpha, "alpha")
    check_clip(clip)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}.")
    if key is None:
        raise ValueError("pgd_l2_clip_reference starts at a random point of the sphere: pass key=jax.random.key(...).")
    eps = jnp.asarray(eps, xs.dtype)
    alpha = jnp.asarray(alpha, xs.dtype)

    def into_box(delta):
        return delta if clip is None else jnp.clip(delta, clip[0] - xs, clip[1] - xs)

    def onto_sphere(delta):
        n = safe_norm(delta.reshape(delta.shape[0], -1), axis=1)
        return delta * per_example(eps / jnp.where(n > 0, n, 1.0), delta)

    def loss_and_logits(x):
        logits = logits_fn(x)
        return jnp.sum(cross_entropy(logits, ys)), logits

    def body(_, delta):
        g, logits = jax.grad(loss_and_logits, has_aux=True)(xs + delta)
        still_correct = jnp.argmax(logits, axis=-1) == ys
        proposal = onto_sphere(into_box(delta + alpha * jnp.sign(g)))
        return materialize(jnp.where(per_example(still_correct, delta), proposal, delta))  # see pgd

    delta = onto_sphere(into_box(jax.random.uniform(key, xs.shape, xs.dtype, -eps, eps)))
    delta = lax.fori_loop(0, int(num_steps), body, delta, unroll=attack_unroll(num_steps, unroll))
    return box(xs + delta, clip)


__all__ += ["MNIST_MEAN", "MNIST_STD", "gaussian_noise_normalized", "pgd_l2_clip_reference"]
