"""The gradient-regularization family (Varga, Csiszárik & Zombori 2017/2018) as one template.

With ``z = f(x)`` the logits of one example, ``J = dz/dx`` its input Jacobian and ``p = softmax(z)``, every
penalty here is the batch mean of

    sum_m ||J^T r_m||^2

for a per-example choice of cotangents ``r_1 .. r_M`` in logit space:

=====================  ==========================  ================================  =======================
constructor            cotangents r                penalty                           extra passes per step
=====================  ==========================  ================================  =======================
``datagrad``           ``p - e_y`` (M = 1)         ``||grad_x CE||^2`` (double       1 fwd + 1 bwd
                                                   backprop)
``jacreg``             ``e_1 .. e_K`` (M = K)      ``||J||_F^2`` exactly             1 fwd + K bwd (or D
                                                                                     fwd tangents, D <= K)
``spectreg``           ``r = sqrt(K) u``, ``u``    unbiased estimate of ``||J||_F^2``  1 fwd + 1 bwd
                       uniform on the unit sphere
                       (or ``r ~ N(0, I)``; M = 1)
=====================  ==========================  ================================  =======================

(plus the backward pass through all of this when the training step differentiates the loss).

The comparator ``confidence_penalty`` (Pereyra et al. 2017) is ``-coeff * mean H(p)``. It is an *output-space*
penalty: it never touches ``J``, so it is **not** an instance of ``||J^T r||^2`` whatever the SPEC's summary says.
It shares the plumbing (constructor helper, ``{"coeff"}`` state, ``metrics[name]`` = unweighted penalty) so the
four are interchangeable in the training step and in coefficient sweeps.

Batching. All of ``J^T r`` for a batch comes from ONE ``jax.vjp`` of ``xs -> apply_fn(params, xs)``: because the
cotangent of example ``i`` only reaches input ``i``, the batched VJP is the stack of per-example VJPs. That holds
when examples are independent (eval mode, no batch norm, or batch norm with running statistics). In training
mode batch norm couples the examples and the batched VJP then also carries cross-example terms; this is the same
quantity the reference implementations differentiate (they take ``grad`` of the *batch* loss w.r.t. the input
batch), so we keep it and only flag it here.

Example::

    reg = datagrad(1e-2)
    state = reg.init(key, params, batch)              # {"coeff": Array(0.01, float32)}
    value, state, metrics = reg.loss(params, state, batch, key, apply_fn)
    total = cross_entropy + value                     # metrics["datagrad"] is the unweighted penalty
"""
from __future__ import annotations

import math
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.regularizers.base import (Regularizer, batch_images, batch_labels, check_coeff,  # noqa: F401
                                        check_logits, empty_state, per_example_sq_norm)
from lcnn_jax.types import Array, ApplyFn, Batch, Params, PRNGKey

# (key, logits (B, K), labels (B,) or None) -> cotangents (M, B, K)
CotangentFn = Callable[[PRNGKey, Array, Union[Array, None]], Array]
# (params, batch, key, apply_fn) -> unweighted scalar penalty
PenaltyFn = Callable[[Params, Batch, PRNGKey, ApplyFn], Array]

__all__ = [
    "CotangentFn",
    "penalty_regularizer",
    "jacobian_penalty",
    "datagrad",
    "jacreg",
    "spectreg",
    "confidence_penalty",
    "datagrad_cotangents",
    "jacreg_cotangents",
    "spectreg_cotangents",
    "spectreg_sphere_cotangents",
    "SPECTREG_PROBES",
]


# ------------------------------------------------------------------------------------------------ plumbing
def penalty_regularizer(name: str, coeff: Any, penalty_fn: PenaltyFn) -> Regularizer:
    """Wrap an unweighted penalty into a :class:`Regularizer` whose coefficient lives in ``state["coeff"]``.

    ``loss`` returns ``(state["coeff"] * penalty, state, {name: penalty})``; the coefficient is a float32 array, so
    changing it never retraces and a stack of states can be ``vmap``ped.
    """
    check_coeff(coeff)

    def init(key: PRNGKey, params: Params, batch: Batch) -> dict:
        del key, params, batch
        return empty_state(coeff)

    def loss(params: Params, state: dict, batch: Batch, key: PRNGKey, apply_fn: ApplyFn):
        if "coeff" not in state:
            raise ValueError(f"{name}: state has no 'coeff'; build it with reg.init(key, params, batch).")
        penalty = penalty_fn(params, batch, key, apply_fn)
        return state["coeff"] * penalty, state, {name: penalty}

    return Regularizer(name=name, init=init, loss=loss)


# ------------------------------------------------------------------------------------------------ cotangents
def datagrad_cotangents(key: PRNGKey, logits: Array, labels: Array) -> Array:
    """``r = softmax(z) - onehot(y)``: ``J^T r = grad_x CE``. Not stop-gradiented, so parameter gradients are
    those of ``||grad_x CE||^2`` (double backprop)."""
    del key
    if labels is None:
        raise ValueError("datagrad needs integer class labels: pass batch['label'] of shape (B,).")
    r = jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return r[None]


def jacreg_cotangents(key: PRNGKey, logits: Array, labels: Array) -> Array:
    """The K one-hot cotangents ``e_k`` (the same for every example): ``sum_k ||J^T e_k||^2 = ||J||_F^2``."""
    del key, labels
    n, k = logits.shape
    return jnp.broadcast_to(jnp.eye(k, dtype=logits.dtype)[:, None, :], (k, n, k))


def spectreg_cotangents(key: PRNGKey, logits: Array, labels: Array) -> Array:
    """One Gaussian ``r ~ N(0, I_K)`` per example: ``E ||J^T r||^2 = tr(J J^T) = ||J||_F^2``; the variance of one
    draw is ``2 ||J J^T||_F^2``. SpectReg's ``probes="gaussian"``."""
    del labels
    if key is None:
        raise ValueError("spectreg draws random projections: pass a PRNG key (fold the step in for freshness).")
    return jax.random.normal(key, (1,) + logits.shape, logits.dtype)


def spectreg_sphere_cotangents(key: PRNGKey, logits: Array, labels: Array) -> Array:
    """One ``r = sqrt(K) u`` per example, ``u`` uniform on the unit sphere of R^K (Hoffman, Roberts & Yaida 2019):
    ``E[u u^T] = I / K``, so ``E ||J^T r||^2 = ||J||_F^2`` too, with the smaller variance
    ``2K / (K + 2) (||J J^T||_F^2 - ||J||_F^4 / K)`` (:func:`lcnn_jax.measures.jacobian.probe_variance`). The same
    Gaussian draw as :func:`spectreg_cotangents`, rescaled to length ``sqrt(K)``. SpectReg's default."""
    r = spectreg_cotangents(key, logits, labels)
    norm = jnp.sqrt(jnp.sum(jnp.square(r), axis=-1, keepdims=True))
    return r * (math.sqrt(logits.shape[-1]) / jnp.maximum(norm, jnp.finfo(r.dtype).tiny))


_KINDS = {"datagrad": datagrad_cotangents, "jacreg": jacreg_cotangents, "spectreg": spectreg_sphere_cotangents}
#: SpectReg's probe distributions; ``"auto"`` is ``"sphere"``, whose variance is never the larger.
SPECTREG_PROBES = ("auto", "sphere", "gaussian")


# ------------------------------------------------------------------------------------------------ the template
def _vjp_penalty(cotangents: CotangentFn, params: Params, batch: Batch, key: PRNGKey, apply_fn: ApplyFn,
                 vjp_batch: int | None = None) -> Array:
    """``mean_i sum_m ||J_i^T r_{m,i}||^2`` with ONE forward pass and M backward passes: all M in one vmapped
    backward (``vjp_batch=None``), or in vmapped groups of ``vjp_batch`` one after another (see :func:`jacreg`)."""
    xs = batch_images(batch)
    logits, vjp_fn = jax.vjp(lambda inputs: apply_fn(params, inputs), xs)
    check_logits(logits, xs)
    labels = batch_labels(batch, xs.shape[0]) if "label" in batch else None
    r = cotangents(key, logits, labels)
    if r.ndim != 3 or r.shape[1:] != logits.shape:
        raise ValueError(f"cotangents must have shape (M, B, K) with (B, K) = {logits.shape}, got {r.shape}.")
    m = r.shape[0]
    size = m if vjp_batch is None else max(1, min(int(vjp_batch), m))
    total = 0.0
    for start in range(0, m, size):  # unrolled: at most M groups
        (jtr,) = jax.vmap(vjp_fn)(r[start:start + size])  # (size, B, *input_shape)
        total = total + jnp.sum(per_example_sq_norm(jtr, 2), axis=0)
    return jnp.mean(total)


def _jvp_frobenius(params: Params, batch: Batch, key: PRNGKey, apply_fn: ApplyFn) -> Array:
    """``mean_i ||J_i||_F^2 = mean_i sum_d ||J_i e_d||^2`` with D (vmapped) forward tangents; cheaper than K
    backward passes when the input dimension D is smaller than the number of outputs K."""
    del key
    xs = batch_images(batch)
    d = math.prod(xs.shape[1:])
    logits, jvp_fn = jax.linearize(lambda inputs: apply_fn(params, inputs), xs)
    check_logits(logits, xs)
    # tangent e_d for every example at once: examples are independent, so one batched JVP per input direction
    basis = jnp.eye(d, dtype=xs.dtype).reshape((d, 1) + xs.shape[1:])
    jv = jax.vmap(jvp_fn)(jnp.broadcast_to(basis, (d,) + xs.shape))  # (D, B, K)
    return jnp.mean(jnp.sum(per_example_sq_norm(jv, 2), axis=0))


def jacobian_penalty(kind: Union[str, CotangentFn], coeff: Any, *, name: str | None = None) -> Regularizer:
    """The template: ``coeff * mean_i sum_m ||J_i^T r_{m,i}||^2`` with cotangents chosen by ``kind``.

    Args:
      kind: ``"datagrad"``, ``"jacreg"``, ``"spectreg"``, or a function ``(key, logits (B, K), labels (B,) | None)
        -> cotangents (M, B, K)``. Cotangents may depend on the logits (and then on the parameters: they are
        differentiated through, as DataGrad requires).
      coeff: finite scalar >= 0; stored as a float32 array in ``state["coeff"]``.
      name: the regularizer's name and metrics key; defaults to ``kind`` when it is a string.

    Cost: one forward pass plus M backward passes through the model (vmapped), on top of the training step's own.
    """
    if isinstance(kind, str):
        if kind not in _KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose one of {sorted(_KINDS)} or pass a cotangent function.")
        cotangents, name = _KINDS[kind], name or kind
    elif callable(kind):
        cotangents, name = kind, name or getattr(kind, "__name__", "jacobian_penalty")
    else:
        raise ValueError(f"kind must be a string or a cotangent function, got {type(kind).__name__}.")

    def penalty(params, batch, key, apply_fn):
        return _vjp_penalty(cotangents, params, batch, key, apply_fn)

    return penalty_regularizer(name, coeff, penalty)


# ------------------------------------------------------------------------------------------------ public family
def datagrad(coeff: Any) -> Regularizer:
    """DataGrad / double backprop: ``coeff * mean_i ||grad_x CE(f(x_i), y_i)||^2 = ||J^T (p - e_y)||^2``.

    Scale, for coefficients ported from PyTorch: the penalty is the mean over the B examples of each example's
    own squared input gradient. PyTorch double-backprop code usually penalises the squared input gradient of the
    MEAN loss, ``||grad_X (1/B) sum_i CE_i||^2 = (1/B^2) sum_i ||grad_x CE_i||^2`` (examples are independent), which
    is this penalty divided by B. So ``coeff = lambda_torch / B`` reproduces a PyTorch ``lambda_torch`` at batch
    size B (e.g. 0.01 at batch 128 -> 7.8e-5); ours does not change with the batch size, theirs does.

    Needs ``batch["label"]``. Cost: 1 forward + 1 backward pass (then differentiated by the training step).
    """
    return jacobian_penalty("datagrad", coeff)


def jacreg(coeff: Any, *, mode: str = "auto", vjp_batch: int | str = "auto") -> Regularizer:
    """JacReg: exact ``coeff * mean_i ||J_i||_F^2``.

    ``mode="reverse"``: the template with the K one-hot cotangents (1 forward + K input-space backward passes;
    the training step's gradient then runs back through all of them, so a step costs about K + 2 plain steps).
    ``mode="forward"``: D forward tangents (linearize once, D JVPs), for inputs smaller than the output. ``"auto"``
    picks forward when D <= K, else reverse (decided from static shapes at trace time).

    ``vjp_batch``: how many of the K backward passes run as one vmapped backward (the vmap folds them into the
    batch axis, a K x larger batch). ``"auto"``: 1 on the CPU (the K passes one after another), all K on other
    platforms. On XLA:CPU the vmapped form is the slower one (one K x wider backward costs more than K backward
    passes; figures in ``experiments/results/loops.md``, from ``experiments/bench_regularizers.py --only
    jacreg``); on accelerators one wide backward is the usual win. An int fixes it (memory grows with it).
    """
    if mode not in ("auto", "reverse", "forward"):
        raise ValueError(f"jacreg mode must be 'auto', 'reverse' or 'forward', got {mode!r}.")
    if vjp_batch != "auto" and not (isinstance(vjp_batch, (int, np.integer)) and not isinstance(vjp_batch, bool)
                                    and vjp_batch >= 1):
        raise ValueError(f"jacreg vjp_batch must be 'auto' or an integer >= 1, got {vjp_batch!r}.")

    def penalty(params, batch, key, apply_fn):
        xs = batch_images(batch)
        chosen = mode
        if mode == "auto":
            out = jax.eval_shape(lambda inputs: apply_fn(params, inputs), xs)
            check_logits(out, xs)
            chosen = "forward" if math.prod(xs.shape[1:]) <= out.shape[-1] else "reverse"
        if chosen == "forward":
            return _jvp_frobenius(params, batch, key, apply_fn)
        group = vjp_batch
        if group == "auto":  # the platform the step is being compiled for (trace time, static)
            group = 1 if jax.default_backend() == "cpu" else None
        return _vjp_penalty(jacreg_cotangents, params, batch, key, apply_fn, vjp_batch=group)

    return penalty_regularizer("jacreg", coeff, penalty)


def spectreg(coeff: Any, *, probes: str = "auto") -> Regularizer:
    """SpectReg: ``coeff * mean_i ||J_i^T r_i||^2`` with a fresh random ``r_i`` per example per step.

    Unbiased for ``||J||_F^2`` (``E[r r^T] = I``). ``probes``: ``"sphere"`` (``r = sqrt(K) u``, ``u`` uniform on
    the unit sphere, :func:`spectreg_sphere_cotangents`), or ``"gaussian"`` (``r ~ N(0, I_K)``, Varga et al.'s
    choice); ``"auto"`` (default) is ``"sphere"``, whose variance is below the Gaussian one for every ``J``
    (runs before this option existed used Gaussian probes). Randomness comes only from the ``key`` passed to
    ``loss``: give a new key each step (``jax.random.fold_in(key, step)``). Cost: 1 forward + 1 backward pass.
    """
    if probes not in SPECTREG_PROBES:
        raise ValueError(f"spectreg probes must be one of {SPECTREG_PROBES} ('auto' = 'sphere'), got {probes!r}.")
    kind = spectreg_cotangents if probes == "gaussian" else spectreg_sphere_cotangents
    return jacobian_penalty(kind, coeff, name="spectreg")


def _negative_entropy(params: Params, batch: Batch, key: PRNGKey, apply_fn: ApplyFn) -> Array:
    del key
    xs = batch_images(batch)
    logits = apply_fn(params, xs)
    check_logits(logits, xs)
    # p * log_softmax stays finite where p underflows to 0 (log p would be -inf and 0 * -inf = nan)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


def confidence_penalty(coeff: Any) -> Regularizer:
    """Confidence penalty (Pereyra et al. 2017): ``-coeff * mean_i H(p_i)``, ``H(p) = -sum_k p_k log p_k``.

    The comparator of the family, but an *output-space* penalty: it does not involve ``J`` and is not of the form
    ``||J^T r||^2``; it only shares the plumbing. ``metrics["confidence_penalty"]`` is ``-mean H`` (unweighted).
    Cost: 1 forward pass.
    """
    return penalty_regularizer("confidence_penalty", coeff, _negative_entropy)
