"""Exact layer-wise Hessian traces, minimum sharpness and normalized sharpness.

Minimum sharpness (Ibayashi, Hamaguchi, Imaizumi, arXiv 2106.12612) is the smallest total Hessian trace of
the mean cross-entropy over all networks that compute the same function as the given ReLU network under
layer-wise rescaling ``W_l -> a_l W_l``, ``b_l -> (prod_{k<=l} a_k) b_l``, ``prod_l a_l = 1``. Normalized
sharpness (Tsuzuku, Sato, Sugiyama, ICML 2020) is the comparator that is invariant to the finer
neuron-wise rescalings.

Everything rests on one identity. For a network ``f`` that is piecewise linear in its parameters and input
(ReLU / leaky ReLU, max- and average-pooling, dense and convolution layers, no normalisation) the second
derivative of ``f`` vanishes almost everywhere, so the Hessian of the softmax cross-entropy equals its
Gauss-Newton part and, per example with ``p = softmax(f)`` and ``g_k = df_k/dtheta``::

    diag H = sum_k p_k g_k^2 - (sum_k p_k g_k)^2 = sum_k p_k (g_k - sum_j p_j g_j)^2     (elementwise)

It needs no labels. With smooth activations (tanh, softplus, ...) the same computation is the diagonal of the
Gauss-Newton matrix, not of the Hessian.

Layer conventions. A *layer* is a dict of the parameter tree holding a ``kernel`` (and optionally a ``bias``),
named by its path (``"Dense_0"``, or ``"Block_0/Conv_1"`` when nested). Kernels follow Flax:
``(in, out)`` for dense and ``(kh, kw, in, out)`` for convolutions. The order of the layers matters for the
bias rescaling; see :func:`layer_order`.

Example::

    import jax, jax.numpy as jnp
    import flax.linen as nn
    from lcnn_jax.measures.sharpness import minimum_sharpness, layer_hessian_traces

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
            return nn.Dense(10)(x)

    model = MLP()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 784)))["params"]
    logits_fn = lambda p, x: model.apply({"params": p}, x[None])[0]      # ONE example -> (K,) logits
    xs = jax.random.uniform(jax.random.PRNGKey(1), (256, 784))
    traces = layer_hessian_traces(logits_fn, params, xs)                 # {'Dense_0': {'kernel': .., 'bias': ..}, ..}
    ms = minimum_sharpness(logits_fn, params, xs, include_bias=True)
    ms.value, ms.log_scales, ms.converged
    # a data set too large for the device: xs may be an iterable of batches (one pass, one compilation)

The scalar optimisations (over ``L`` log-scales, or over the row/column scales of one weight matrix) run on
the host in float64 NumPy: they are tiny, and a tolerance of ``1e-10`` on the gradient would be out of reach
in float32. Only the trace computation runs in JAX (jitted, in the parameters' dtype).
"""
from __future__ import annotations

import re
import time
import warnings
from collections.abc import Mapping
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcnn_jax.measures._dataset import Batches, inputs_of
from lcnn_jax.types import Array, Params, PyTree

__all__ = [
    "layer_hessian_traces",
    "layer_order",
    "rescale_params",
    "SharpnessResult",
    "minimum_sharpness",
    "minimum_sharpness_from_traces",
    "LayerNormalizedSharpness",
    "NormalizedSharpnessResult",
    "normalized_layer_sharpness",
    "normalized_sharpness",
    "normalized_sharpness_from_diagonal",
]

LogitsFn = Callable[[Params, Array], Array]

# --------------------------------------------------------------------------------------------------------------
# Exact diagonal of the Hessian (= Gauss-Newton diagonal) of the mean cross-entropy.


def _example_diag(logits_fn: LogitsFn, params: Params, x: Array) -> Params:
    """``sum_k p_k (g_k - gbar)^2`` for one example, from one forward and K backward passes."""
    logits, pullback = jax.vjp(lambda p: logits_fn(p, x), params)
    if logits.ndim != 1:
        raise ValueError(
            "logits_fn(params, x) must map ONE example to a 1-D vector of logits (K,); got shape "
            f"{logits.shape}. Wrap a batched model as `lambda p, x: model.apply({{'params': p}}, x[None])[0]`."
        )
    num_classes = logits.shape[0]
    prob = jax.nn.softmax(logits)

    def body(k, acc):
        onehot = jnp.arange(num_classes) == k
        # The cotangent e_k - p gives g_k - gbar in one pullback, by linearity; writing its k-th entry
        # as sum_{j != k} p_j instead of 1 - p_k avoids cancellation when p_k ~ 1 (a trained network).
        rest = jnp.sum(jnp.where(onehot, 0.0, prob))
        (centered,) = pullback(jnp.where(onehot, rest, -prob).astype(logits.dtype))
        return jax.tree_util.tree_map(lambda a, g: a + prob[k].astype(g.dtype) * jnp.square(g), acc, centered)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return lax.fori_loop(0, num_classes, body, zeros)


def _diag_sum(logits_fn: LogitsFn, params: Params, xs_chunks: Array, w_chunks: Array) -> Params:
    """Sum over chunks of the weighted per-example diagonals; padded examples carry weight 0."""

    def body(acc, inputs):
        xc, wc = inputs
        per_example = jax.vmap(lambda x: _example_diag(logits_fn, params, x))(xc)
        acc = jax.tree_util.tree_map(
            lambda a, d: a + jnp.tensordot(wc.astype(d.dtype), d, axes=1), acc, per_example
        )
        return acc, None

    init = jax.tree_util.tree_map(jnp.zeros_like, params)
    total, _ = lax.scan(body, init, (xs_chunks, w_chunks))
    return total


# ``logits_fn`` is static: calling again with the same function object reuses the compiled program.
_diag_sum_jit = jax.jit(_diag_sum, static_argnums=0)


def _restore_order(template: PyTree, tree: PyTree) -> PyTree:
    """Rebuild ``tree`` as nested plain dicts in the key order of ``template``.

    ``jax.tree_util`` returns dicts with sorted keys; restoring the original order keeps
    :func:`layer_order` meaningful on results.
    """
    if isinstance(template, Mapping):
        return {k: _restore_order(template[k], tree[k]) for k in template}
    return tree


def layer_hessian_traces(
    logits_fn: LogitsFn,
    params: Params,
    xs,
    *,
    chunk_size: int = 256,
    diagonal: bool = False,
) -> Params:
    """Exact trace of every parameter leaf's diagonal Hessian block of the mean cross-entropy over ``xs``.

    Computes ``diag H = mean_x sum_k p_k(x) (g_k(x) - sum_j p_j(x) g_j(x))^2`` with ``p = softmax(f)``,
    ``g_k = d f_k / d theta`` (identical to ``sum_k p_k g_k^2 - (sum_k p_k g_k)^2``), and returns per leaf
    its sum (``diagonal=False``: a tree of scalars) or the diagonal itself (``diagonal=True``: the shapes of
    ``params``). Labels are not needed.

    Exactness: equal to the diagonal of the true Hessian for networks that are piecewise linear in their
    parameters (ReLU / leaky ReLU, max- and average-pooling, dense, convolution; no normalisation layers), where
    the term ``sum_k (p_k - y_k) d^2 f_k / d theta^2`` vanishes almost everywhere. With smooth activations
    it is the diagonal of the Gauss-Newton matrix ``J^T (diag p - p p^T) J``, not of the Hessian.

    Args:
      logits_fn: ``logits_fn(params, x) -> (K,)`` logits for ONE example.
      params: a pytree (usually a Flax ``params`` dict).
      xs: inputs ``(N, ...)``; N need not be a multiple of ``chunk_size``. Or a data set too large for device
        memory: an iterable of batches (a list, a loader, a generator, or a zero-argument function returning
        an iterator), each an array of inputs, an ``(inputs, labels)`` tuple or a ``{"image": ...}`` dict. The
        mean is then over all ``N`` examples (every example weighs ``1/N``, a smaller last batch in proportion
        to its size), in ONE pass, with one chunk on the device at a time and one compilation (chunks of
        ``min(chunk_size, first batch size)`` examples, the last padded and masked).
      chunk_size: examples processed together (``vmap``); chunks run in a ``lax.scan``, the last one padded
        and masked. Memory is about ``3 * chunk_size * num_params`` numbers.
      diagonal: return the full diagonal instead of the per-leaf traces.

    Cost: per example one forward and ``K`` backward passes (pullbacks of one linearisation); one
    compilation per ``logits_fn`` object and input shape.

    Returns:
      A tree with the structure and key order of ``params``: scalars, or arrays shaped like the leaves.
    """
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}.")
    if not isinstance(xs, (np.ndarray, jax.Array)):
        return _layer_traces_over_batches(logits_fn, params, xs, int(chunk_size), diagonal)
    xs = jnp.asarray(xs)
    if xs.ndim < 1 or xs.shape[0] == 0:
        raise ValueError(f"xs must be a non-empty batch (N, ...) of inputs; got shape {xs.shape}.")
    n = xs.shape[0]
    chunk = min(int(chunk_size), n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    # Pad with copies of the last example (always a valid input) and give them weight 0.
    xs_padded = jnp.concatenate([xs, jnp.repeat(xs[-1:], pad, axis=0)], axis=0) if pad else xs
    weights = (jnp.arange(n_chunks * chunk) < n).astype(jnp.float32)
    total = _diag_sum_jit(
        logits_fn,
        params,
        xs_padded.reshape((n_chunks, chunk) + xs.shape[1:]),
        weights.reshape(n_chunks, chunk),
    )
    return _finish_traces(params, total, n, diagonal)


def _finish_traces(params: Params, total: Params, n: int, diagonal: bool) -> Params:
    result = jax.tree_util.tree_map(lambda t: t / n if diagonal else jnp.sum(t) / n, total)
    return _restore_order(params, result)


def _layer_traces_over_batches(logits_fn: LogitsFn, params: Params, data, chunk_size: int, diagonal: bool):
    """The data-set mode of :func:`layer_hessian_traces`: one chunk per call of the compiled sum."""
    batches = Batches(data, chunk_size, multi_pass=False, name="xs", select=inputs_of)
    total = None
    for chunk, mask in batches.chunks():
        part = _diag_sum_jit(logits_fn, params, chunk[None], mask[None].astype(np.float32))
        total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
    return _finish_traces(params, total, batches.num_examples, diagonal)


# --------------------------------------------------------------------------------------------------------------
# Layers, their order, and the function-preserving rescaling.

_SUFFIX = re.compile(r"(.*)_(\d+)")


def _natural_order(keys: list) -> list:
    """Keep the given order, but order the members of each ``Name_<i>`` family by ``i``.

    Each family keeps the positions it occupies; only which member sits where changes. This repairs the
    string sort that ``jax.tree_util`` applies (``Dense_10`` before ``Dense_2``) while leaving Flax's
    insertion order untouched (within a family Flax numbers modules in call order).
    """
    families: dict = {}
    for pos, key in enumerate(keys):
        match = _SUFFIX.fullmatch(key) if isinstance(key, str) else None
        if match:
            families.setdefault(match.group(1), []).append(pos)
    out = list(keys)
    for positions in families.values():
        members = sorted((keys[p] for p in positions), key=lambda k: int(_SUFFIX.fullmatch(k).group(2)))
        for p, k in zip(positions, members):
            out[p] = k
    return out


def _is_layer(node) -> bool:
    return isinstance(node, Mapping) and "kernel" in node and not isinstance(node["kernel"], Mapping)


def layer_order(params: Params) -> tuple:
    """Paths of the layers (dicts holding a ``kernel``) in network order, e.g. ``('Conv_0', 'Dense_0')``.

    The order is the order of the keys in ``params``: Flax linen inserts submodule parameters in call order,
    so the tree returned by ``model.init`` lists layers as the forward pass uses them. Within a family
    ``Name_0, Name_1, ...`` members are ordered by their integer suffix (Flax numbers them in call order).

    Caveat: ``jax.tree_util.tree_map`` (and so optax updates and checkpoint restores) return dicts with
    keys sorted as strings. The suffix rule repairs ``Dense_10`` vs ``Dense_2``, but not the interleaving
    of different families (``Conv_0, Dense_0, Conv_1`` becomes ``Conv_0, Conv_1, Dense_0``). For such
    networks pass ``layers=`` explicitly to the functions that take it. Nested modules are visited
    depth-first and named by ``/``-joined paths.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a (nested) dict of layers; got {type(params).__name__}.")
    out: list = []

    def visit(node, prefix):
        for key in _natural_order(list(node.keys())):
            child = node[key]
            if _is_layer(child):
                out.append(prefix + str(key))
            elif isinstance(child, Mapping):
                visit(child, prefix + str(key) + "/")

    visit(params, "")
    return tuple(out)


def _get(tree, path: str):
    node = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"layer {path!r} not found in the parameter tree (available: {layer_order(tree)}).")
        node = node[part]
    if not _is_layer(node):
        raise ValueError(f"{path!r} is not a layer: it has no 'kernel' entry.")
    return node


def _resolve_layers(params: Params, layers: Optional[Sequence[str]], strict: bool) -> tuple:
    """The layer paths to use; in strict mode every parameter must be a kernel or bias of one of them."""
    if layers is not None:
        layers = tuple(layers)
        for path in layers:
            _get(params, path)
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers contains duplicates: {layers}.")
    else:
        layers = layer_order(params)
        if strict:
            covered = {f"{l}/{name}" for l in layers for name in ("kernel", "bias")}
            leaves = jax.tree_util.tree_flatten_with_path(params)[0]
            paths = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
            extra = [p for p in paths if p not in covered]
            if extra:
                raise ValueError(
                    f"parameters {extra} are not the kernel/bias of a layer, so the layer-wise rescaling "
                    "symmetry (ReLU chains without normalisation) may not hold. Pass layers=[...] explicitly "
                    "to measure only those layers."
                )
    if not layers:
        raise ValueError("no layers found: the parameter tree has no dict with a 'kernel' entry.")
    return layers


def _copy_dicts(tree):
    if isinstance(tree, Mapping):
        return {k: _copy_dicts(v) for k, v in tree.items()}
    return tree


def rescale_params(params: Params, log_scales, layers: Optional[Sequence[str]] = None) -> Params:
    """Apply the layer-wise rescaling ``W_l *= a_l``, ``b_l *= prod_{k<=l} a_k`` with ``a_l = exp(log_scales[l])``.

    For a chain of positively homogeneous layers (ReLU, max/avg-pool, dense, conv, no normalisation) the
    network function is unchanged when ``prod_l a_l = 1``, i.e. ``sum(log_scales) = 0`` (checked). The
    diagonal Hessian blocks then scale as ``T^W_l -> a_l^-2 T^W_l`` and ``T^b_l -> (prod_{k<=l} a_k)^-2 T^b_l``.

    Args:
      params: the parameter tree; returned as a new tree of plain dicts in the same key order.
      log_scales: ``(L,)`` log-scales, summing to 0.
      layers: layer paths in network order; defaults to :func:`layer_order` ``(params)``.
    """
    layers = _resolve_layers(params, layers, strict=False)
    alpha = np.asarray(log_scales, np.float64).reshape(-1)
    if alpha.shape[0] != len(layers):
        raise ValueError(f"log_scales has {alpha.shape[0]} entries but there are {len(layers)} layers {layers}.")
    if not np.all(np.isfinite(alpha)):
        raise ValueError(f"log_scales must be finite; got {alpha}.")
    if abs(alpha.sum()) > 1e-6 * max(1.0, np.abs(alpha).sum()):
        raise ValueError(
            f"log_scales must sum to 0 (product of the scales = 1) for the rescaling to preserve the function; "
            f"got sum {alpha.sum():.3g}. Subtract their mean."
        )
    cumulative = np.cumsum(alpha)
    out = _copy_dicts(params)
    for l, path in enumerate(layers):
        layer = _get(out, path)
        layer["kernel"] = layer["kernel"] * jnp.asarray(np.exp(alpha[l]), jnp.result_type(layer["kernel"]))
        if "bias" in layer:
            layer["bias"] = layer["bias"] * jnp.asarray(np.exp(cumulative[l]), jnp.result_type(layer["bias"]))
    return out


# --------------------------------------------------------------------------------------------------------------
# Minimum sharpness.


class SharpnessResult(NamedTuple):
    """Result of :func:`minimum_sharpness`.

    Attributes:
      value: the minimum (infimum) of the total trace over layer-wise rescalings.
      log_scales: ``(L,)`` optimal ``log a_l`` (sum 0); :func:`rescale_params` with them realises ``value``.
      layers: the layer paths, in the order used.
      weight_traces: ``(L,)`` traces ``T^W_l`` of the kernel blocks at the given parameters.
      bias_traces: ``(L,)`` traces ``T^b_l`` of the bias blocks (0 for layers without bias).
      converged: whether ``rel_grad_norm <= tol`` (always True for the closed form).
      iterations: Newton iterations (0 for the closed form).
      rel_grad_norm: ``||grad F|| / F`` at the returned log-scales (gradient in the free log-scale variables).
    """

    value: float
    log_scales: np.ndarray
    layers: tuple
    weight_traces: np.ndarray
    bias_traces: np.ndarray
    converged: bool
    iterations: int
    rel_grad_norm: float


def _closed_form(tw: np.ndarray, layers: tuple, tb: np.ndarray) -> SharpnessResult:
    n_layers = tw.shape[0]
    if np.any(tw == 0.0):
        dead = [layers[l] for l in np.flatnonzero(tw == 0.0)]
        warnings.warn(
            f"layers {dead} have zero Hessian trace (dead layers): the infimum of sum_l T_l a_l^-2 over "
            "prod a_l = 1 is 0 and is not attained; returning value 0 and log_scales 0.",
            UserWarning,
            stacklevel=3,
        )
        return SharpnessResult(0.0, np.zeros(n_layers), layers, tw, tb, True, 0, 0.0)
    logs = np.log(tw)
    alpha = 0.5 * (logs - logs.mean())
    value = float(n_layers * np.exp(logs.mean()))
    shares = tw * np.exp(-2.0 * alpha)
    # Gradient in the free variables alpha_1..alpha_{L-1} (alpha_L = -sum): -2 (share_l - share_L).
    grad = -2.0 * (shares[:-1] - shares[-1])
    return SharpnessResult(value, alpha, layers, tw, tb, True, 0, float(np.linalg.norm(grad) / value))


def _newton_log_scales(tw, tb, alpha0, tol, max_iters):
    """Damped Newton on ``F(x) = sum_i w_i exp(-2 A_i x)`` in the free variables ``x = (c_1, .., c_{L-1})``.

    ``c_l = sum_{k<=l} alpha_k`` with ``c_0 = c_L = 0`` (the constraint sum alpha = 0), so
    ``alpha_l = c_l - c_{l-1}``: weight term rows of ``A`` are ``e_l - e_{l-1}``, bias term rows ``e_l``
    (the last bias is a constant, a zero row). ``F`` is a positive combination of exponentials of linear
    functions, hence convex; strictly convex with a unique minimiser when every ``T^W_l > 0``.
    Terms with zero weight are dropped, so dead layers never produce ``0 * inf``.
    """
    n_layers = tw.shape[0]
    n_free = n_layers - 1
    d_alpha = np.zeros((n_layers, n_free))
    for l in range(n_layers):
        if l < n_free:
            d_alpha[l, l] = 1.0
        if l > 0:
            d_alpha[l, l - 1] = -1.0
    d_cum = np.vstack([np.eye(n_free), np.zeros((1, n_free))])
    rows = np.vstack([d_alpha, d_cum])
    weights = np.concatenate([tw, tb])
    keep = weights > 0.0
    rows, weights = rows[keep], weights[keep]

    def objective(x):
        with np.errstate(over="ignore"):
            terms = weights * np.exp(-2.0 * (rows @ x))
        return terms.sum(), terms

    x = np.cumsum(alpha0)[:n_free]
    value, terms = objective(x)
    if not np.isfinite(value):
        raise ValueError("init_log_scales overflow the objective; use smaller initial log-scales.")
    iterations, converged, rel_grad = 0, False, 0.0
    while True:
        grad = -2.0 * rows.T @ terms
        rel_grad = float(np.linalg.norm(grad) / value) if value > 0 else 0.0
        if rel_grad <= tol:
            converged = True
            break
        if iterations >= max_iters:
            break
        hess = 4.0 * (rows.T * terms) @ rows
        # Minimum-norm Newton direction: the Hessian is singular only along directions the objective
        # ignores (dead layers), and the gradient has no component there.
        step = np.linalg.lstsq(hess, -grad, rcond=None)[0]
        slope = float(grad @ step)
        if not slope < 0.0:
            step, slope = -grad, -float(grad @ grad)
        t = 1.0
        while True:  # Armijo backtracking keeps every iterate finite and decreasing.
            new_value, new_terms = objective(x + t * step)
            # Once the predicted decrease (the Newton decrement) is below the resolution of F, the
            # full step is inside the quadratic-convergence region and the test below is only noise.
            if new_value <= value + 1e-4 * t * slope or -slope <= 1e-12 * value:
                break
            t *= 0.5
            if t < 1e-30:
                break
        iterations += 1
        if t < 1e-30:  # no decrease possible: at the floating-point floor
            break
        x, value, terms = x + t * step, new_value, new_terms
    alpha = d_alpha @ x
    return float(value), alpha, converged, iterations, rel_grad


def _as_float_traces(traces, layers):
    tw, tb = [], []
    for path in layers:
        layer = _get(traces, path)
        tw.append(float(np.sum(np.asarray(layer["kernel"], np.float64))))
        tb.append(float(np.sum(np.asarray(layer["bias"], np.float64))) if "bias" in layer else 0.0)
    tw, tb = np.asarray(tw), np.asarray(tb)
    if not (np.all(np.isfinite(tw)) and np.all(np.isfinite(tb))):
        raise ValueError(f"traces must be finite; got weight traces {tw}, bias traces {tb}.")
    if np.any(tw < 0) or np.any(tb < 0):
        raise ValueError(
            f"traces must be >= 0 (diagonal blocks of a positive semi-definite Gauss-Newton matrix); got weight "
            f"traces {tw}, bias traces {tb}. Use exact traces from layer_hessian_traces, not estimates."
        )
    return tw, tb


def minimum_sharpness_from_traces(
    traces: PyTree,
    *,
    layers: Optional[Sequence[str]] = None,
    include_bias: bool = True,
    init_log_scales=None,
    tol: float = 1e-10,
    max_iters: int = 100,
) -> SharpnessResult:
    """Minimum sharpness from per-layer traces (the output of :func:`layer_hessian_traces`).

    Under ``W_l -> a_l W_l``, ``b_l -> (prod_{k<=l} a_k) b_l`` with ``prod_l a_l = 1`` the block traces
    become ``T^W_l a_l^-2`` and ``T^b_l (prod_{k<=l} a_k)^-2``.

    Without biases (``include_bias=False``, bias traces ignored) the minimum has a closed form. By AM-GM,
    ``(1/L) sum_l T_l a_l^-2 >= (prod_l T_l a_l^-2)^(1/L) = (prod_l T_l)^(1/L)`` because
    ``prod_l a_l^-2 = 1``; equality holds iff every ``T_l a_l^-2`` equals ``G = (prod_l T_l)^(1/L)``, i.e.
    ``a_l = sqrt(T_l / G)``, which satisfies ``prod_l a_l = sqrt(prod_l T_l / G^L) = 1``. Hence::

        MS = L * (prod_l T_l)^(1/L),    log a_l = (log T_l - mean_k log T_k) / 2.

    If some ``T_l = 0`` (a dead layer) the infimum is 0 and is not attained: the result is value 0,
    log-scales 0 and a ``UserWarning``; no logarithm of 0 is taken.

    With biases (``include_bias=True``) minimise over log-scales ``alpha`` (``c_l = sum_{k<=l} alpha_k``)::

        F(alpha) = sum_l T^W_l e^{-2 alpha_l} + T^b_l e^{-2 c_l}   subject to   sum_l alpha_l = 0,

    eliminating the constraint by the free variables ``c_1..c_{L-1}`` (``c_L = 0``). ``F`` is a positive
    sum of exponentials of linear functions, hence convex (strictly, with a unique minimiser, when all
    ``T^W_l > 0``). Solved by damped Newton (closed-form gradient and Hessian, minimum-norm step, Armijo
    backtracking) until ``||grad F|| <= tol * F``. Zero traces drop out of ``F``; if the infimum is then not
    attained the iterates move off toward it and stop once the relative gradient is below ``tol``.

    Args:
      traces: tree with the layers' ``kernel`` / ``bias`` traces (full diagonals are summed).
      layers: layer paths in network order (matters only with biases); default :func:`layer_order`.
      include_bias: include the bias blocks in the trace (and so the cumulative bias scaling).
      init_log_scales: ``(L,)`` start for Newton, summing to 0; default zeros (the given parameters).
      tol: tolerance on the relative gradient norm.
      max_iters: Newton iteration cap (Newton typically needs fewer than 15).

    Cost: ``O(max_iters * L^3)`` float64 operations on the host; negligible next to the traces.
    """
    layers = _resolve_layers(traces, layers, strict=False)
    tw, tb = _as_float_traces(traces, layers)
    n_layers = len(layers)
    if not include_bias:
        return _closed_form(tw, layers, tb)
    alpha0 = np.zeros(n_layers) if init_log_scales is None else np.asarray(init_log_scales, np.float64).reshape(-1)
    if alpha0.shape[0] != n_layers:
        raise ValueError(f"init_log_scales has {alpha0.shape[0]} entries but there are {n_layers} layers.")
    if not np.all(np.isfinite(alpha0)) or abs(alpha0.sum()) > 1e-8 * max(1.0, np.abs(alpha0).sum()):
        raise ValueError(f"init_log_scales must be finite and sum to 0; got sum {alpha0.sum():.3g}.")
    if n_layers == 1:
        return SharpnessResult(float(tw[0] + tb[0]), np.zeros(1), layers, tw, tb, True, 0, 0.0)
    value, alpha, converged, iterations, rel_grad = _newton_log_scales(tw, tb, alpha0, tol, max_iters)
    return SharpnessResult(value, alpha, layers, tw, tb, converged, iterations, rel_grad)


def minimum_sharpness(
    logits_fn: LogitsFn,
    params: Params,
    xs,
    *,
    include_bias: bool = True,
    layers: Optional[Sequence[str]] = None,
    init_log_scales=None,
    tol: float = 1e-10,
    max_iters: int = 100,
    chunk_size: int = 256,
) -> SharpnessResult:
    """Minimum sharpness: the least total Hessian trace of the mean CE over function-preserving rescalings.

    ``MS = min_{prod a_l = 1} sum_l a_l^-2 T^W_l [+ (prod_{k<=l} a_k)^-2 T^b_l]`` with exact block traces from
    :func:`layer_hessian_traces`; see :func:`minimum_sharpness_from_traces` for the closed form without
    biases and the Newton solve with them. Invariant (up to ``tol``) under :func:`rescale_params`.
    Valid for chains of ReLU / pooling / dense / conv layers without normalisation or skip connections; with
    ``layers=None`` every parameter must belong to a layer (kernel or bias), else a ``ValueError``. ``xs``: an
    array of inputs or an iterable of batches (a data set, one pass; see :func:`layer_hessian_traces`).

    Cost: one forward and ``K`` backward passes per example (the traces), then a tiny host-side solve.
    """
    layers = _resolve_layers(params, layers, strict=True)
    traces = layer_hessian_traces(logits_fn, params, xs, chunk_size=chunk_size)
    return minimum_sharpness_from_traces(
        traces, layers=layers, include_bias=include_bias, init_log_scales=init_log_scales, tol=tol,
        max_iters=max_iters,
    )


# --------------------------------------------------------------------------------------------------------------
# Normalized sharpness (Tsuzuku et al. 2020).


class LayerNormalizedSharpness(NamedTuple):
    """Per-layer result of :func:`normalized_layer_sharpness`.

    ``log_s1``: ``(in,)`` input-side log-scales; ``log_s2``: ``(out,)`` output-side log-scales. Entries whose
    terms vanish in the limit (an all-zero row/column of H or W) are ``+inf`` / ``-inf``.
    """

    value: float
    log_s1: np.ndarray
    log_s2: np.ndarray
    converged: bool
    iterations: int


def _kernel_matrix(a: np.ndarray) -> np.ndarray:
    """Flax kernel ``(..., in, out)`` -> ``(out, in)`` matrix, summing the spatial positions of a conv kernel."""
    a = np.asarray(a, np.float64)
    if a.ndim < 2:
        raise ValueError(f"a kernel must have at least 2 dimensions (in, out); got shape {a.shape}.")
    return a.reshape((-1,) + a.shape[-2:]).sum(axis=0).T


def _prune(h: np.ndarray, w2: np.ndarray):
    """Active rows/columns, and the limit log-scale (+-inf) of every pruned one.

    A row with ``h = 0`` (on the active columns) contributes ``sum_j w2_ij / (s2_i s1_j) -> 0`` as
    ``s2_i -> inf``; a row with ``w2 = 0`` contributes ``s2_i sum_j h_ij s1_j -> 0`` as ``s2_i -> 0``.
    Likewise for columns. Removing them repeatedly leaves a core whose rows and columns all have positive
    sums in both matrices, so the closed-form updates never divide by 0.
    """
    rows = np.ones(h.shape[0], bool)
    cols = np.ones(h.shape[1], bool)
    row_limit = np.zeros(h.shape[0])
    col_limit = np.zeros(h.shape[1])
    while True:
        hr, wr = h[:, cols].sum(1), w2[:, cols].sum(1)
        new_rows = rows & (hr > 0) & (wr > 0)
        row_limit[rows & ~new_rows] = np.where(hr[rows & ~new_rows] == 0,
                                               np.where(wr[rows & ~new_rows] == 0, 0.0, np.inf), -np.inf)
        hc, wc = h[new_rows].sum(0), w2[new_rows].sum(0)
        new_cols = cols & (hc > 0) & (wc > 0)
        col_limit[cols & ~new_cols] = np.where(hc[cols & ~new_cols] == 0,
                                               np.where(wc[cols & ~new_cols] == 0, 0.0, np.inf), -np.inf)
        if np.array_equal(new_rows, rows) and np.array_equal(new_cols, cols):
            return rows, cols, row_limit, col_limit
        rows, cols = new_rows, new_cols


def normalized_layer_sharpness(
    hess_diag,
    weight,
    *,
    init_log_s1=None,
    tol: float = 1e-10,
    max_iters: int = 10_000,
) -> LayerNormalizedSharpness:
    """``min_{s1 > 0, s2 > 0} sum_ij H_ij s2_i s1_j + W_ij^2 / (s2_i s1_j)`` for one layer.

    ``i`` indexes outputs and ``j`` inputs. ``hess_diag`` and ``weight`` are Flax kernels of one shape:
    ``(in, out)`` dense, or ``(kh, kw, in, out)`` conv, where ``s1`` / ``s2`` act on input / output
    *channels* (the neuron-wise rescaling symmetry of a conv layer) and ``H`` and ``W^2`` are summed over the
    kernel's spatial positions. In log-space (``x = log s1``, ``y = log s2``) the objective is
    ``sum_ij H_ij e^{x_j + y_i} + W_ij^2 e^{-x_j - y_i}``, a positive sum of exponentials of linear functions:
    convex, flat along ``(x + t, y - t)`` (and along more directions only if the nonzero pattern splits into
    blocks), so every start reaches the same minimum value, though not the same scales.

    Solved by exact alternating minimisation (each block has a closed form):
    ``s2_i = sqrt(sum_j W_ij^2 / s1_j / sum_j H_ij s1_j)``, then ``s1_j`` likewise, until the relative
    gradient norm ``||grad|| / F <= tol`` (after an ``s1`` update its own gradient is exactly 0). Rows or
    columns with all-zero ``H`` or ``W`` contribute 0 in the limit and are removed first (see ``log_s1``).

    Cost: ``O(in * out)`` float64 operations per iteration, on the host.
    """
    if np.shape(hess_diag) != np.shape(weight):
        raise ValueError(
            f"hess_diag and weight must have the same shape; got {np.shape(hess_diag)}, {np.shape(weight)}."
        )
    h = _kernel_matrix(hess_diag)
    w2 = _kernel_matrix(np.square(np.asarray(weight, np.float64)))
    if not (np.all(np.isfinite(h)) and np.all(h >= 0)):
        raise ValueError("hess_diag must be finite and >= 0 (a Gauss-Newton diagonal).")
    if int(max_iters) < 1:
        raise ValueError(f"max_iters must be >= 1; got {max_iters}.")
    n_out, n_in = h.shape
    x = np.zeros(n_in) if init_log_s1 is None else np.asarray(init_log_s1, np.float64).reshape(-1)
    if x.shape[0] != n_in:
        raise ValueError(f"init_log_s1 must have one entry per input ({n_in}); got {x.shape[0]}.")
    rows, cols, row_limit, col_limit = _prune(h, w2)
    log_s1, log_s2 = col_limit.copy(), row_limit.copy()
    if not rows.any() or not cols.any():
        return LayerNormalizedSharpness(0.0, log_s1, log_s2, True, 0)
    hc, wc = h[np.ix_(rows, cols)], w2[np.ix_(rows, cols)]
    s1 = np.exp(x[cols])
    converged, iterations = False, 0
    for iterations in range(1, max_iters + 1):
        s2 = np.sqrt((wc @ (1.0 / s1)) / (hc @ s1))
        s1 = np.sqrt(((1.0 / s2) @ wc) / (s2 @ hc))
        outer = np.outer(s2, s1)
        p, q = hc * outer, wc / outer
        value = float(p.sum() + q.sum())
        if np.linalg.norm((p - q).sum(axis=1)) <= tol * value:
            converged = True
            break
    log_s1[cols], log_s2[rows] = np.log(s1), np.log(s2)
    return LayerNormalizedSharpness(value, log_s1, log_s2, converged, iterations)


class NormalizedSharpnessResult(NamedTuple):
    """Result of :func:`normalized_sharpness`: ``value`` = sum of the per-layer minima in ``per_layer``."""

    value: float
    per_layer: dict
    converged: bool
    iterations: int


def normalized_sharpness_from_diagonal(
    params: Params,
    hess_diag: Params,
    *,
    layers: Optional[Sequence[str]] = None,
    tol: float = 1e-10,
    max_iters: int = 10_000,
) -> NormalizedSharpnessResult:
    """Sum over layers of :func:`normalized_layer_sharpness` of each kernel and its Hessian diagonal.

    Biases are not part of the measure (Tsuzuku et al. define it on weight matrices). ``iterations`` is the
    largest per-layer count; ``converged`` requires every layer to converge.
    """
    layers = _resolve_layers(params, layers, strict=False)
    per_layer, converged, iterations = {}, True, 0
    for path in layers:
        res = normalized_layer_sharpness(
            _get(hess_diag, path)["kernel"], _get(params, path)["kernel"], tol=tol, max_iters=max_iters
        )
        per_layer[path] = res.value
        converged &= res.converged
        iterations = max(iterations, res.iterations)
    return NormalizedSharpnessResult(float(sum(per_layer.values())), per_layer, bool(converged), iterations)


def normalized_sharpness(
    logits_fn: LogitsFn,
    params: Params,
    xs,
    *,
    layers: Optional[Sequence[str]] = None,
    tol: float = 1e-10,
    max_iters: int = 10_000,
    chunk_size: int = 256,
) -> NormalizedSharpnessResult:
    """Normalized sharpness (Tsuzuku et al. 2020) with the exact Hessian diagonal of the mean CE.

    Per layer ``min_{s1, s2 > 0} sum_ij H_ij s2_i s1_j + W_ij^2 / (s2_i s1_j)`` (see
    :func:`normalized_layer_sharpness`), summed over layers. Invariant under layer-wise and neuron-wise
    (channel-wise for convs) rescalings of ReLU networks, since ``H -> H / g^2``, ``W^2 -> g^2 W^2`` is
    absorbed by ``s2 -> g^2 s2`` (or ``s1``). ``xs``: an array of inputs or an iterable of batches (see
    :func:`layer_hessian_traces`).

    Cost: one forward and ``K`` backward passes per example, then ``O(in * out)`` host work per iteration.
    """
    diag = layer_hessian_traces(logits_fn, params, xs, chunk_size=chunk_size, diagonal=True)
    return normalized_sharpness_from_diagonal(params, diag, layers=layers, tol=tol, max_iters=max_iters)


# --------------------------------------------------------------------------------------------------------------


def _compare_bruteforce(n: int = 100, sizes: Sequence[int] = (784, 64, 64, 10), n_probe: int = 256, seed: int = 0):
    """Print the time of the exact traces against brute-force autodiff diagonals (not a test; run once).

    Brute force: the Hessian diagonal entry ``e_i^T H e_i`` from one forward-over-reverse HVP of the mean CE
    per parameter (``vmap`` over ``n_probe`` basis vectors at a time). It is timed on ``n_probe`` entries
    and extrapolated to all parameters; the probed entries are checked against the exact diagonal.
    """
    from jax.flatten_util import ravel_pytree

    key = jax.random.PRNGKey(seed)
    params = {}
    for i, (m, k) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"Dense_{i}"] = {"kernel": jax.random.normal(sub, (m, k)) * np.sqrt(2.0 / m), "bias": jnp.zeros(k)}
    key, sub = jax.random.split(key)
    xs = jax.random.uniform(sub, (n, sizes[0]))
    labels = jnp.arange(n) % sizes[-1]

    def logits_fn(p, x):
        names = list(p)
        for j, name in enumerate(names):
            x = x @ p[name]["kernel"] + p[name]["bias"]
            if j < len(names) - 1:
                x = jax.nn.relu(x)
        return x

    def timed(fn):
        jax.block_until_ready(fn())  # compile
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        return out, time.perf_counter() - t0

    exact, t_exact = timed(lambda: layer_hessian_traces(logits_fn, params, xs, chunk_size=n, diagonal=True))
    flat, unravel = ravel_pytree(params)

    def loss(f):
        logits = jax.vmap(lambda x: logits_fn(unravel(f), x))(xs)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    probe = jnp.asarray(np.random.default_rng(seed).choice(flat.size, n_probe, replace=False))
    hvp_diag = jax.jit(lambda idx: jax.vmap(
        lambda i: jax.jvp(jax.grad(loss), (flat,), (jnp.zeros_like(flat).at[i].set(1.0),))[1][i])(idx))
    brute, t_probe = timed(lambda: hvp_diag(probe))
    t_brute = t_probe * flat.size / n_probe
    exact_flat = ravel_pytree(exact)[0][probe]
    err = float(jnp.max(jnp.abs(brute - exact_flat)) / jnp.max(jnp.abs(exact_flat)))
    print(f"MLP {'-'.join(map(str, sizes))} ({flat.size} params), {n} inputs, backend {jax.default_backend()}")
    print(f"exact diagonal (1 fwd + K bwd per example): {t_exact:.3f} s")
    print(f"brute force, one HVP per parameter: {t_probe:.3f} s for {n_probe} entries -> "
          f"{t_brute:.1f} s extrapolated to {flat.size}")
    print(f"speed-up {t_brute / t_exact:.0f}x; max relative difference on probed entries {err:.1e}")
    return t_exact, t_brute


if __name__ == "__main__":
    _compare_bruteforce()
