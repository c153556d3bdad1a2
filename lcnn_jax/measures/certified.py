"""Certified L2 robustness from certified Lipschitz and curvature bounds (no attack can do better).

With logits ``z = f(x)``, label ``y`` and margins ``g_j(x) = z_y - z_j`` (j != y), the prediction at ``x + d`` is
still ``y`` whenever every ``g_j(x + d) > 0``. Three sufficient conditions, each for one pair ``(y, j)``, from
bounds that hold for every input (:func:`lcnn_jax.measures.curvature_bound`, :func:`~lcnn_jax.measures.function_bound`):

* **global Lipschitz** (Tsuzuku, Sato & Sugiyama, "Lipschitz-Margin Training", NeurIPS 2018, Prop. 1): if ``f`` is
  ``L``-Lipschitz in the L2 norm, ``g_j = (e_y - e_j)^T f`` is ``sqrt(2) L``-Lipschitz (``||e_y - e_j|| = sqrt 2``), so
  ``g_j(x) > sqrt(2) L eps`` certifies the pair within radius ``eps``. The constant ``sqrt(2)`` is theirs.
* **pairwise** (the same argument, pair by pair): ``g_j`` is ``L_yj``-Lipschitz with
  ``L_yj = ||a_y - a_j|| L_h`` when the network ends in an affine head ``z = A h + c`` (``a_k`` the rows of ``A``,
  ``L_h`` the bound of the head's input ``h``): ``CurvatureBound.pairwise_lipschitz``, never above ``sqrt(2) L`` nor
  ``L_y + L_j``. Certified radius of the pair: ``g_j(x) / L_yj``.
* **curvature** (for twice-differentiable networks only, e.g. LCNN; not for ReLU or max pooling): if
  ``||D^2 g_j|| <= K_yj`` everywhere, Taylor's theorem with the Lagrange remainder along the segment gives
  ``g_j(x + d) >= g_j(x) - ||grad g_j(x)|| ||d|| - K_yj ||d||^2 / 2``, positive for
  ``||d|| < r_j = 2 g_j / (G_j + sqrt(G_j^2 + 2 K_yj g_j))`` (``G_j = ||grad g_j(x)||``, the root of the quadratic,
  written without cancellation; ``g_j / G_j`` when ``K_yj = 0``). ``K_yj`` is
  ``CurvatureBound.pairwise_curvature`` (``||a_y - a_j||`` times the head input's curvature bound). Unlike the
  others this uses the gradient at ``x`` (K backward passes per example); it helps where the gradient is much
  smaller than the global Lipschitz bound and the curvature bound is small, i.e. at small radii of smooth networks.
  It is sound only with a curvature bound that holds everywhere (``almost_everywhere=False``, finite).

Per pair the larger of the radii holds; the certified radius of an example is the smallest over ``j != y`` (0 if
the example is misclassified or tied). An example is **certified at eps** when its radius exceeds ``eps``
strictly. The box ``[0, 1]`` only removes perturbations, so the certificates hold for attacks that respect it.

What is certified: the exact real-number function the parameters define, as the bounds are (see
:mod:`lcnn_jax.measures.bounds`); the margins and gradients are evaluated in the model's float32, whose rounding
(about 1e-6 relative) is not accounted for.

Example::

    import jax, jax.numpy as jnp
    from lcnn_jax.measures import certified, function_bound
    w = jax.random.normal(jax.random.key(0), (16, 3))
    logits_fn = lambda xs: jnp.tanh(xs.reshape(len(xs), -1) @ w) @ w.T[:, :3]
    xs = jax.random.uniform(jax.random.key(1), (8, 16))
    ys = jnp.argmax(logits_fn(xs), axis=-1)
    bound = function_bound(logits_fn, jax.ShapeDtypeStruct((1, 16), jnp.float32))
    cert = certified.certify(logits_fn, xs, ys, bound)
    cert.radius, cert.accuracy(0.1)        # per-example certified L2 radius; certified accuracy at eps 0.1
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.autodiff import check_positive_int
from lcnn_jax.measures.bounds import CurvatureBound
from lcnn_jax.types import Array

__all__ = ["Certificate", "certify", "certified_radii", "margin_terms", "curvature_radius", "pair_matrices",
           "curvature_certificate_is_sound"]

SQRT2 = math.sqrt(2.0)


class Certificate(NamedTuple):
    """Per-example certified L2 radii (numpy arrays of shape (N,)).

    radius: the best certified radius (0 where the example is misclassified).
    lipschitz_radius: from the first-order certificates alone (pairwise where the bound has them, else
      ``sqrt(2) L``).
    curvature_radius: from the curvature certificate alone; None when it was not used.
    margin: ``z_y - max_{j != y} z_j`` (negative when misclassified).
    method: which certificates entered (``"lipschitz"``, ``"pairwise"``, ``"+curvature"``).
    """

    radius: np.ndarray
    lipschitz_radius: np.ndarray
    curvature_radius: np.ndarray | None
    margin: np.ndarray
    method: str

    def accuracy(self, eps: float) -> float:
        """Certified accuracy at L2 radius ``eps``: the fraction of examples whose radius exceeds ``eps``."""
        if not np.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite non-negative radius, got {eps!r}.")
        return float(np.mean(self.radius > eps))

    def certified_by(self, eps: float) -> np.ndarray:
        """Per example, which certificate certifies it at L2 radius ``eps`` (object array of str): the first-order
        one (``"pairwise"`` or ``"lipschitz"``) when its radius alone exceeds ``eps``, else ``"curvature"`` when the
        second-order radius alone does, else ``"mixed"`` (each pair ``(y, j)`` is certified by one of them, not
        all by the same), and ``""`` for an example not certified at ``eps``. The first-order certificate is
        named first when both hold (it needs no gradient)."""
        if not np.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite non-negative radius, got {eps!r}.")
        first = self.method.split("+")[0]
        out = np.full(self.radius.shape, "", dtype=object)
        cert = self.radius > eps
        out[cert] = "mixed"
        if self.curvature_radius is not None:
            out[cert & (self.curvature_radius > eps)] = "curvature"
        out[cert & (self.lipschitz_radius > eps)] = first
        return out


def curvature_radius(g, grad_norm, curvature) -> np.ndarray:
    """The radius ``r`` where ``g - G r - K r^2 / 2`` reaches 0: ``2 g / (G + sqrt(G^2 + 2 K g))`` (0 where
    ``g <= 0``; ``g / G`` when ``K = 0``; ``inf`` where ``G = K = 0`` and ``g > 0``). Arrays broadcast; float64."""
    g, G, K = (np.asarray(a, np.float64) for a in (g, grad_norm, curvature))
    g, G, K = np.broadcast_arrays(g, G, K)
    pos = g > 0
    denom = G + np.sqrt(G * G + 2.0 * K * np.where(pos, g, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(denom > 0, 2.0 * g / np.where(denom > 0, denom, 1.0), np.inf)
    return np.where(pos, r, 0.0)


def _check_bound(bound) -> None:
    if not isinstance(bound, CurvatureBound):
        raise ValueError(f"bound must be a CurvatureBound from curvature_bound/function_bound, got "
                         f"{type(bound).__name__}.")


def pair_matrices(bound: CurvatureBound) -> tuple[np.ndarray, np.ndarray, str]:
    """``(L_pair, K_pair, name)``: bounds on the slope and curvature of every logit difference ``z_i - z_j``, as
    (K, K) float64 arrays: the bound's pairwise ones when it has them (``name = "pairwise"``), else
    ``min(sqrt(2) L, L_i + L_j)`` and ``min(sqrt(2) K, K_i + K_j)`` from the whole network's and the per-output
    bounds (``name = "lipschitz"``)."""
    _check_bound(bound)
    per_l = np.asarray(bound.lipschitz, np.float64)
    per_k = np.asarray(bound.curvature, np.float64)
    if bound.pairwise_lipschitz is not None:
        return (np.asarray(bound.pairwise_lipschitz, np.float64), np.asarray(bound.pairwise_curvature, np.float64),
                "pairwise")
    l_pair = np.minimum(SQRT2 * float(bound.network.lipschitz), per_l[:, None] + per_l[None, :])
    k_pair = np.minimum(SQRT2 * float(bound.network.curvature), per_k[:, None] + per_k[None, :])
    return l_pair, k_pair, "lipschitz"


def margin_terms(logits_fn: Callable[[Array], Array], xs: Array, ys: Array, *, gradients: bool) -> dict:
    """Traceable: ``{"logits": (B, K)}`` and, with ``gradients``, ``"grad_norms"``: (B, K) with entry ``(b, j)`` =
    ``||grad_x (z_y - z_j)(x_b)||`` (0 at ``j = y``). ``logits_fn`` is batched and must treat examples
    independently (eval mode). Cost: one forward pass, plus K backward passes (vmapped) with ``gradients``."""
    ys = ys.astype(jnp.int32)
    if not gradients:
        return {"logits": logits_fn(xs)}
    logits, vjp_fn = jax.vjp(logits_fn, xs)
    k = logits.shape[-1]
    # cotangent j of example b: e_{y_b} - e_j; the batched VJP of the summed outputs gives every example's own
    cot = jax.nn.one_hot(ys, k, dtype=logits.dtype)[None] - jnp.eye(k, dtype=logits.dtype)[:, None, :]
    (grads,) = jax.vmap(vjp_fn)(cot)  # (K, B, *input)
    norms = jnp.sqrt(jnp.sum(jnp.square(grads.reshape(k, xs.shape[0], -1)), axis=-1))
    return {"logits": logits, "grad_norms": norms.T}


def curvature_certificate_is_sound(bound: CurvatureBound) -> bool:
    """Whether ``bound`` supports the curvature certificate: its curvature bound is finite and holds everywhere
    (``almost_everywhere=False``), i.e. the network is twice differentiable with a Lipschitz gradient."""
    _check_bound(bound)
    return (not bound.almost_everywhere) and math.isfinite(float(bound.network.curvature))


def _use_curvature(bound: CurvatureBound, curvature) -> bool:
    if curvature not in ("auto", True, False):
        raise ValueError(f"curvature must be 'auto', True or False, got {curvature!r}.")
    sound = curvature_certificate_is_sound(bound)
    if curvature is True and not sound:
        raise ValueError("the curvature certificate needs a curvature bound that holds everywhere: finite and "
                         "computed with almost_everywhere=False (the network must be twice differentiable, e.g. no "
                         "ReLU or max pooling); use curvature='auto' or False.")
    return sound if curvature == "auto" else bool(curvature)


def certified_radii(logits, ys, bound: CurvatureBound, grad_norms=None) -> Certificate:
    """The :class:`Certificate` of examples with logits ``logits`` (N, K) and labels ``ys`` under ``bound``; the
    curvature certificate enters when ``grad_norms`` (from :func:`margin_terms`) is given. NumPy, float64."""
    _check_bound(bound)
    z = np.asarray(logits, np.float64)
    y = np.asarray(ys).astype(np.int64)
    n, k = z.shape
    if np.size(bound.lipschitz) != k:
        raise ValueError(f"the bound has {np.size(bound.lipschitz)} outputs but the logits have {k} classes: bound "
                         f"the same model.")
    l_pair, k_pair, method = pair_matrices(bound)
    idx = np.arange(n)
    g = z[idx, y][:, None] - z  # (N, K) margins g_j
    other = np.ones((n, k), bool)
    other[idx, y] = False
    lp = l_pair[y]  # (N, K): L_{y j}
    with np.errstate(divide="ignore", invalid="ignore"):
        r_lip = np.where(lp > 0, g / np.where(lp > 0, lp, 1.0), np.where(g > 0, np.inf, 0.0))
    r_lip = np.where(g > 0, r_lip, 0.0)
    r_best = r_lip
    r_curv_ex = None
    if grad_norms is not None:
        r_curv = curvature_radius(g, np.asarray(grad_norms, np.float64), k_pair[y])
        r_best = np.maximum(r_lip, r_curv)
        r_curv_ex = np.where(other, r_curv, np.inf).min(axis=1)
        method += "+curvature"
    margin = np.where(other, g, np.inf).min(axis=1)
    return Certificate(radius=np.where(other, r_best, np.inf).min(axis=1),
                       lipschitz_radius=np.where(other, r_lip, np.inf).min(axis=1),
                       curvature_radius=r_curv_ex, margin=margin, method=method)


def certify(logits_fn: Callable[[Array], Array], xs: Array, ys: Array, bound: CurvatureBound, *,
            curvature="auto", batch_size: int | None = None) -> Certificate:
    """Certified L2 radii of the examples ``(xs, ys)`` for the network ``logits_fn`` (batched, eval mode) whose
    certified bounds are ``bound`` (:func:`~lcnn_jax.measures.curvature_bound` of the same model and variables).

    ``curvature``: ``"auto"`` uses the curvature certificate when the bound allows it (finite, not almost
    everywhere), ``True`` requires it (ValueError otherwise), ``False`` skips it (then one forward pass per
    example; with it, K backward passes more). Runs outside jit, one compiled program over chunks of
    ``batch_size`` (the last padded). See the module docstring for the conditions.
    """
    _check_bound(bound)
    use_curv = _use_curvature(bound, curvature)
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
    n = int(xs.shape[0])
    size = n if batch_size is None else min(batch_size, n)
    run = jax.jit(lambda x, y: margin_terms(logits_fn, x, y, gradients=use_curv))
    parts: dict = {}
    for start in range(0, n, size):
        x, y = xs[start:start + size], ys[start:start + size]
        real = x.shape[0]
        if real < size:
            x = jnp.concatenate([x, jnp.repeat(x[:1], size - real, axis=0)])
            y = jnp.concatenate([y, jnp.repeat(y[:1], size - real, axis=0)])
        for name, v in run(x, y).items():
            parts.setdefault(name, []).append(np.asarray(v)[:real])
    out = {name: np.concatenate(v) for name, v in parts.items()}
    return certified_radii(out["logits"], np.asarray(ys), bound, out.get("grad_norms"))
