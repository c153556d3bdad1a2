"""Data-independent upper bound on the input curvature of every logit (LCNN, SPEC 1.1).

For a twice-differentiable map ``f`` define its slope ``L_f = sup_x ||Df(x)||_2`` and curvature
``K_f = sup_x sup_{||u|| = 1} ||D^2 f(x)[u, u]||_2``; for a scalar ``f``, ``K_f`` bounds the spectral norm of
the input Hessian everywhere. A :class:`Bound` ``(L, K)`` obeys a small algebra:

* composition ``f . g``:  ``L = L_f L_g``,  ``K = K_f L_g^2 + L_f K_g``  (chain rule for ``D^2``),
* sum ``f + g`` (residual branches): ``L = L_f + L_g``,  ``K = K_f + K_g``,
* scalar multiple ``c f``: both scale by ``|c|``; a linear map has ``K = 0``, an input scaling ``f(c x)`` is
  the composition with ``Bound(|c|, 0)``.

Unrolled over a chain this is SPEC's ``K <= sum_i K_i prod_{j<i} L_j^2 prod_{j>i} L_j``. Per-layer facts:

* conv / dense (plain): ``L = ||A_W||_2`` (power iteration / SVD), ``K = 0``;
* :class:`~lcnn_jax.nn.lcnn.SpectralConv` / ``SpectralDense``: ``L = ||A_W||_2 / sigma_stored`` (~1), ``K = 0``;
* :class:`~lcnn_jax.nn.lcnn.CenteredSoftplus`: ``L = 1``, ``K = b / 4``;
* fixed activations: softplus(beta) ``(1, beta/4)``, sigmoid ``(1/4, 1/(6 sqrt3))``, tanh ``(1, 4/(3 sqrt3))``,
  identity ``(1, 0)``, relu ``(1, inf)`` (not twice differentiable);
* :class:`~lcnn_jax.nn.lcnn.LipschitzBatchNorm` (eval): ``L = min(1/s, gamma)``, ``K = 0``;
  BatchNorm (eval): ``L = max_c |scale_c| / sqrt(var_c + eps)``, ``K = 0``;
* 2x2/2 average pool ``(1/2, 0)``; max pool ``(1, 0)`` (almost everywhere); global average pool over
  ``H x W`` ``(1/sqrt(H W), 0)``; flatten ``(1, 0)``.

(``|s''| = |b s'(1 - s')| <= b/4`` for the centred softplus; an elementwise map with ``|s''| <= k`` has
``||s''(x) * u^2||_2 <= k ||u||_4^2 <= k ||u||_2^2``.) The last, linear layer gives one bound per logit:
``logit_k = w_k^T h + b_k`` has ``K_k = ||w_k|| K_h`` and ``L_k = ||w_k|| L_h``.

Spectral layers are bounded by the TRUE norm of the map the model actually applies, ``W / sigma_stored``:
the stored power-iteration vector gives a ``sigma`` that underestimates ``||A_W||`` until it has
converged, so here ``||A_W||`` is recomputed with ``num_iters`` power iterations on ``A^T A`` (from the stored
vector, perturbed by ``key``), which approach the norm from below; with the defaults the relative error is
far below the slack of the bound. Dense kernels use an exact SVD.

The walker knows the architectures of :mod:`lcnn_jax.nn.models` (``MLP``, ``LeNet``, ``SmallCNN``,
``ResNet``/``ResNet18`` with ``BasicBlock`` or :class:`~lcnn_jax.nn.lcnn.LCNNBasicBlock`) and rebuilds
each site from the model's factories, so LCNN and standard variants alike are bounded.

Example::

    import jax, jax.numpy as jnp
    from lcnn_jax.nn.lcnn import make_lcnn_model
    from lcnn_jax.measures.bounds import curvature_bound
    net = make_lcnn_model("small_cnn", 10, width_mult=0.25)
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    res = curvature_bound(net, variables, (28, 28, 1), key=jax.random.PRNGKey(1))
    res.curvature          # (10,): sup_x ||d^2 logit_k / dx^2||_2 <= res.curvature[k], model in eval mode
    dict(res.layers)       # per-site Bound(lipschitz, curvature)

Cost: ``num_iters`` convolutions and transposed convolutions on one image per convolution (early exit at
``tol``), an SVD per dense layer; independent of any data.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from lcnn_jax.estimators import power_iteration
from lcnn_jax.nn import layers as layers_lib
from lcnn_jax.nn import lcnn, models
from lcnn_jax.types import Array, PRNGKey

__all__ = ["Bound", "IDENTITY", "linear", "compose", "chain", "add", "scale", "layer_bound", "CurvatureBound",
           "curvature_bound", "SUPPORTED_MODELS"]


# --------------------------------------------------------------------------------------------
# The bound algebra
# --------------------------------------------------------------------------------------------
class Bound(NamedTuple):
    """Slope (Lipschitz) and curvature bounds ``(L, K)`` of a map; arrays broadcast (e.g. per logit)."""

    lipschitz: Any
    curvature: Any


IDENTITY = Bound(1.0, 0.0)


def linear(lipschitz: Any) -> Bound:
    """A linear (or affine) map with operator norm ``lipschitz``: ``Bound(lipschitz, 0)``."""
    return Bound(lipschitz, 0.0)


def compose(outer: Bound, inner: Bound) -> Bound:
    """``outer . inner``: ``L = L_o L_i``, ``K = K_o L_i^2 + L_o K_i``."""
    return Bound(outer.lipschitz * inner.lipschitz,
                 outer.curvature * inner.lipschitz ** 2 + outer.lipschitz * inner.curvature)


def chain(*bounds: Bound) -> Bound:
    """The composition of maps applied in the given order: ``chain(b1, b2, b3) = b3 . b2 . b1``."""
    out = IDENTITY
    for b in bounds:
        out = compose(b, out)
    return out


def add(a: Bound, b: Bound) -> Bound:
    """``f + g``: slopes and curvatures add."""
    return Bound(a.lipschitz + b.lipschitz, a.curvature + b.curvature)


def scale(c: float, a: Bound) -> Bound:
    """``c f``: both bounds scale by ``|c|``."""
    return Bound(abs(c) * a.lipschitz, abs(c) * a.curvature)


# --------------------------------------------------------------------------------------------
# Per-layer bounds
# --------------------------------------------------------------------------------------------
_SIGMOID_K = 1.0 / (6.0 * math.sqrt(3.0))  # max |sigmoid''|
_TANH_K = 4.0 / (3.0 * math.sqrt(3.0))  # max |tanh''|


@functools.partial(jax.jit, static_argnames=("strides", "padding", "num_iters", "tol"))
def _conv_norm(kernel: Array, v0: Array, *, strides: tuple, padding: Any, num_iters: int, tol: float) -> Array:
    """``||A||_2`` of ``v -> conv(v, kernel)`` by power iteration on ``A^T A`` (an estimate from below).

    Jitted with the geometry static, so the many same-shaped convolutions of a ResNet compile once.
    """
    op = lambda v: lcnn.conv_nhwc(v, kernel, strides, padding)  # noqa: E731
    transpose = jax.linear_transpose(op, jax.ShapeDtypeStruct(v0.shape, v0.dtype))
    res = power_iteration(lambda v: transpose(op(v))[0], v0, num_iters, tol=tol)
    return jnp.sqrt(jnp.maximum(res.eigenvalue, 0.0))


def _hashable_padding(padding: Any) -> Any:
    return padding if isinstance(padding, str) else tuple(tuple(int(p) for p in pair) for pair in padding)


def _conv_geometry(m: nn.Module) -> tuple:
    """``(strides, padding)`` of a :class:`SpectralConv` or plain Flax ``Conv`` site, validated."""
    for field, default in (("kernel_dilation", 1), ("input_dilation", 1), ("feature_group_count", 1)):
        value = getattr(m, field, default)
        if value not in (None, default, (default, default)):
            raise ValueError(f"curvature_bound supports plain convolutions only ({field}={value!r} on {m.name!r})")
    padding = canonicalize_padding(m.padding, 2)
    if isinstance(padding, str) and padding not in ("SAME", "VALID"):
        raise ValueError(f"curvature_bound supports SAME/VALID/explicit zero padding, got {padding!r} on {m.name!r}")
    strides = (1, 1) if m.strides is None else lcnn._pair(m.strides, "strides")
    return tuple(strides), _hashable_padding(padding)


def _start_vector(key: PRNGKey, shape: tuple, stored: Array | None) -> Array:
    noise = jax.random.normal(key, shape, jnp.float32)
    if stored is None:
        return noise
    # Start at the stored singular-vector estimate; a small random component rules out a start
    # orthogonal to the top singular vector.
    stored = stored.astype(jnp.float32)
    return stored / jnp.linalg.norm(stored) + 1e-2 * noise / jnp.linalg.norm(noise)


def _effective_dense_kernel(m: nn.Module, site: Mapping) -> Array:
    """The matrix the layer applies: ``W / sigma_stored`` for :class:`SpectralDense`, ``W`` for Dense."""
    kernel = site["params"]["kernel"]
    if isinstance(m, lcnn.SpectralDense):
        v = site[lcnn.SPECTRAL]["v"].astype(kernel.dtype)
        sigma = jnp.linalg.norm(v @ kernel)
        return kernel / jnp.maximum(sigma, m.eps)
    if isinstance(m, nn.Dense):
        return kernel
    raise ValueError(f"no bound for dense layer {type(m).__name__} at {m.name!r}")


def layer_bound(m: nn.Module, site: Mapping, in_shape: tuple, *, key: PRNGKey, num_iters: int = 200,
                tol: float = 1e-7) -> tuple[Bound, tuple]:
    """``(Bound, out_shape)`` of one eval-mode layer ``m`` whose variables are ``site`` (``{collection:
    {name: array}}``) on per-example inputs of shape ``in_shape`` (no batch axis). See the module table."""
    params = site.get("params", {})
    if m is None or isinstance(m, layers_lib.Identity):
        return IDENTITY, in_shape
    if isinstance(m, lcnn.CenteredSoftplus):
        return Bound(1.0, lcnn.beta_from_log(params["log_beta"]) / 4.0), in_shape
    if isinstance(m, layers_lib.Activation):
        kind = m.kind
        table = {"identity": IDENTITY, "sigmoid": Bound(0.25, _SIGMOID_K), "tanh": Bound(1.0, _TANH_K),
                 "softplus": Bound(1.0, m.beta / 4.0), "relu": Bound(1.0, math.inf)}
        if kind not in table:
            raise ValueError(f"no bound for activation kind {kind!r}")
        return table[kind], in_shape
    if isinstance(m, lcnn.LipschitzBatchNorm):
        s = lcnn.lipschitz_bn_scale(site["batch_stats"]["var"], m.epsilon)
        return linear(jnp.minimum(1.0 / s, jnp.exp(params["log_gamma"]))), in_shape
    if isinstance(m, nn.BatchNorm):
        var = site["batch_stats"]["var"]
        gain = jnp.abs(params["scale"]) if m.use_scale else jnp.ones_like(var)
        return linear(jnp.max(gain * jax.lax.rsqrt(var + m.epsilon))), in_shape
    if isinstance(m, (lcnn.SpectralConv, nn.Conv)):
        kernel = params["kernel"].astype(jnp.float32)
        strides, padding = _conv_geometry(m)
        shape = (1,) + tuple(in_shape)
        stored, sigma_stored = None, 1.0
        if isinstance(m, lcnn.SpectralConv):  # the layer applies W / ||A_W v_stored||
            stored = site[lcnn.SPECTRAL]["v"].astype(jnp.float32)
            if stored.shape != shape:
                raise ValueError(f"SpectralConv {m.name!r} was initialised for inputs {stored.shape[1:]}, but the "
                                 f"bound walks inputs {tuple(in_shape)}: pass the input_shape the model was built for.")
            sigma_stored = jnp.maximum(jnp.linalg.norm(lcnn.conv_nhwc(stored, kernel, strides, padding)), m.eps)
        true = _conv_norm(kernel, _start_vector(key, shape, stored), strides=strides, padding=padding,
                          num_iters=num_iters, tol=tol)
        out = jax.eval_shape(lambda v: lcnn.conv_nhwc(v, kernel, strides, padding),
                             jax.ShapeDtypeStruct(shape, jnp.float32))
        return linear(true / sigma_stored), out.shape[1:]
    if isinstance(m, (lcnn.SpectralDense, nn.Dense)):
        w = _effective_dense_kernel(m, site)
        return linear(jnp.linalg.svd(w, compute_uv=False)[0]), tuple(in_shape[:-1]) + (w.shape[1],)
    raise ValueError(f"curvature_bound has no rule for layer {type(m).__name__} at {m.name!r}; supported: "
                     "CenteredSoftplus, Activation, LipschitzBatchNorm, BatchNorm, Identity, SpectralConv, Conv, "
                     "SpectralDense, Dense.")


# --------------------------------------------------------------------------------------------
# The model walker
# --------------------------------------------------------------------------------------------
class CurvatureBound(NamedTuple):
    """Result of :func:`curvature_bound`.

    curvature: ``(num_classes,)``; ``||d^2 logit_k / dx^2 (x)||_2 <= curvature[k]`` for every input ``x``.
    lipschitz: ``(num_classes,)``; ``||d logit_k / dx (x)|| <= lipschitz[k]``.
    network: the :class:`Bound` of the whole logit vector (slope and curvature of ``x -> logits``).
    layers: ``((path, Bound), ...)`` for every site in forward order (``path`` like ``stage2_block0/conv1``).
    """

    curvature: Array
    lipschitz: Array
    network: Bound
    layers: tuple


def _subtree(variables: Mapping, name: str) -> dict:
    return {col: tree[name] for col, tree in variables.items() if isinstance(tree, Mapping) and name in tree}


class _Walker:
    def __init__(self, key: PRNGKey, num_iters: int, tol: float):
        self.key, self.num_iters, self.tol = key, num_iters, tol
        self.records: list = []
        self.count = 0

    def site(self, m, variables: Mapping, shape: tuple, prefix: str) -> tuple[Bound, tuple]:
        self.count += 1
        name = getattr(m, "name", None)
        b, out = layer_bound(m, _subtree(variables, name) if name else {}, shape,
                             key=jax.random.fold_in(self.key, self.count), num_iters=self.num_iters, tol=self.tol)
        self.records.append((f"{prefix}{name}", b))
        return b, out

    def note(self, path: str, b: Bound) -> Bound:
        self.records.append((path, b))
        return b


def _pool(kind: str, shape: tuple) -> tuple[Bound, tuple]:
    # 2x2 windows, stride 2, VALID: each input enters at most one window with weight 1/4 (avg), so
    # ||avg|| = sqrt(4) / 4 = 1/2; max-pool selects one entry per window (slope 1, piecewise linear).
    out = (shape[0] // 2, shape[1] // 2, shape[2])
    return (linear(0.5) if kind == "avg" else IDENTITY), out


def _conv_site(factory, features, kernel, stride, padding, use_bias, name):
    return factory(features=features, kernel_size=(kernel, kernel), strides=(stride, stride), padding=padding,
                   use_bias=use_bias, name=name)


def _norm_site(w: _Walker, factory, variables, shape, name, prefix):
    if factory is None:
        return IDENTITY
    return w.site(factory(name=name), variables, shape, prefix)[0]


def _head(w: _Walker, model, variables, body: Bound, features_in: tuple, name: str = "head"):
    m = model.dense(features=model.num_classes, use_bias=True, name=name)
    site = _subtree(variables, name)
    kernel = _effective_dense_kernel(m, site)
    if kernel.shape[0] != features_in[-1]:
        raise ValueError(f"head kernel expects {kernel.shape[0]} features, walked {features_in[-1]}")
    col = jnp.linalg.norm(kernel, axis=0)  # ||w_k||: logit k = w_k^T h + b_k
    head = w.note(name, linear(jnp.linalg.svd(kernel, compute_uv=False)[0]))
    return Bound(col * body.lipschitz, col * body.curvature), compose(head, body)


def _walk_mlp(w, model, variables, shape):
    body = IDENTITY
    shape = (math.prod(shape),)
    for i, width in enumerate(model.widths):
        b, shape = w.site(model.dense(features=width, use_bias=True, name=f"dense{i}"), variables, shape, "")
        a, _ = w.site(model.act(name=f"act{i}"), variables, shape, "")
        body = chain(body, b, a)
    per_logit, network = _head(w, model, variables, body, shape)
    if model.output_activation is not None:
        a, _ = w.site(model.output_activation(name="out_act"), variables, (model.num_classes,), "")
        per_logit, network = compose(a, per_logit), compose(a, network)
    return per_logit, network


def _walk_lenet(w, model, variables, shape):
    body = IDENTITY
    for i, (c, pad) in enumerate(((6, "SAME"), (16, "VALID")), start=1):
        b, shape = w.site(_conv_site(model.conv, c, 5, 1, pad, True, f"conv{i}"), variables, shape, "")
        a, _ = w.site(model.act(name=f"act{i}"), variables, shape, "")
        p, shape = _pool(model.pool, shape)
        body = chain(body, b, a, w.note(f"pool{i}", p))
    shape = (math.prod(shape),)
    for i, width in enumerate((120, 84), start=1):
        b, shape = w.site(model.dense(features=width, use_bias=True, name=f"fc{i}"), variables, shape, "")
        a, _ = w.site(model.act(name=f"act{i + 2}"), variables, shape, "")
        body = chain(body, b, a)
    return _head(w, model, variables, body, shape)


def _walk_small_cnn(w, model, variables, shape):
    body = IDENTITY
    for i, c in enumerate((32, 64), start=1):
        conv = _conv_site(model.conv, models._scaled(c, model.width_mult), 5, 1, "SAME", model.norm is None,
                          f"conv{i}")
        b, shape = w.site(conv, variables, shape, "")
        n = _norm_site(w, model.norm, variables, shape, f"norm{i}", "")
        a, _ = w.site(model.act(name=f"act{i}"), variables, shape, "")
        p, shape = _pool(model.pool, shape)
        body = chain(body, b, n, a, w.note(f"pool{i}", p))
    shape = (math.prod(shape),)
    b, shape = w.site(model.dense(features=models._scaled(1024, model.width_mult), use_bias=True, name="fc1"),
                      variables, shape, "")
    a, _ = w.site(model.act(name="act3"), variables, shape, "")
    return _head(w, model, variables, chain(body, b, a), shape)


def _walk_block(w, block, variables, shape, prefix):
    """Bound of one residual block (``BasicBlock`` or ``LCNNBasicBlock``) and its output shape."""
    lcnn_block = isinstance(block, lcnn.LCNNBasicBlock)
    if not (lcnn_block or isinstance(block, models.BasicBlock)):
        raise ValueError(f"curvature_bound knows BasicBlock and LCNNBasicBlock, got {type(block).__name__}")
    bias = block.norm is None
    changes = block.strides != 1 or shape[-1] != block.features
    conv = lambda f, k, s, n: _conv_site(block.conv, f, k, s, "SAME", bias, n)  # noqa: E731
    c1, s1 = w.site(conv(block.features, 3, block.strides, "conv1"), variables, shape, prefix)
    n1 = _norm_site(w, block.norm, variables, s1, "norm1", prefix)
    a1, _ = w.site(block.act(name="act1"), variables, s1, prefix)
    c2, s2 = w.site(conv(block.features, 3, 1, "conv2"), variables, s1, prefix)
    n2 = _norm_site(w, block.norm, variables, s2, "norm2", prefix)
    main = chain(c1, n1, a1, c2, n2)
    shortcut = IDENTITY
    if changes:
        cs, _ = w.site(conv(block.features, 1, block.strides, "shortcut_conv"), variables, shape, prefix)
        shortcut = chain(cs, _norm_site(w, block.norm, variables, s2, "shortcut_norm", prefix))
    a2, _ = w.site(block.act(name="act2"), variables, s2, prefix)
    if lcnn_block:  # act2(0.5 (main + shortcut) . (x / sqrt2))
        inner = scale(0.5, add(main, shortcut))
        return chain(linear(1.0 / math.sqrt(2.0)), inner, a2), s2
    return chain(add(main, shortcut), a2), s2


def _walk_resnet(w, model, variables, shape):
    conv = _conv_site(model.conv, models._scaled(64, model.width_mult), 3, 1, "SAME", model.norm is None,
                      "stem_conv")
    b, shape = w.site(conv, variables, shape, "")
    n = _norm_site(w, model.norm, variables, shape, "stem_norm", "")
    a, _ = w.site(model.act(name="stem_act"), variables, shape, "")
    body = chain(b, n, a)
    for i, n_blocks in enumerate(model.stage_sizes):
        for j in range(n_blocks):
            name = f"stage{i + 1}_block{j}"
            block = model.block(features=models._scaled(64 * 2 ** i, model.width_mult),
                                strides=2 if (i > 0 and j == 0) else 1, conv=model.conv, norm=model.norm,
                                act=model.act, name=name)
            bb, shape = _walk_block(w, block, _subtree(variables, name), shape, f"{name}/")
            body = chain(body, w.note(name, bb))
    gap = w.note("global_avg_pool", linear(1.0 / math.sqrt(shape[0] * shape[1])))
    return _head(w, model, variables, chain(body, gap), (shape[-1],))


_WALKERS = ((models.MLP, _walk_mlp), (models.LeNet, _walk_lenet), (models.SmallCNN, _walk_small_cnn),
            (models.ResNet, _walk_resnet))
#: Model classes :func:`curvature_bound` can walk (subclasses included, e.g. ``ResNet18``).
SUPPORTED_MODELS = tuple(cls.__name__ for cls, _ in _WALKERS)


def curvature_bound(model: nn.Module, variables: Mapping, input_shape: Sequence[int], *, key: PRNGKey,
                    num_iters: int = 200, tol: float = 1e-7) -> CurvatureBound:
    """Upper bounds on the input-Hessian spectral norm (and gradient norm) of every logit, for all inputs.

    Args:
      model: a model of :data:`SUPPORTED_MODELS` (any activations/norms/convs/dense layers with a rule in
        :func:`layer_bound`; LCNN variants and standard ones alike). Pooling must be ``avg`` for a bound that
        holds everywhere (``max`` pooling: where the logits are twice differentiable, i.e. almost everywhere).
      variables: ``{"params": ..., "batch_stats": ..., "spectral": ...}`` as returned by ``model.init`` or
        training; the bound is for the model in eval mode (``train=False``: running BN statistics, stored
        spectral vectors).
      input_shape: one example's shape, e.g. ``(28, 28, 1)``; must match the shape the spectral layers were
        initialised for.
      key: randomness for the power-iteration starts (plain convolutions, and a perturbation of the stored
        vectors of spectral ones).
      num_iters, tol: power iterations per convolution (early exit at relative residual ``tol``).

    Returns:
      :class:`CurvatureBound`. Cost: about ``num_iters`` forward+transposed convolutions on one image per
      convolution, one SVD per dense layer.
    """
    for cls, walker in _WALKERS:
        if isinstance(model, cls):
            break
    else:
        raise ValueError(f"curvature_bound supports {SUPPORTED_MODELS}, got {type(model).__name__}")
    if "params" not in variables:
        raise ValueError("variables must contain 'params' (and the model's other collections), as from model.init")
    if not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be a positive int, got {num_iters!r}")
    w = _Walker(key, num_iters, tol)
    per_logit, network = walker(w, model, variables, tuple(int(d) for d in input_shape))
    to_array = lambda a: jnp.broadcast_to(jnp.asarray(a, jnp.float32), (model.num_classes,))  # noqa: E731
    return CurvatureBound(curvature=to_array(per_logit.curvature), lipschitz=to_array(per_logit.lipschitz),
                          network=Bound(jnp.asarray(network.lipschitz), jnp.asarray(network.curvature)),
                          layers=tuple(w.records))
