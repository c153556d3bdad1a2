"""CLIP, cheap Lipschitz training (Bungert, Raab, Roith, Schwinn & Tenbrinck, SSVM 2021; SPEC 1.3).

The penalty is ``lam * Lip`` (or ``lam * Lip^2``) with

    Lip = max_i ||f(u_i) - f(v_i)||_2 / ||u_i - v_i||_2

over a pool of input pairs ``(u_i, v_i)`` that lives in the regularizer state and climbs towards
steep regions of ``f``:

1. **Ascent.** Every training step moves all pairs by one gradient-ascent step on their quotients,
   :func:`lcnn_jax.measures.lipschitz.pair_ascent_step` (``u <- u + tau_i L_i grad_u L_i``, same for ``v``;
   a pair keeps the move only if its quotient grew). ``adaptive=True`` (default, the paper's rule): then
   ``tau_i *= 1.3``, otherwise ``tau_i /= 1.3``; ``adaptive=False``: ``tau_i`` stays ``init_step``, which is
   what the reference code runs. The ascent sees the parameters under ``stop_gradient``.
2. **Penalty.** Only the maximizing pair enters the loss: its quotient is recomputed with the live
   parameters, inputs under ``stop_gradient``, so the gradient reaches the parameters only.
   ``squared=True`` penalises ``L^2``; ``skip_above`` drops the term for a step whose penalty exceeds
   it (the reference code does both: squared quotient, skipped above 5000).
3. **Redraw.** Every ``redraw_every_epochs`` epochs (or every ``redraw_every_steps`` steps) the pairs are
   drawn afresh, with step sizes reset to ``init_step`` (``reset_step_on_redraw=False`` keeps them).
4. **Discrepancy principle.** With a ``target`` accuracy, after each epoch past ``warmup_epochs``:
   ``lam += dlam`` if the epoch's training accuracy exceeds the target, else
   ``lam = max(lam - dlam, 0)`` (:func:`discrepancy_principle`, shared with ``weight_l2``); with
   ``cooldown=c`` only after every ``(c + 1)``-th of those epochs.
   ``lam`` is the float32 array ``state["coeff"]``, so moving it never recompiles the step.

Where pairs come from (``init``): ``"perturb"`` pairs an image ``x`` with ``x + perturb_scale * N(0, I)``
(``perturb_dist="uniform"``: ``x + perturb_scale * U[0, 1)``); ``"pairs"`` pairs two different images. The
images are

* ``pool_images`` when given (a host array of held-out examples, the SPEC's setting: the reference holds
  out 6000 of the 60000 MNIST training images). The pool never enters the checkpoint, and the state's
  shapes do not depend on it; with epoch redraws it stays on the host (the redraw runs in ``epoch_end``).
* otherwise the current training batch: ``init`` draws from the batch it is given, and a redraw sets a
  flag in the state so that the next step draws from *its* batch inside the compiled step. Images are
  sampled with replacement when the batch holds fewer than needed, so ``num_pairs`` may exceed it.

Either way the pool has the fixed shape ``(num_pairs, *example_shape)``. Epoch redraws happen in
``epoch_end``: a custom training loop that never calls it keeps its initial pairs (and their ascent); call
:func:`lcnn_jax.regularizers.apply_epoch_end` after each epoch. Step redraws (``redraw_every_steps``) happen
inside ``loss`` and need no hook; with a pool, the pool is then a constant of the compiled step.
``loss`` is jittable; ``init`` and ``epoch_end`` run on the host (with a pool they index it in NumPy; a traced
``init``, e.g. under ``jax.eval_shape``, draws the same pairs on the device).

Cost per training step, on top of the step's own: the ascent is one forward + backward and one forward
pass on ``2 * num_pairs`` inputs; the penalty one forward + backward pass on 2 inputs. The ascent and
penalty call the model through the step's ``apply_fn`` (training mode): with training-mode batch norm the
pairs are normalised with their own batch statistics (the penalty with those of a batch of 2).

What the reference code (``TimRoith/CLIP``) runs, and how to get it here (``clip_mnist5k.py:clip_reference``
sets all of it): the pool is a batch of 1000 held-out images (of 6000), giving 500 pairs; ``partial_random``
pairs an image with a copy plus ``U[0, 0.1)`` noise (``perturb_dist="uniform"``); the ascent step is
``reg_lr * grad(L^2) = 2 reg_lr L grad L``, so ``init_step`` is twice their ``reg_lr`` (defaults 1.0, the
published example 10), and it stays constant (``adaptive=False``: the x1.3 / /1.3 update is computed and
dropped); pairs are redrawn every 2000 steps (``redraw_every_steps=2000``); the scheduler keeps lambda at 0 for
6 epochs (``warmup_epochs=6, warmup_coeff=0.0``) and then moves it every 2nd epoch (``cooldown=1``), by
``lamda_increment``, which is 0.0 in the published example (so lambda stays 0.1 there). Two details we do not
reproduce: on the very first step of a run the reference accepts any proposal with a positive quotient (its
"previous best" starts at 0; ours is the current pair's quotient), and it tests the epoch's model with the
highest validation accuracy among those above the goal training accuracy rather than the last one.

Example::

    reg = clip(0.1, num_pairs=500, squared=True, skip_above=5000.0, target=0.9, dlam=0.01,
               warmup_epochs=6, warmup_coeff=0.0, pool_images=held_out.images)
    state = reg.init(key, params, batch)
    value, state, metrics = reg.loss(params, state, batch, key, apply_fn)   # inside the train step
    state = reg.epoch_end(state, train_accuracy, epoch)                      # on the host, after each epoch
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcnn_jax.measures.lipschitz import pair_ascent_step, pair_quotients
from lcnn_jax.regularizers.base import EpochEndFn, Regularizer, check_coeff
from lcnn_jax.types import Array, ApplyFn, Batch, Params, PRNGKey

__all__ = ["clip", "draw_pairs", "discrepancy_principle", "discrepancy_update", "INITS", "PERTURB_DISTS"]

#: How a pair is formed from drawn images.
INITS = ("perturb", "pairs")
#: The perturbation of ``init="perturb"``: ``perturb_scale * N(0, I)`` or ``perturb_scale * U[0, 1)`` per input.
PERTURB_DISTS = ("gaussian", "uniform")

_STATE_KEYS = ("u", "v", "step", "quotient", "coeff", "count", "redraw", "key")


# ------------------------------------------------------------------------------------------------ checks
def _finite_number(value: Any, name: str, *, positive: bool = False, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number{' or None' if allow_none else ''}, got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}.")
    return value


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    return int(value)


def _positive_int(value: Any, name: str, *, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")
    return int(value)


def _images(batch: Batch) -> Array:
    if "image" not in batch:
        raise ValueError(f"batch needs an 'image' entry of shape (B, ...), got keys {sorted(batch)}.")
    xs = jnp.asarray(batch["image"])
    if xs.ndim < 2 or xs.shape[0] == 0:
        raise ValueError(f"batch['image'] must have shape (B, *example_shape) with B >= 1, got {xs.shape}.")
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise ValueError(f"batch['image'] must be floating point, got {xs.dtype}; scale it to [0, 1] floats.")
    return xs


# ------------------------------------------------------------------------------------------------ discrepancy
def discrepancy_update(coeff: Array, train_accuracy: Array, *, target: float, dlam: float) -> Array:
    """One step of the discrepancy principle: ``coeff + dlam`` if ``train_accuracy > target``, else
    ``max(coeff - dlam, 0)``; same shape and dtype as ``coeff``."""
    coeff = jnp.asarray(coeff)
    up = coeff + jnp.asarray(dlam, coeff.dtype)
    down = jnp.maximum(coeff - jnp.asarray(dlam, coeff.dtype), jnp.zeros((), coeff.dtype))
    return jnp.where(jnp.asarray(train_accuracy) > target, up, down)


def discrepancy_principle(
    coeff: Any,
    *,
    target: Optional[float],
    dlam: Optional[float] = None,
    warmup_epochs: int = 0,
    warmup_coeff: Optional[float] = None,
    cooldown: int = 0,
    state_key: str = "coeff",
) -> "tuple[float, Optional[EpochEndFn]]":
    """The coefficient schedule of CLIP (and of its weight-regularization baseline).

    Returns ``(initial_coeff, epoch_end)``. Epochs are counted from 0, as the fit loop passes them:

    * epochs ``0 .. warmup_epochs - 1`` train with ``warmup_coeff`` (``coeff`` when it is None); at the
      end of epoch ``warmup_epochs - 1`` the coefficient becomes ``coeff``;
    * after every later epoch, with ``target`` set: ``lam += dlam`` if the epoch's training accuracy is
      above ``target``, else ``lam = max(lam - dlam, 0)`` (:func:`discrepancy_update`);
    * ``cooldown = c`` moves it only after every ``(c + 1)``-th of those epochs: after epochs
      ``warmup_epochs + c``, ``warmup_epochs + 2c + 1``, ... The reference's ``lamda_scheduler(warmup=5,
      cooldown=1)`` is ``warmup_epochs=6, cooldown=1`` here (its counter keeps ``warmup_lamda`` for 6 epochs
      and then moves lambda every 2nd epoch); 0 moves it after every epoch, as the paper describes.

    ``epoch_end(state, train_accuracy, epoch) -> state`` updates ``state[state_key]`` (keeping its shape
    and dtype, so the compiled step is reused); it is None when nothing would ever change (no target, no
    warm-up coefficient). ``target`` is a fraction in (0, 1), e.g. 0.9 for 90 %.
    """
    check_coeff(coeff)
    coeff = float(coeff)
    warmup_epochs = _non_negative_int(warmup_epochs, "warmup_epochs")
    warmup_coeff = _finite_number(warmup_coeff, "warmup_coeff", allow_none=True)
    cooldown = _non_negative_int(cooldown, "cooldown")
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, (int, float, np.integer, np.floating)):
            raise ValueError(f"target must be a training accuracy in (0, 1) or None, got {target!r}.")
        if not 0.0 < float(target) < 1.0:
            hint = f" It is a fraction: use {float(target) / 100:g} for {float(target):g} %." if target > 1 else ""
            raise ValueError(f"target must be a training accuracy in (0, 1), got {target}.{hint}")
        target = float(target)
        if dlam is None:
            raise ValueError("a target accuracy needs the step dlam (> 0) by which the coefficient moves each "
                             "epoch, e.g. dlam=0.01; there is no published default.")
        dlam = _finite_number(dlam, "dlam", positive=True)
    elif dlam is not None:
        _finite_number(dlam, "dlam", positive=True)
    warm = warmup_coeff is not None and warmup_epochs > 0
    initial = warmup_coeff if warm else coeff
    if target is None and not warm:
        return initial, None

    def epoch_end(state: dict, train_accuracy: Array, epoch: int) -> dict:
        if state_key not in state:
            raise ValueError(f"state has no {state_key!r}; build it with reg.init(key, params, batch).")
        epoch = int(epoch)
        lam = state[state_key]
        if epoch < warmup_epochs - 1 or (epoch == warmup_epochs - 1 and not warm):
            return state
        if epoch == warmup_epochs - 1:
            return {**state, state_key: jnp.full_like(lam, coeff)}
        if target is None or (epoch - warmup_epochs + 1) % (cooldown + 1):
            return state
        return {**state, state_key: discrepancy_update(lam, train_accuracy, target=target, dlam=dlam)}

    return initial, epoch_end


# ------------------------------------------------------------------------------------------------ pair draws
def _pair_indices(key: PRNGKey, m: int, num_pairs: int, init: str) -> "tuple[Array, Array]":
    """Row indices ``(iu, iv)`` into ``m`` images; without replacement when there are enough rows, and
    ``iu != iv`` for ``"pairs"`` whenever ``m >= 2``."""
    needed = 2 * num_pairs if init == "pairs" else num_pairs
    if needed <= m:
        perm = jax.random.permutation(key, m)[:needed]
        return (perm[:num_pairs], perm[num_pairs:]) if init == "pairs" else (perm, perm)
    k_u, k_shift = jax.random.split(key)
    iu = jax.random.randint(k_u, (num_pairs,), 0, m)
    if init == "perturb" or m == 1:
        return iu, iu
    # a non-zero cyclic shift: a different image, uniformly among the other m - 1
    return iu, (iu + jax.random.randint(k_shift, (num_pairs,), 1, m)) % m


def _form_pairs(key: PRNGKey, rows_u: Array, rows_v: Array, init: str, perturb_scale: float,
                perturb_dist: str = "gaussian"):
    if init == "pairs":
        return rows_u, rows_v
    if perturb_dist == "uniform":
        noise = jax.random.uniform(key, rows_u.shape, rows_u.dtype)
    else:
        noise = jax.random.normal(key, rows_u.shape, rows_u.dtype)
    return rows_u, rows_u + perturb_scale * noise


def _check_choice(value: Any, name: str, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
    return value


def draw_pairs(key: PRNGKey, images: Array, num_pairs: int, *, init: str = "perturb",
               perturb_scale: float = 0.1, perturb_dist: str = "gaussian") -> "tuple[Array, Array]":
    """Draw ``num_pairs`` pairs ``(u, v)`` from ``images`` (M, *example_shape); jittable.

    ``"perturb"``: ``u`` an image, ``v = u + perturb_scale * N(0, I)`` (``perturb_dist="gaussian"``) or
    ``v = u + perturb_scale * U[0, 1)`` per input (``"uniform"``, the reference's ``partial_random``: every
    input shifted up by ``U[0, 0.1)``). ``"pairs"``: two different images (identical only when M = 1).
    Rows are drawn without replacement when ``M`` suffices, else with. Returns two arrays of shape
    ``(num_pairs, *example_shape)`` and the dtype of ``images``.
    """
    _check_choice(init, "init", INITS)
    _check_choice(perturb_dist, "perturb_dist", PERTURB_DISTS)
    k_idx, k_noise = jax.random.split(key)
    iu, iv = _pair_indices(k_idx, images.shape[0], num_pairs, init)
    return _form_pairs(k_noise, images[iu], images[iv], init, perturb_scale, perturb_dist)


# ------------------------------------------------------------------------------------------------ CLIP
def clip(
    coeff: Any = 0.1,
    *,
    num_pairs: int = 500,
    init: str = "perturb",
    perturb_scale: float = 0.1,
    perturb_dist: str = "gaussian",
    redraw_every_epochs: Optional[int] = 1,
    redraw_every_steps: Optional[int] = None,
    reset_step_on_redraw: bool = True,
    squared: bool = False,
    skip_above: Optional[float] = None,
    init_step: float = 1.0,
    adaptive: bool = True,
    min_separation: float = 0.0,
    target: Optional[float] = None,
    dlam: Optional[float] = None,
    warmup_epochs: int = 0,
    warmup_coeff: Optional[float] = None,
    cooldown: int = 0,
    pool_images: Any = None,
    name: str = "clip",
) -> Regularizer:
    """CLIP: ``lam * max_i ||f(u_i) - f(v_i)|| / ||u_i - v_i||`` over adversarially updated pairs.

    Args:
      coeff: ``lam`` (finite, >= 0); ``state["coeff"]``, a float32 array.
      num_pairs: size of the pair pool (the reference: 500).
      init: ``"perturb"`` (an image and a perturbation of it) or ``"pairs"`` (two different images).
      perturb_scale: scale of the ``"perturb"`` noise, in input units.
      perturb_dist: ``"gaussian"`` (``perturb_scale * N(0, I)``) or ``"uniform"`` (``perturb_scale * U[0, 1)``
        per input, the reference's ``partial_random``), see :func:`draw_pairs`.
      redraw_every_epochs: redraw the pool after every this many epochs, in ``epoch_end``; None never
        redraws by epochs.
      redraw_every_steps: redraw the pool before the ascent of steps ``N, 2N, ...`` (counted by
        ``state["count"]``), inside the compiled step; the reference redraws every 2000 steps. Exclusive
        with ``redraw_every_epochs`` (set that to None). With ``pool_images`` the pool is then placed on the
        device, a constant of the compiled step.
      reset_step_on_redraw: a redraw resets the per-pair steps to ``init_step`` (ours); False keeps them
        (what the reference's cache would do, were its steps not constant anyway).
      squared: penalise ``Lip^2`` (the reference) instead of ``Lip``.
      skip_above: drop the term (value and gradient 0) for a step whose penalty, after squaring if
        ``squared``, exceeds this; None never skips. The reference: ``squared=True, skip_above=5000``.
      init_step: initial per-pair ascent step ``tau`` (the reference's ``reg_lr`` is ``tau / 2``).
      adaptive: ``tau *= 1.3`` after an accepted ascent step, ``/= 1.3`` after a rejected one (the paper);
        False keeps ``tau = init_step`` (what the reference code runs), see
        :func:`lcnn_jax.measures.lipschitz.pair_ascent_step`.
      min_separation: the ascent's relative separation floor (see ``pair_ascent_step``); 0.0, no floor, as
        in the reference's training step.
      target, dlam, warmup_epochs, warmup_coeff, cooldown: the discrepancy principle, see
        :func:`discrepancy_principle`; ``target=None`` keeps ``lam`` fixed (after the warm-up).
      pool_images: optional host array ``(N, *example_shape)`` of held-out examples to draw pairs from;
        None draws from the training batches.
      name: the regularizer's name and metrics key.

    State: ``u``, ``v`` (num_pairs, *example_shape) the pairs; ``step`` (num_pairs,) ascent steps;
    ``quotient`` (num_pairs,) the pairs' quotients after the last ascent step; ``coeff`` () float32 lam;
    ``count`` () int32 steps taken; ``redraw`` () int32 flag set by ``epoch_end`` when there is no pool (the
    next ``loss`` draws from its batch; ignored when ``redraw_every_epochs`` is None); ``key`` the
    regularizer's own PRNG key (redraws in ``epoch_end`` and from the pool in the step; in-step draws from the
    batch use the step's key).

    Metrics: ``name`` the unweighted penalty added (0 when skipped), ``max_quotient`` the maximal quotient,
    ``coeff``, ``skipped`` (0/1) and ``accept_rate`` (fraction of pairs whose ascent step was accepted).
    """
    check_coeff(coeff)
    num_pairs = _positive_int(num_pairs, "num_pairs")
    _check_choice(init, "init", INITS)
    _check_choice(perturb_dist, "perturb_dist", PERTURB_DISTS)
    perturb_scale = _finite_number(perturb_scale, "perturb_scale", positive=True)
    redraw_every_epochs = _positive_int(redraw_every_epochs, "redraw_every_epochs", allow_none=True)
    redraw_every_steps = _positive_int(redraw_every_steps, "redraw_every_steps", allow_none=True)
    if redraw_every_epochs is not None and redraw_every_steps is not None:
        raise ValueError(f"redraw_every_steps={redraw_every_steps} and redraw_every_epochs={redraw_every_epochs} "
                         f"are exclusive: set redraw_every_epochs=None to redraw by steps.")
    flags = {"squared": squared, "adaptive": adaptive, "reset_step_on_redraw": reset_step_on_redraw}
    for flag_name, flag in flags.items():
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"{flag_name} must be True or False, got {flag!r}.")
    skip_above = _finite_number(skip_above, "skip_above", positive=True, allow_none=True)
    init_step = _finite_number(init_step, "init_step", positive=True)
    min_separation = _finite_number(min_separation, "min_separation")
    coeff0, coeff_hook = discrepancy_principle(coeff, target=target, dlam=dlam, warmup_epochs=warmup_epochs,
                                               warmup_coeff=warmup_coeff, cooldown=cooldown)
    pool = None
    if pool_images is not None:
        pool = np.asarray(pool_images)
        if pool.ndim < 2 or pool.shape[0] == 0 or not np.issubdtype(pool.dtype, np.floating):
            raise ValueError(f"pool_images must be a float array (N, *example_shape) with N >= 1, got "
                             f"{pool.dtype} {pool.shape}.")
        if not np.all(np.isfinite(pool)):
            raise ValueError("pool_images contains NaN or inf values.")
        if init == "pairs" and pool.shape[0] < 2:
            raise ValueError("init='pairs' needs at least 2 pool images; pass more or use init='perturb'.")
    # step redraws from a pool happen inside the compiled step: the pool becomes one of its constants
    pool_device = jnp.asarray(pool) if pool is not None and redraw_every_steps is not None else None

    def fresh(u: Array, v: Array, step: Optional[Array] = None) -> dict:
        """New pairs; their steps start at ``init_step`` (also when ``step`` is given and steps are reset)."""
        if step is None or reset_step_on_redraw:
            step = jnp.full(u.shape[:1], init_step, u.dtype)
        return {"u": u, "v": v, "step": step, "quotient": jnp.zeros(u.shape[:1], u.dtype)}

    def from_pool(key: PRNGKey, dtype) -> "tuple[Array, Array]":
        # indices on the device, gather on the host: the pool itself never leaves host memory
        if isinstance(key, jax.core.Tracer):  # init traced (jit / eval_shape): the same draw, on the device
            return draw_pairs(key, jnp.asarray(pool, dtype), num_pairs, init=init, perturb_scale=perturb_scale,
                              perturb_dist=perturb_dist)
        k_idx, k_noise = jax.random.split(key)
        iu, iv = (np.asarray(i) for i in _pair_indices(k_idx, pool.shape[0], num_pairs, init))
        rows_u, rows_v = jnp.asarray(pool[iu], dtype), jnp.asarray(pool[iv], dtype)
        return _form_pairs(k_noise, rows_u, rows_v, init, perturb_scale, perturb_dist)

    def check_shape(example_shape: tuple) -> None:
        if pool is not None and tuple(pool.shape[1:]) != tuple(example_shape):
            raise ValueError(f"pool_images examples have shape {pool.shape[1:]} but the batch's have "
                             f"{tuple(example_shape)}; pass held-out examples of the training data.")

    def init_fn(key: PRNGKey, params: Params, batch: Batch) -> dict:
        del params
        if key is None:
            raise ValueError(f"{name}.init draws the initial pairs: pass a PRNG key.")
        if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)  # raw uint32 keys checkpoint like any array
        images = _images(batch)
        check_shape(images.shape[1:])
        k_pairs, k_state = jax.random.split(key)
        if pool is not None:
            u, v = from_pool(k_pairs, images.dtype)
        else:
            u, v = draw_pairs(k_pairs, images, num_pairs, init=init, perturb_scale=perturb_scale,
                              perturb_dist=perturb_dist)
        return {**fresh(u, v), "coeff": jnp.asarray(coeff0, jnp.float32), "count": jnp.zeros((), jnp.int32),
                "redraw": jnp.zeros((), jnp.int32), "key": k_state}

    def loss_fn(params: Params, state: dict, batch: Batch, key: PRNGKey, apply_fn: ApplyFn):
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"{name}: state lacks {missing}; build it with reg.init(key, params, batch).")
        u, v, step = state["u"], state["v"], state["step"]
        batch_flag = pool is None and redraw_every_epochs is not None  # otherwise epoch_end never sets the flag
        if batch_flag or redraw_every_steps is not None:
            if pool_device is None:
                images = _images(batch)
                if images.shape[1:] != u.shape[1:]:
                    raise ValueError(f"{name}: batch examples have shape {images.shape[1:]} but the pairs "
                                     f"{u.shape[1:]}; the state was built for other data.")
                source = images.astype(u.dtype)
                draw_key = jax.random.fold_in(state["key"], state["count"]) if key is None else key
            else:  # the same draw as from_pool's, on the device
                source = pool_device.astype(u.dtype)
                draw_key = jax.random.fold_in(state["key"], state["count"])
            due = state["redraw"] > 0 if batch_flag else jnp.zeros((), bool)
            if redraw_every_steps is not None:
                due = due | ((state["count"] > 0) & (state["count"] % redraw_every_steps == 0))

            def redraw():
                nu, nv = draw_pairs(draw_key, source, num_pairs, init=init, perturb_scale=perturb_scale,
                                    perturb_dist=perturb_dist)
                return nu, nv, fresh(nu, nv, step)["step"]

            u, v, step = lax.cond(due, redraw, lambda: (u, v, step))

        # the ascent adapts the pairs to the current network; it is not part of the parameters' objective
        frozen = lax.stop_gradient(params)
        u_new, v_new, new_step, quotients = pair_ascent_step(lambda xs: apply_fn(frozen, xs), u, v, step,
                                                             min_separation=min_separation, adaptive=adaptive)
        per_pair = tuple(range(1, u.ndim))
        accepted = jnp.any(u_new != u, axis=per_pair) | jnp.any(v_new != v, axis=per_pair)
        u, v = u_new, v_new
        best = jnp.argmax(quotients)
        u_star = lax.dynamic_index_in_dim(u, best, keepdims=True)
        v_star = lax.dynamic_index_in_dim(v, best, keepdims=True)
        lip = pair_quotients(lambda xs: apply_fn(params, xs), u_star, v_star)[0]
        term = jnp.square(lip) if squared else lip
        skipped = jnp.zeros((), bool) if skip_above is None else term > skip_above
        applied = jnp.where(skipped, jnp.zeros_like(term), term)

        # fixed leaf dtypes (a model may compute in another precision than its inputs): the step never retraces
        new_state = {**state, "u": u, "v": v, "step": new_step, "quotient": quotients.astype(state["quotient"].dtype),
                     "count": state["count"] + 1, "redraw": jnp.zeros_like(state["redraw"])}
        metrics = {
            name: applied,
            "max_quotient": lax.stop_gradient(lip),
            "coeff": state["coeff"],
            "skipped": skipped.astype(jnp.float32),
            "accept_rate": jnp.mean(accepted.astype(jnp.float32)),
        }
        return state["coeff"] * applied, new_state, metrics

    def epoch_end(state: dict, train_accuracy: Array, epoch: int) -> dict:
        if coeff_hook is not None:
            state = coeff_hook(state, train_accuracy, epoch)
        if redraw_every_epochs is None or (int(epoch) + 1) % redraw_every_epochs:
            return state
        if pool is None:
            return {**state, "redraw": jnp.ones_like(state["redraw"])}
        u, v = from_pool(jax.random.fold_in(state["key"], int(epoch)), state["u"].dtype)
        return {**state, **fresh(u, v, state["step"])}

    has_hook = coeff_hook is not None or redraw_every_epochs is not None
    return Regularizer(name=name, init=init_fn, loss=loss_fn, epoch_end=epoch_end if has_hook else None)
