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

import functools
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcnn_jax.autodiff import check_example_batch, check_labels, check_positive_int, safe_norm
from lcnn_jax.estimators import auto_unroll
from lcnn_jax.types import Array, PRNGKey

__all__ = ["fgsm", "pgd", "gaussian_noise", "accuracy", "robust_accuracy", "cross_entropy"]

LogitsFn = Callable[[Array], Array]
Clip = Optional[Tuple[float, float]]


def cross_entropy(logits: Array, ys: Array) -> Array:
    """Per-example softmax cross-entropy ``logsumexp(z) - z_y``, shape (B,)."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, ys[:, None].astype(jnp.int32), -1)[:, 0]


def _check_inputs(xs: Array, ys: Array) -> None:
    check_example_batch(xs)
    check_labels(xs, ys)
    if jnp.ndim(ys) != 1 or not jnp.issubdtype(jnp.result_type(ys), jnp.integer):
        raise ValueError(
            f"ys must be integer class labels of shape (batch,), got {jnp.result_type(ys)} {jnp.shape(ys)}."
        )


def _check_nonneg(value, name: str) -> None:
    # Traced values (e.g. eps swept under vmap) cannot be inspected; concrete ones are validated.
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value)
    if arr.ndim != 0 or not np.isfinite(arr) or arr < 0:
        raise ValueError(f"{name} must be a finite non-negative scalar, got {value!r}.")


def _check_clip(clip: Clip) -> None:
    if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
        raise ValueError(f"clip must be None or a pair (low, high) with low < high, got {clip!r}.")


def _box(x: Array, clip: Clip) -> Array:
    return x if clip is None else jnp.clip(x, clip[0], clip[1])


def _per_example(a: Array, like: Array) -> Array:
    """Reshape a (B,) array to broadcast against (B, ...)."""
    return a.reshape((-1,) + (1,) * (like.ndim - 1))


def _input_grad(logits_fn: LogitsFn, xs: Array, ys: Array) -> Array:
    # The gradient of the summed loss holds each example's own gradient (examples are independent).
    return jax.grad(lambda x: jnp.sum(cross_entropy(logits_fn(x), ys)))(xs)


def fgsm(logits_fn: LogitsFn, xs: Array, ys: Array, *, eps: float, clip: Clip = (0.0, 1.0)) -> Array:
    """Fast gradient sign method: ``clip(x + eps * sign(grad_x CE(x, y)))``. Cost: one gradient."""
    _check_inputs(xs, ys)
    _check_nonneg(eps, "eps")
    _check_clip(clip)
    g = _input_grad(logits_fn, xs, ys)
    return _box(xs + jnp.asarray(eps, xs.dtype) * jnp.sign(g), clip)


def attack_unroll(num_steps: int, unroll: int | bool | None = None) -> int | bool:
    """The ``unroll`` of an attack's step loop: the user's choice if given, else the estimators' rule
    (:func:`lcnn_jax.estimators.auto_unroll`): fully unrolled for at most ``MAX_AUTO_UNROLL`` (20) steps, a rolled
    loop beyond. Measured on XLA:CPU (``experiments/bench_attack_unroll.py``: PGD-Linf, 20 steps, small CNN at width
    0.5, 512 images, weights as arguments):
    rolled 16.1 s, 5 steps per iteration 16.3 s, fully unrolled 5.0 s, for 1.4 / 1.6 / 3.2 s of compilation; a
    partial unroll does not help, so long attacks (APGD's 100 steps) stay rolled to keep compilation bounded."""
    full = auto_unroll(int(num_steps), unroll)
    return 1 if full is False else full


def _project(x: Array, x0: Array, eps: Array, norm: str, clip: Clip) -> Array:
    """Onto the eps-ball around x0, then the box. The box step keeps the point in the ball: x0 is in
    the box, and clipping moves each coordinate towards it, so no |x_i - x0_i| grows."""
    if norm == "linf":
        x = jnp.clip(x, x0 - eps, x0 + eps)
    else:
        d = x - x0
        n = safe_norm(d.reshape(d.shape[0], -1), axis=1)
        factor = jnp.where(n > eps, eps / jnp.where(n > 0, n, 1.0), 1.0)
        x = x0 + d * _per_example(factor, d)
    return _box(x, clip)


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
    _check_inputs(xs, ys)
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
    _check_nonneg(eps, "eps")
    _check_nonneg(step_size, "step_size")
    _check_clip(clip)
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
            delta = z * _per_example(radius / jnp.maximum(zn, jnp.finfo(xs.dtype).tiny), z)
        x = _project(x0 + delta, x0, eps, norm, clip)
    else:
        x = _box(x0, clip)

    def body(_, x):
        g = _input_grad(logits_fn, x, ys)
        if norm == "linf":
            direction = jnp.sign(g)
        else:
            gn = safe_norm(g.reshape(g.shape[0], -1), axis=1)
            direction = g * _per_example(jnp.where(gn > 0, 1.0 / jnp.where(gn > 0, gn, 1.0), 0.0), g)
        return _project(x + step_size * direction, x0, eps, norm, clip)

    return lax.fori_loop(0, int(num_steps), body, x, unroll=attack_unroll(num_steps, unroll))


def gaussian_noise(xs: Array, *, key: PRNGKey, std: float, clip: Clip = (0.0, 1.0)) -> Array:
    """``clip(x + std * N(0, I))``: the random-noise baseline (CLIP evaluates std = 1 on MNIST)."""
    check_example_batch(xs)
    _check_nonneg(std, "std")
    _check_clip(clip)
    return _box(xs + jnp.asarray(std, xs.dtype) * jax.random.normal(key, xs.shape, xs.dtype), clip)


def _chunks(n: int, batch_size: int | None):
    size = n if batch_size is None else batch_size
    for start in range(0, n, size):
        yield start, min(start + size, n), size


def _pad(a: Array, size: int) -> Array:
    """Pad the leading axis to ``size`` by repeating the first row, so every chunk has one shape."""
    short = size - a.shape[0]
    return a if short == 0 else jnp.concatenate([a, jnp.repeat(a[:1], short, axis=0)], axis=0)


_NO_PARAMS = object()


def _bind(logits_fn: Callable, params) -> Callable[[Array], Array]:
    """``logits_fn`` itself, or with ``params`` given, ``xs -> logits_fn(params, xs)``."""
    return logits_fn if params is _NO_PARAMS else functools.partial(logits_fn, params)


def accuracy(logits_fn: LogitsFn, xs: Array, ys: Array, *, batch_size: int | None = None,
             params=_NO_PARAMS) -> float:
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
    params=_NO_PARAMS,
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
    _check_inputs(xs, ys)
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)

    def correct(p, x, y, k):
        f = _bind(logits_fn, p)
        if attack is not None:
            x = attack(f, x, y) if k is None else attack(f, x, y, key=k)
        return jnp.argmax(f(x), axis=-1) == y

    correct_jit = jax.jit(correct, static_argnums=0) if params is _NO_PARAMS else jax.jit(correct)
    total = 0
    for c, (start, stop, size) in enumerate(_chunks(xs.shape[0], batch_size)):
        k = None if key is None else jax.random.fold_in(key, c)
        hits = correct_jit(params, _pad(xs[start:stop], size), _pad(ys[start:stop], size), k)
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
    _check_nonneg(std, "std")
    _check_nonneg(data_std, "data_std")
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
    _check_inputs(xs, ys)
    _check_nonneg(eps, "eps")
    _check_nonneg(alpha, "alpha")
    _check_clip(clip)
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
        return delta * _per_example(eps / jnp.where(n > 0, n, 1.0), delta)

    def loss_and_logits(x):
        logits = logits_fn(x)
        return jnp.sum(cross_entropy(logits, ys)), logits

    def body(_, delta):
        g, logits = jax.grad(loss_and_logits, has_aux=True)(xs + delta)
        still_correct = jnp.argmax(logits, axis=-1) == ys
        proposal = onto_sphere(into_box(delta + alpha * jnp.sign(g)))
        return jnp.where(_per_example(still_correct, delta), proposal, delta)

    delta = onto_sphere(into_box(jax.random.uniform(key, xs.shape, xs.dtype, -eps, eps)))
    delta = lax.fori_loop(0, int(num_steps), body, delta, unroll=attack_unroll(num_steps, unroll))
    return _box(xs + delta, clip)


__all__ += ["MNIST_MEAN", "MNIST_STD", "gaussian_noise_normalized", "pgd_l2_clip_reference"]


# ------------------------------------------------------------------------------------------------
# Auto-PGD (Croce & Hein, ICML 2020) and the per-example worst case over several attacks
# ------------------------------------------------------------------------------------------------

#: APGD's momentum weight ``alpha`` (the paper's 0.75; the first step has none).
APGD_MOMENTUM = 0.75
#: APGD's threshold ``rho``: the step size is halved at a checkpoint where fewer than this fraction of the steps
#: since the previous checkpoint raised the loss.
APGD_RHO = 0.75
APGD_LOSSES = ("ce", "dlr", "dlr_targeted")


def apgd_checkpoints(num_steps: int) -> tuple:
    """The iterations ``w_j = ceil(p_j N)`` (j >= 1, ``N = num_steps``) at which APGD reconsiders its step size.

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (Croce & Hein 2020, Sec. 3.2):
    the first period is 22 % of the budget, each later one 3 % shorter, but at least 6 %. For N = 100:
    22, 41, 57, 70, 80, 87, 93, 99. Computed in integer hundredths, so no float rounding moves a checkpoint.
    """
    n = int(num_steps)
    p = [0, 22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 3, 6)
        if nxt > 100:
            break
        p.append(nxt)
    return tuple(sorted({-(-q * n // 100) for q in p[1:]})) if n > 0 else ()


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


def _target_classes(logits: Array, ys: Array, rank: int) -> Array:
    """The class with the ``rank``-th largest logit among those that are not the label (rank 1 = the runner-up)."""
    masked = jnp.where(jax.nn.one_hot(ys, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return lax.top_k(masked, rank)[1][:, rank - 1]


def _check_step_count(num_steps, name: str = "num_steps") -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {num_steps!r}.")


def _check_apgd(logits_fn, xs, ys, *, norm, eps, num_steps, loss, key, restarts, target_rank, rho, momentum,
                clip) -> tuple[int, int]:
    """Every check of :func:`apgd`'s arguments (before any work); returns ``(restarts, target_rank)``."""
    _check_inputs(xs, ys)
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
    if loss not in APGD_LOSSES:
        raise ValueError(f"loss must be one of {APGD_LOSSES}, got {loss!r}.")
    _check_nonneg(eps, "eps")
    _check_clip(clip)
    _check_step_count(num_steps)
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

    ``loss``: ``"ce"`` (cross-entropy), ``"dlr"`` (:func:`dlr_loss`, K >= 3) or ``"dlr_targeted"`` (K >= 4;
    the target is the class with the ``target_rank``-th largest non-label logit at the clean input, as
    AutoAttack's APGD-T runs ranks 1..9 as separate attacks). ``restarts``: independent runs from fresh random
    starts (``fold_in(key, r)``), each example keeping its first success.

    Returns, per example, the first misclassified point found (the clean input itself if it is misclassified;
    every iterate and the random start are checked), else the point of highest loss. Every returned point lies in
    the eps-ball (L-inf exactly; L2 up to the float rounding of the coordinates) and in the box.

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
                                        momentum=momentum, clip=clip)
    x0, ys = xs, ys.astype(jnp.int32)
    clean_logits = logits_fn(x0)
    targets = _target_classes(clean_logits, ys, target_rank) if loss == "dlr_targeted" else None
    start, body, outcome = _apgd_machine(logits_fn, x0, ys, targets, jnp.asarray(eps, xs.dtype), norm=norm,
                                         loss=loss, num_steps=num_steps, rho=rho, momentum=momentum, clip=clip)

    def restart(r, carry):
        s = lax.fori_loop(0, int(num_steps), body, start(jax.random.fold_in(key, r)),
                          unroll=attack_unroll(num_steps, unroll))
        return _apgd_merge(carry, outcome(s))

    carry = lax.fori_loop(0, restarts, restart, _apgd_carry(x0, clean_logits, ys))
    return _apgd_result(carry)


def _apgd_machine(logits_fn, x0, ys, targets, eps, *, norm, loss, num_steps, rho, momentum, clip):
    """APGD's pieces for one run on the batch ``x0``: ``start(run_key) -> state`` (the random start and its
    gradient), ``body(i, state) -> state`` (iteration ``i``, 0-based; checkpoint ``i + 1`` is applied after it) and
    ``outcome(state) -> (x_adv, fooled, x_max, f_max)``. :func:`apgd` runs ``body`` in a ``lax.fori_loop``;
    :func:`apgd_stepwise` calls it from the host in compiled segments (the same operations, so the same values)."""
    dtype, n = x0.dtype, x0.shape[0]

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
        return values, g, jnp.argmax(logits, axis=-1) != ys

    def direction(g):
        if norm == "linf":
            return jnp.sign(g)
        gn = safe_norm(g.reshape(n, -1), axis=1)
        return g * _per_example(jnp.where(gn > 0, 1.0 / jnp.where(gn > 0, gn, 1.0), 0.0), g)

    checkpoints = apgd_checkpoints(num_steps)
    is_check = np.zeros(int(num_steps) + 1, bool)
    period = np.zeros(int(num_steps) + 1, np.int32)
    for prev, w in zip((0,) + checkpoints, checkpoints):
        is_check[w], period[w] = True, w - prev
    is_check, period = jnp.asarray(is_check), jnp.asarray(period)
    alpha = jnp.asarray(momentum, dtype)

    def start(r_key):
        if norm == "linf":
            t = jax.random.uniform(r_key, x0.shape, dtype, -1.0, 1.0)
            tn = jnp.max(jnp.abs(t.reshape(n, -1)), axis=1)
        else:
            t = jax.random.normal(r_key, x0.shape, dtype)
            tn = safe_norm(t.reshape(n, -1), axis=1)
        x_start = _project(x0 + eps * t * _per_example(1.0 / jnp.maximum(tn, jnp.finfo(dtype).tiny), t), x0, eps,
                           norm, clip)
        f0, g0, wrong0 = loss_grad(x_start)
        return dict(x=x_start, x_prev=x_start, g=g0, f=f0, eta=jnp.full((n,), 2.0, dtype) * eps,
                    x_max=x_start, g_max=g0, f_max=f0, successes=jnp.zeros((n,), jnp.int32),
                    f_max_check=f0, halved_check=jnp.zeros((n,), bool), x_adv=x_start, fooled=wrong0)

    def body(i, s):
        a = jnp.where(i == 0, jnp.asarray(1.0, dtype), alpha)
        eta = _per_example(s["eta"], s["x"])
        z = _project(s["x"] + eta * direction(s["g"]), x0, eps, norm, clip)
        x_new = _project(s["x"] + a * (z - s["x"]) + (1 - a) * (s["x"] - s["x_prev"]), x0, eps, norm, clip)
        f_new, g_new, wrong = loss_grad(x_new)
        first_hit = wrong & ~s["fooled"]
        x_adv = jnp.where(_per_example(first_hit, x_new), x_new, s["x_adv"])
        successes = s["successes"] + (f_new > s["f"]).astype(jnp.int32)
        better = f_new > s["f_max"]
        x_max = jnp.where(_per_example(better, x_new), x_new, s["x_max"])
        g_max = jnp.where(_per_example(better, x_new), g_new, s["g_max"])
        f_max = jnp.where(better, f_new, s["f_max"])
        # checkpoint k = i + 1: halve and restart from x_max where condition 1 or 2 holds
        check = is_check[i + 1]
        cond1 = successes.astype(dtype) < jnp.asarray(rho, dtype) * period[i + 1].astype(dtype)
        cond2 = ~s["halved_check"] & (f_max <= s["f_max_check"])
        halve = check & (cond1 | cond2)
        hb = _per_example(halve, x_new)
        return dict(
            x=jnp.where(hb, x_max, x_new), x_prev=s["x"], g=jnp.where(hb, g_max, g_new),
            f=jnp.where(halve, f_max, f_new), eta=jnp.where(halve, s["eta"] / 2, s["eta"]),
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
    x_adv = jnp.where(_per_example(take, a), a, x_adv)
    better = fm > f_best
    x_best = jnp.where(_per_example(better, xm), xm, x_best)
    return x_adv, fooled | fo, x_best, jnp.where(better, fm, f_best)


def _apgd_result(carry):
    x_adv, fooled, x_best, _ = carry
    return jnp.where(_per_example(fooled, x_adv), x_adv, x_best)


#: Iterations per compiled segment of :func:`apgd_stepwise`.
APGD_SEGMENT = 5


@functools.lru_cache(maxsize=64)
def _apgd_programs(logits_fn, norm, loss, num_steps, rho, momentum, clip, target_rank, segment):
    """The jitted pieces of :func:`apgd_stepwise` for one ``logits_fn(params, xs)`` and setting (cached, so a
    network of the same architecture, another radius or another batch of the same shape compiles nothing)."""

    def machine(params, x, y, targets, eps):
        f = functools.partial(logits_fn, params)
        return _apgd_machine(f, x, y, targets, jnp.asarray(eps, x.dtype), norm=norm, loss=loss,
                             num_steps=num_steps, rho=rho, momentum=momentum, clip=clip)

    @jax.jit
    def begin(params, x, y):
        clean = logits_fn(params, x)
        targets = _target_classes(clean, y, target_rank) if loss == "dlr_targeted" else jnp.zeros_like(y)
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

    return begin, start, advance, finish_run, jax.jit(_apgd_result)


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
                                        target_rank=target_rank, rho=rho, momentum=momentum, clip=clip)
    segment = check_positive_int(segment, "segment")
    begin, start, advance, finish_run, result = _apgd_programs(
        logits_fn, norm, loss, int(num_steps), float(rho), float(momentum), None if clip is None else tuple(clip),
        target_rank, segment)
    ys = jnp.asarray(ys, jnp.int32)
    eps = jnp.asarray(eps, xs.dtype)
    carry, targets = begin(params, xs, ys)
    for r in range(restarts):
        s = start(params, xs, ys, targets, eps, jax.random.fold_in(key, r))
        for first in range(0, int(num_steps), segment):
            count = min(segment, int(num_steps) - first)
            s = advance(params, xs, ys, targets, eps, s, count, jnp.asarray(first, jnp.int32))
        carry = finish_run(params, xs, ys, targets, eps, carry, s)
    return result(carry)


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
    params=_NO_PARAMS,
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
    _check_inputs(xs, ys)
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
    named = dict(attacks) if isinstance(attacks, Mapping) else {f"attack{i}": a for i, a in enumerate(attacks)}
    if not named:
        raise ValueError("robust_accuracy_worst_case needs at least one attack, e.g. attacks=apgd_attacks('l2', 1.0).")
    for name, a in named.items():
        if not callable(a):
            raise ValueError(f"attack {name!r} is not callable: {a!r}.")
    items = list(named.items())

    def correct(p, x, y, k):
        f = _bind(logits_fn, p)
        out = {"clean": jnp.argmax(f(x), axis=-1) == y}
        for i, (name, attack) in enumerate(items):
            xa = attack(f, x, y) if k is None else attack(f, x, y, key=jax.random.fold_in(k, i))
            out[name] = jnp.argmax(f(xa), axis=-1) == y
        return out

    correct = jax.jit(correct, static_argnums=0) if params is _NO_PARAMS else jax.jit(correct)
    hits: dict = {}
    for c, (start, stop, size) in enumerate(_chunks(xs.shape[0], batch_size)):
        k = None if key is None else jax.random.fold_in(key, c)
        res = correct(params, _pad(xs[start:stop], size), _pad(ys[start:stop], size), k)
        for name, v in res.items():
            hits.setdefault(name, []).append(np.asarray(v)[: stop - start])
    hits = {name: np.concatenate(v) for name, v in hits.items()}
    robust = hits["clean"].copy()
    for name, _ in items:
        robust &= hits[name]
    return WorstCase(accuracy=float(robust.mean()), clean_accuracy=float(hits["clean"].mean()),
                     per_attack={name: float(hits[name].mean()) for name, _ in items}, robust=robust)


def apgd_attacks(norm: str, eps: float, *, num_steps: int = 100, losses: Sequence[str] = ("ce", "dlr"),
                 restarts: int = 1, target_ranks: Sequence[int] = (1,)) -> dict:
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
                                          restarts=restarts, target_rank=int(r))
    return out


__all__ += ["APGD_MOMENTUM", "APGD_RHO", "APGD_LOSSES", "APGD_SEGMENT", "apgd_checkpoints", "dlr_loss", "apgd",
            "apgd_stepwise", "WorstCase",
            "robust_accuracy_worst_case", "apgd_attacks"]
