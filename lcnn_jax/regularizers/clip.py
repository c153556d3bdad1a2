"""CLIP, cheap Lipschitz training (Bungert, Raab, Roith, Schwinn & Tenbrinck, SSVM 2021; SPEC 1.3).

The penalty is ``lam * Lip`` (or ``lam * Lip^2``) with

    Lip = max_i ||f(u_i) - f(v_i)||_2 / ||u_i - v_i||_2

over a pool of input pairs ``(u_i, v_i)`` that lives in the regularizer state and climbs towards
steep regions of ``f``:

1. **Ascent.** Every training step moves all pairs by one adaptive gradient-ascent step on their
   quotients, :func:`lcnn_jax.measures.lipschitz.pair_ascent_step` (``u <- u + tau_i L_i grad_u L_i``,
   same for ``v``; a pair keeps the move only if its quotient grew, then ``tau_i *= 1.3``, otherwise
   ``tau_i /= 1.3``). The ascent sees the parameters under ``stop_gradient``.
2. **Penalty.** Only the maximizing pair enters the loss: its quotient is recomputed with the live
   parameters, inputs under ``stop_gradient``, so the gradient reaches the parameters only.
   ``squared=True`` penalises ``L^2``; ``skip_above`` drops the term for a step whose penalty exceeds
   it (the reference code does both: squared quotient, skipped above 5000).
3. **Redraw.** Every ``redraw_every_epochs`` epochs the pairs are drawn afresh, with reset step sizes.
4. **Discrepancy principle.** With a ``target`` accuracy, after each epoch past ``warmup_epochs``:
   ``lam += dlam`` if the epoch's training accuracy exceeds the target, else
   ``lam = max(lam - dlam, 0)`` (:func:`discrepancy_principle`, shared with ``weight_l2``).
   ``lam`` is the float32 array ``state["coeff"]``, so moving it never recompiles the step.

Where pairs come from (``init``): ``"perturb"`` pairs an image ``x`` with ``x + perturb_scale * N(0, I)``;
``"pairs"`` pairs two different images. The images are

* ``pool_images`` when given (a host array of held-out examples, the SPEC's setting: the reference holds
  out 6000 of the 60000 MNIST training images). The pool stays on the host, never enters the compiled
  step or the checkpoint, and the state's shapes do not depend on it: the redraw runs in ``epoch_end``.
* otherwise the current training batch: ``init`` draws from the batch it is given, and a redraw sets a
  flag in the state so that the next step draws from *its* batch inside the compiled step. Images are
  sampled with replacement when the batch holds fewer than needed, so ``num_pairs`` may exceed it.

Either way the pool has the fixed shape ``(num_pairs, *example_shape)``. Redraws happen in
``epoch_end``: a custom training loop that never calls it keeps its initial pairs (and their ascent).
``loss`` is jittable; ``init`` and ``epoch_end`` run on the host (with a pool they index it in NumPy).

Cost per training step, on top of the step's own: the ascent is one forward + backward and one forward
pass on ``2 * num_pairs`` inputs; the penalty one forward + backward pass on 2 inputs. The ascent and
penalty call the model through the step's ``apply_fn`` (training mode): with training-mode batch norm the
pairs are normalised with their own batch statistics (the penalty with those of a batch of 2).

Reference facts (``TimRoith/CLIP``, for comparison): the pool is a batch of 1000 held-out images, giving
500 pairs; ``partial_random`` init pairs an image with a copy plus uniform ``U[0, 0.1)`` noise (ours is
Gaussian and symmetric); the ascent step is ``lr * grad(L^2) = 2 lr L grad L``, so our ``init_step`` is
twice their ``reg_lr`` (defaults 1.0, the published example uses 10); the lambda warm-up trains with
``lam = 0`` first (here ``warmup_coeff=0.0``).

Example::

    reg = clip(0.1, num_pairs=500, squared=True, skip_above=5000.0, target=0.9, dlam=0.01,
               warmup_epochs=5, warmup_coeff=0.0, pool_images=held_out.images)
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
from lcnn_jax.regularizers.base import EpochEndFn, Regularizer
from lcnn_jax.regularizers.gradient import check_coeff
from lcnn_jax.types import Array, ApplyFn, Batch, Params, PRNGKey

__all__ = ["clip", "draw_pairs", "discrepancy_principle", "discrepancy_update", "INITS"]

#: How a pair is formed from drawn images.
INITS = ("perturb", "pairs")

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
    state_key: str = "coeff",
) -> "tuple[float, Optional[EpochEndFn]]":
    """The coefficient schedule of CLIP (and of its weight-regularization baseline).

    Returns ``(initial_coeff, epoch_end)``. Epochs are counted from 0, as the fit loop passes them:

    * epochs ``0 .. warmup_epochs - 1`` train with ``warmup_coeff`` (``coeff`` when it is None); at the
      end of epoch ``warmup_epochs - 1`` the coefficient becomes ``coeff``;
    * after every later epoch, with ``target`` set: ``lam += dlam`` if the epoch's training accuracy is
      above ``target``, else ``lam = max(lam - dlam, 0)`` (:func:`discrepancy_update`).

    ``epoch_end(state, train_accuracy, epoch) -> state`` updates ``state[state_key]`` (keeping its shape
    and dtype, so the compiled step is reused); it is None when nothing would ever change (no target, no
    warm-up coefficient). ``target`` is a fraction in (0, 1), e.g. 0.9 for 90 %.
    """
    check_coeff(coeff)
    coeff = float(coeff)
    warmup_epochs = _non_negative_int(warmup_epochs, "warmup_epochs")
    warmup_coeff = _finite_number(warmup_coeff, "warmup_coeff", allow_none=True)
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
        if target is None:
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


def _form_pairs(key: PRNGKey, rows_u: Array, rows_v: Array, init: str, perturb_scale: float):
    if init == "pairs":
        return rows_u, rows_v
    return rows_u, rows_u + perturb_scale * jax.random.normal(key, rows_u.shape, rows_u.dtype)


def draw_pairs(key: PRNGKey, images: Array, num_pairs: int, *, init: str = "perturb",
               perturb_scale: float = 0.1) -> "tuple[Array, Array]":
    """Draw ``num_pairs`` pairs ``(u, v)`` from ``images`` (M, *example_shape); jittable.

    ``"perturb"``: ``u`` an image, ``v = u + perturb_scale * N(0, I)``. ``"pairs"``: two different images
    (identical only when M = 1). Rows are drawn without replacement when ``M`` suffices, else with.
    Returns two arrays of shape ``(num_pairs, *example_shape)`` and the dtype of ``images``.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}.")
    k_idx, k_noise = jax.random.split(key)
    iu, iv = _pair_indices(k_idx, images.shape[0], num_pairs, init)
    return _form_pairs(k_noise, images[iu], images[iv], init, perturb_scale)


# ------------------------------------------------------------------------------------------------ CLIP
def clip(
    coeff: Any = 0.1,
    *,
    num_pairs: int = 500,
    init: str = "perturb",
    perturb_scale: float = 0.1,
    redraw_every_epochs: Optional[int] = 1,
    squared: bool = False,
    skip_above: Optional[float] = None,
    init_step: float = 1.0,
    target: Optional[float] = None,
    dlam: Optional[float] = None,
    warmup_epochs: int = 0,
    warmup_coeff: Optional[float] = None,
    pool_images: Any = None,
    name: str = "clip",
) -> Regularizer:
    """CLIP: ``lam * max_i ||f(u_i) - f(v_i)|| / ||u_i - v_i||`` over adversarially updated pairs.

    Args:
      coeff: ``lam`` (finite, >= 0); ``state["coeff"]``, a float32 array.
      num_pairs: size of the pair pool (the reference: 500).
      init: ``"perturb"`` (image and a Gaussian perturbation of it) or ``"pairs"`` (two different images).
      perturb_scale: standard deviation of the ``"perturb"`` noise, in input units.
      redraw_every_epochs: redraw the pool (and reset step sizes) after every this many epochs, in
        ``epoch_end``; None keeps the initial pairs for the whole run.
      squared: penalise ``Lip^2`` (the reference) instead of ``Lip``.
      skip_above: drop the term (value and gradient 0) for a step whose penalty, after squaring if
        ``squared``, exceeds this; None never skips. The reference: ``squared=True, skip_above=5000``.
      init_step: initial per-pair ascent step ``tau`` (also after each redraw).
      target, dlam, warmup_epochs, warmup_coeff: the discrepancy principle, see
        :func:`discrepancy_principle`; ``target=None`` keeps ``lam`` fixed.
      pool_images: optional host array ``(N, *example_shape)`` of held-out examples to draw pairs from;
        None draws from the training batches.
      name: the regularizer's name and metrics key.

    State: ``u``, ``v`` (num_pairs, *example_shape) the pairs; ``step`` (num_pairs,) ascent steps;
    ``quotient`` (num_pairs,) the pairs' quotients after the last ascent step; ``coeff`` () float32 lam;
    ``count`` () int32 steps taken; ``redraw`` () int32 flag set by ``epoch_end`` when there is no pool (the
    next ``loss`` draws from its batch; ignored when ``redraw_every_epochs`` is None); ``key`` the
    regularizer's own PRNG key (redraws in ``epoch_end``; in-step draws use the step's key).

    Metrics: ``name`` the unweighted penalty added (0 when skipped), ``max_quotient`` the maximal quotient,
    ``coeff``, ``skipped`` (0/1) and ``accept_rate`` (fraction of pairs whose ascent step was accepted).
    """
    check_coeff(coeff)
    num_pairs = _positive_int(num_pairs, "num_pairs")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}.")
    perturb_scale = _finite_number(perturb_scale, "perturb_scale", positive=True)
    redraw_every_epochs = _positive_int(redraw_every_epochs, "redraw_every_epochs", allow_none=True)
    if not isinstance(squared, (bool, np.bool_)):
        raise ValueError(f"squared must be True or False, got {squared!r}.")
    skip_above = _finite_number(skip_above, "skip_above", positive=True, allow_none=True)
    init_step = _finite_number(init_step, "init_step", positive=True)
    coeff0, coeff_hook = discrepancy_principle(coeff, target=target, dlam=dlam, warmup_epochs=warmup_epochs,
                                               warmup_coeff=warmup_coeff)
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

    def fresh(u: Array, v: Array) -> dict:
        return {"u": u, "v": v, "step": jnp.full(u.shape[:1], init_step, u.dtype),
                "quotient": jnp.zeros(u.shape[:1], u.dtype)}

    def from_pool(key: PRNGKey, dtype) -> "tuple[Array, Array]":
        # indices on the device, gather on the host: the pool itself never leaves host memory
        k_idx, k_noise = jax.random.split(key)
        iu, iv = (np.asarray(i) for i in _pair_indices(k_idx, pool.shape[0], num_pairs, init))
        rows_u, rows_v = jnp.asarray(pool[iu], dtype), jnp.asarray(pool[iv], dtype)
        return _form_pairs(k_noise, rows_u, rows_v, init, perturb_scale)

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
            u, v = draw_pairs(k_pairs, images, num_pairs, init=init, perturb_scale=perturb_scale)
        return {**fresh(u, v), "coeff": jnp.asarray(coeff0, jnp.float32), "count": jnp.zeros((), jnp.int32),
                "redraw": jnp.zeros((), jnp.int32), "key": k_state}

    def loss_fn(params: Params, state: dict, batch: Batch, key: PRNGKey, apply_fn: ApplyFn):
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"{name}: state lacks {missing}; build it with reg.init(key, params, batch).")
        u, v, step = state["u"], state["v"], state["step"]
        if pool is None and redraw_every_epochs is not None:  # otherwise epoch_end never sets the flag
            images = _images(batch)
            if images.shape[1:] != u.shape[1:]:
                raise ValueError(f"{name}: batch examples have shape {images.shape[1:]} but the pairs "
                                 f"{u.shape[1:]}; the state was built for other data.")
            draw_key = jax.random.fold_in(state["key"], state["count"]) if key is None else key

            def redraw():
                nu, nv = draw_pairs(draw_key, images.astype(u.dtype), num_pairs, init=init,
                                    perturb_scale=perturb_scale)
                return nu, nv, jnp.full_like(step, init_step)

            u, v, step = lax.cond(state["redraw"] > 0, redraw, lambda: (u, v, step))

        # the ascent adapts the pairs to the current network; it is not part of the parameters' objective
        frozen = lax.stop_gradient(params)
        u, v, new_step, quotients = pair_ascent_step(lambda xs: apply_fn(frozen, xs), u, v, step)
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
            "accept_rate": jnp.mean((new_step > step).astype(jnp.float32)),
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
        return {**state, **fresh(u, v)}

    has_hook = coeff_hook is not None or redraw_every_epochs is not None
    return Regularizer(name=name, init=init_fn, loss=loss_fn, epoch_end=epoch_end if has_hook else None)
