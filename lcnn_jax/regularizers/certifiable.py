"""Training for certified robustness: a Lipschitz-margin loss and a CRT-style curvature penalty.

Both read the differentiable pairwise bounds of :func:`lcnn_jax.nn.lipschitz.training_bounds` (models built from
1-Lipschitz layers, ``aol_mlp`` / ``aol_cnn``): ``L_ij >= sup_x ||grad (z_i - z_j)(x)||`` and
``K_ij >= sup_x ||D^2 (z_i - z_j)(x)||``, each never below the certified bound that
:func:`lcnn_jax.measures.curvature_bound` gives for the same parameters, so what training optimises is what
certification can use.

* ``lipschitz_margin`` (name ``"lipschitz_margin"``): GloRo's bottom logit (Leino, Wang & Fredrikson, ICML 2021),
  with the pairwise bounds of the true label ``y``: ``z_bot = max_{j != y} (z_j + eps L_yj)``, and the term
  ``coeff * CE([z_1, ..., z_K, z_bot], y)``. ``z_y > z_bot`` is exactly the Lipschitz-margin certificate at radius
  ``eps``, so the loss is small only for examples certified at ``eps``. ``variant="tsuzuku"`` instead adds
  ``eps L_yj`` to every ``z_j``, ``j != y`` (Tsuzuku, Sato & Sugiyama, NeurIPS 2018, with pairwise constants).
  ``variant="trades"`` is GloRo's TRADES loss (the one its best published results use): the term is
  ``coeff * KL(p || q)`` with ``p = softmax(z)`` (0 for the bottom class) and ``q = softmax([z, z_bot])``, the
  bottom logit taken for the *predicted* class ``c``, ``max_{j != c} (z_j + eps L_cj)``; in closed form
  ``KL = softplus(z_bot - logsumexp(z))`` (:func:`trades_kl`). It asks the network to be certifiably consistent
  with its own prediction and leaves accuracy to the cross-entropy, where ``gloro`` asks for certified *correct*
  predictions.
  ``eps`` can grow linearly over the first ``warmup_epochs`` epochs (GloRo anneals it), by the ``epoch_end`` hook.
  The term is added to the step's plain cross-entropy (the trainer always has it); a ``coeff`` of a few makes the
  margin loss dominate.
* ``curvature_penalty`` (name ``"crt"``): ``coeff * max_{i != j} K_ij``, the certified curvature bound of the
  logit differences of a smooth network (centred softplus), as in CRT (Singla & Feizi, ICML 2020), whose
  second-order certificate :mod:`lcnn_jax.measures.certified` computes (``2 g / (G + sqrt(G^2 + 2 K g))``).

Example::

    import jax, jax.numpy as jnp
    from lcnn_jax.nn.models import make_model
    from lcnn_jax.regularizers.certifiable import lipschitz_margin
    net = make_model("aol_mlp", 10, widths=(16,))
    batch = {"image": jnp.zeros((4, 8, 8, 1)), "label": jnp.arange(4)}
    params = net.init(jax.random.PRNGKey(0), batch["image"])["params"]
    apply_fn = lambda p, x: net.apply({"params": p}, x)
    reg = lipschitz_margin(eps=1.0, coeff=3.0, warmup_epochs=10)
    state = reg.init(jax.random.PRNGKey(1), params, batch)          # {"coeff", "eps", "eps_target"}
    value, state, metrics = reg.loss(params, state, batch, jax.random.PRNGKey(2), apply_fn)
    state = reg.epoch_end(state, jnp.float32(0.9), 0)     # on the host after each epoch: the eps ramp

Cost: ``lipschitz_margin``: one extra forward pass (the step's own pass gives the plain CE) and ``O(K^2 d)`` for
the bounds; ``crt``: ``O(K^2 d)``, no pass through the network.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lcnn_jax.nn.lipschitz import check_lipschitz_params, is_smooth, training_bounds
from lcnn_jax.regularizers.base import Regularizer
from lcnn_jax.types import ApplyFn, Array, Batch, Params, PRNGKey

__all__ = ["lipschitz_margin", "curvature_penalty", "margin_logits", "trades_kl"]

VARIANTS = ("gloro", "tsuzuku")  # of margin_logits
LOSS_VARIANTS = VARIANTS + ("trades",)  # of lipschitz_margin


def _check_number(value: Any, name: str, *, positive: bool = False) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value!r}")


def margin_logits(logits: Array, labels: Array, pair_l: Array, eps: Array, variant: str = "gloro") -> Array:
    """The logits the margin loss takes the cross-entropy of.

    ``gloro``: ``(B, K + 1)``, the logits and ``z_bot = max_{j != y} (z_j + eps L_yj)`` last; ``tsuzuku``:
    ``(B, K)``, ``z_j + eps L_yj`` for ``j != y`` and ``z_y`` unchanged. ``argmax = y`` iff the example is
    certified at ``eps`` by the pairwise Lipschitz certificate with ``pair_l``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    k = logits.shape[-1]
    ly = pair_l[labels]  # (B, K), 0 at the label (the diagonal)
    onehot = jax.nn.one_hot(labels, k, dtype=bool)
    shifted = logits + eps * ly
    if variant == "tsuzuku":
        return jnp.where(onehot, logits, shifted)
    bottom = jnp.max(jnp.where(onehot, -jnp.inf, shifted), axis=-1, keepdims=True)
    return jnp.concatenate([logits, bottom], axis=-1)


def trades_kl(logits: Array, pair_l: Array, eps: Array) -> Array:
    """Per example ``KL(softmax(z) || softmax([z, z_bot]))``, ``z_bot`` the bottom logit of the predicted class.

    With ``c = argmax z`` and ``z_bot = max_{j != c} (z_j + eps L_cj)``, every ratio ``p_i / q_i`` of the two
    distributions is ``(S + e^{z_bot}) / S`` with ``S = sum_i e^{z_i}``, so the KL is
    ``log(1 + e^{z_bot} / S) = softplus(z_bot - logsumexp(z))``: small iff the bottom logit is far below the
    logits' log-partition, i.e. the prediction is certified at ``eps`` with room to spare. ``c`` carries no
    gradient (an argmax). Shape ``(B,)``; cost ``O(B K)`` beyond the logits and the pairwise bounds.
    """
    predicted = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1))
    bottom = margin_logits(logits, predicted, pair_l, eps, "gloro")[:, -1]
    return jax.nn.softplus(bottom - jax.nn.logsumexp(logits, axis=-1))


def lipschitz_margin(eps: float = 1.0, coeff: float = 1.0, *, variant: str = "gloro", warmup_epochs: int = 0,
                     head: str = "head") -> Regularizer:
    """The Lipschitz-margin loss ``coeff * CE(margin_logits(z, y, L_pair, eps), y)`` (see the module docstring;
    ``variant="trades"``: ``coeff * mean trades_kl(z, L_pair, eps)``).

    ``eps``: the training radius (L2, inputs in [0, 1]); ``warmup_epochs``: eps grows as
    ``eps * min(1, (epoch + 1) / warmup_epochs)`` after each epoch, starting at ``eps / warmup_epochs`` (0: fixed).
    State ``{"coeff", "eps", "eps_target"}`` (float32 arrays). Metrics: ``margin_ce`` (unweighted; ``margin_kl``
    for trades),
    ``certified`` (batch fraction certified at the current eps by the training bound), ``eps``,
    ``bound_max`` (the largest ``L_ij``). ``init`` raises ``ValueError`` when the model is not built from the
    1-Lipschitz layers of :mod:`lcnn_jax.nn.lipschitz`.
    """
    _check_number(eps, "lipschitz_margin: eps", positive=True)
    _check_number(coeff, "lipschitz_margin: coeff")
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"lipschitz_margin: variant must be one of {LOSS_VARIANTS}, got {variant!r}")
    if not isinstance(warmup_epochs, int) or isinstance(warmup_epochs, bool) or warmup_epochs < 0:
        raise ValueError(f"lipschitz_margin: warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
    eps0 = float(eps) / warmup_epochs if warmup_epochs else float(eps)

    def init(key: PRNGKey, params: Params, batch: Batch) -> dict:
        del key, batch
        check_lipschitz_params(params, head)
        return {"coeff": jnp.asarray(coeff, jnp.float32), "eps": jnp.asarray(eps0, jnp.float32),
                "eps_target": jnp.asarray(eps, jnp.float32)}

    def loss(params: Params, state: dict, batch: Batch, key: PRNGKey, apply_fn: ApplyFn):
        del key
        xs, labels = batch["image"], batch["label"]
        logits = apply_fn(params, xs)
        pair_l, _ = training_bounds(params, head)
        z = margin_logits(logits, labels, pair_l, state["eps"], "gloro" if variant == "trades" else variant)
        certified = jnp.mean(jnp.argmax(z, axis=-1) == labels)
        if variant == "trades":
            term, name = trades_kl(logits, pair_l, state["eps"]).mean(), "margin_kl"
        else:
            term, name = optax.softmax_cross_entropy_with_integer_labels(z, labels).mean(), "margin_ce"
        metrics = {name: term, "certified": certified, "eps": state["eps"], "bound_max": jnp.max(pair_l)}
        return state["coeff"] * term, state, metrics

    def epoch_end(state: dict, train_accuracy: Array, epoch: int) -> dict:
        del train_accuracy
        if not warmup_epochs:
            return state
        frac = min(1.0, (int(epoch) + 2) / warmup_epochs)  # the eps of the next epoch (epoch counts from 0)
        return {**state, "eps": jnp.asarray(state["eps_target"] * frac, jnp.float32)}

    return Regularizer(name="lipschitz_margin", init=init, loss=loss, epoch_end=epoch_end)


def curvature_penalty(coeff: float = 1e-2, *, head: str = "head") -> Regularizer:
    """CRT-style penalty ``coeff * max_{i != j} K_ij`` on the certified curvature bound of the logit differences.

    Needs a smooth model of :mod:`lcnn_jax.nn.lipschitz` (``activation="centred_softplus"``); ``init`` raises
    ``ValueError`` for a piecewise-linear one (its curvature bound is infinite) or another model. State
    ``{"coeff"}``; metrics ``curvature_bound`` (unweighted). Name ``"crt"``.
    """
    _check_number(coeff, "crt: coeff")

    def init(key: PRNGKey, params: Params, batch: Batch) -> dict:
        del key, batch
        check_lipschitz_params(params, head)
        if not is_smooth(params):
            raise ValueError("crt: the model's curvature bound is infinite (a piecewise-linear activation such as "
                             "MinMax); build it with model.kwargs.activation='centered_softplus'.")
        return {"coeff": jnp.asarray(coeff, jnp.float32)}

    def loss(params: Params, state: dict, batch: Batch, key: PRNGKey, apply_fn: ApplyFn):
        del batch, key, apply_fn
        _, pair_k = training_bounds(params, head)
        k = jnp.max(pair_k)
        return state["coeff"] * k, state, {"curvature_bound": k}

    return Regularizer(name="crt", init=init, loss=loss)
