"""Layers that are 1-Lipschitz by construction (AOL), a MinMax activation, and the models built from them.

**AOL rescaling** (Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz Networks",
ECCV 2022). For any matrix ``P`` (the layer as a linear map ``x -> P x``) and the diagonal
``D_ii = (sum_j |P^T P|_ij)^(-1/2)``, ``||P D||_2 <= 1``: ``D P^T P D`` has every absolute row sum ``<= 1``
(Schur's test / Gershgorin), so its largest eigenvalue is ``<= 1``. A dense layer with Flax kernel ``W`` (in, out)
is ``P = W^T``, ``P^T P = W W^T``, and the layer applies ``x -> x (D W)`` (rows of the kernel rescaled).

For a convolution ``A`` with kernel ``K`` (HWIO), ``A^T A`` is the convolution whose kernel is the autocorrelation
``R[o](i, j) = sum_{a, c} K[a, i, c] K[a + o, j, c]`` over the offsets ``|o| < k``; every row of ``A^T A`` (input
channel ``i`` at any pixel) holds the entries ``R[o](i, j)`` (a subset of them at the border, or sums of them on a
circular grid smaller than ``2k - 1``), so ``D_ii = (sum_{o, j} |R[o](i, j)|)^(-1/2)`` rescales the input channels
to ``||A D||_2 <= 1`` on every image size, padding and stride (a stride keeps a subset of the outputs).

Both layers multiply ``D`` by ``1 - 2^-10`` (:data:`AOL_SHRINK`): the rescaled weights are computed in float32,
and this margin keeps the float64 operator norm of the weights the model actually applies below 1, so the
certified bound of :mod:`lcnn_jax.measures.bounds` (which takes the float64 SVD or circular-embedding norm of those
weights, times ``1 + 64 eps``) is ``<= 1`` per layer. That interpreter bounds these layers with no special rule:
the rescaled kernel is computed from parameters alone, so it sees an ordinary dense layer / convolution.

**MinMax** (GroupSort with groups of 2; Anil, Lucas & Grosse 2019): the channels are split in two halves ``a, b``
and mapped to ``(max(a, b), min(a, b))``. At every input this permutes coordinates pairwise, so it is 1-Lipschitz
and preserves gradient norms (unlike ReLU). It runs as a jitted function named ``minmax_pairs``, which the bound
interpreter knows as a 1-Lipschitz, piecewise-linear map (``K = inf``: no curvature certificate through it).

Models (registered as ``aol_mlp`` and ``aol_cnn``): AOL layers and activations, then a plain dense ``head``, whose
pairwise row differences give the margin bounds (GloRo's last-layer treatment). :func:`training_bounds` gives the
differentiable pairwise Lipschitz and curvature bounds of such a model from its parameters, for the
certifiable-training losses of :mod:`lcnn_jax.regularizers.certifiable`.

Example::

    import jax, jax.numpy as jnp
    from lcnn_jax.nn.lipschitz import AOLCNN, training_bounds
    net = AOLCNN(num_classes=10, channels=(8, 16), dense_widths=(32,))
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    logits = net.apply(variables, jnp.zeros((4, 28, 28, 1)))
    pair_l, pair_k = training_bounds(variables["params"])   # (10, 10): bounds on |z_i - z_j| slopes/curvatures

Cost: an AOL dense layer adds one ``in x in`` Gram matrix per call (``O(in^2 out)``); an AOL convolution one
convolution of the kernel with itself (``O(k^2 C_in^2 C_out (2k-1)^2)``), independent of the batch.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lcnn_jax.nn.conv import conv_nhwc
from lcnn_jax.nn.lcnn import CenteredSoftplus, beta_from_log
from lcnn_jax.types import Array

__all__ = ["AOL_SHRINK", "TRAIN_BOUND_SAFETY", "aol_dense_scales", "aol_conv_scales", "aol_dense_kernel",
           "aol_conv_kernel", "AOLDense", "AOLConv", "minmax_pairs", "MinMax", "AOLMLP", "AOLCNN",
           "LIPSCHITZ_ACTIVATIONS", "MODEL_REGISTRY", "training_bounds", "check_lipschitz_params",
           "is_smooth"]

#: The AOL scales are multiplied by this (``1 - 2^-10``) so that the float32 rescaled weights have float64 norm
#: below 1 with room for their rounding (see the module docstring).
AOL_SHRINK = 1.0 - 2.0 ** -10
#: :func:`training_bounds` multiplies its bounds by this (``1 + 2^-10``), which covers the ``(1 + 64 eps)``
#: margins of the certified bound and the float32 rounding of the row differences (relative ``~1e-6``).
TRAIN_BOUND_SAFETY = 1.0 + 2.0 ** -10
_TINY = 1e-12


def aol_dense_scales(kernel: Array) -> Array:
    """``d_i = (1 - 2^-10) (sum_j |W W^T|_ij)^(-1/2)`` for a Flax kernel ``W`` of shape (in, out): ``(in,)``."""
    gram = kernel @ kernel.T
    return AOL_SHRINK * lax.rsqrt(jnp.sum(jnp.abs(gram), axis=1) + _TINY)


def aol_dense_kernel(kernel: Array) -> Array:
    """The rescaled kernel ``D W`` (rows scaled by :func:`aol_dense_scales`): ``||D W||_2 < 1``."""
    return kernel * aol_dense_scales(kernel)[:, None]


def aol_conv_scales(kernel: Array) -> Array:
    """Per input channel ``d_i = (1 - 2^-10) (sum_{o, j} |R[o](i, j)|)^(-1/2)`` for an HWIO kernel, ``R`` its
    autocorrelation (see the module docstring), computed as one convolution of the kernel with itself."""
    kh, kw = kernel.shape[:2]
    lhs = jnp.transpose(kernel, (2, 0, 1, 3))  # (C_in as batch, kh, kw, C_out as channels)
    rhs = jnp.transpose(kernel, (0, 1, 3, 2))  # HWIO with C_out -> C_in
    r = lax.conv_general_dilated(lhs, rhs, window_strides=(1, 1), padding=((kh - 1, kh - 1), (kw - 1, kw - 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=lax.Precision.HIGHEST)  # (C_in, 2kh-1, 2kw-1, C_in)
    return AOL_SHRINK * lax.rsqrt(jnp.sum(jnp.abs(r), axis=(1, 2, 3)) + _TINY)


def aol_conv_kernel(kernel: Array) -> Array:
    """The rescaled HWIO kernel (input channels scaled by :func:`aol_conv_scales`): its convolution has norm < 1
    on every image shape, padding and stride."""
    return kernel * aol_conv_scales(kernel)[None, None, :, None]


class AOLDense(nn.Module):
    """Dense layer ``x -> x (D W) + b`` with the AOL scales ``D``: 1-Lipschitz for every ``W`` (orthogonal init)."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        w = self.param("kernel", nn.initializers.orthogonal(), (x.shape[-1], self.features), jnp.float32)
        y = x @ aol_dense_kernel(w).astype(x.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(x.dtype)
        return y


def _center_orthogonal(key, shape, dtype=jnp.float32):
    """An HWIO kernel that is an orthogonal ``C_in x C_out`` matrix at its centre tap plus small noise elsewhere
    (a near-isometry at initialisation, as AOL's authors initialise)."""
    kh, kw, cin, cout = shape
    k1, k2 = jax.random.split(key)
    center = nn.initializers.orthogonal()(k1, (cin, cout), dtype)
    noise = 0.05 * jax.random.normal(k2, shape, dtype) / math.sqrt(kh * kw * cin)
    return noise.at[kh // 2, kw // 2].add(center)


class AOLConv(nn.Module):
    """Convolution (NHWC, HWIO kernel) with AOL-rescaled input channels: 1-Lipschitz for every kernel."""

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        kh, kw = self.kernel_size
        w = self.param("kernel", _center_orthogonal, (kh, kw, x.shape[-1], self.features), jnp.float32)
        y = conv_nhwc(x, aol_conv_kernel(w).astype(x.dtype), tuple(self.strides), self.padding)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(x.dtype)
        return y


@jax.jit
def minmax_pairs(x: Array) -> Array:
    """GroupSort-2 on the last axis: halves ``a, b`` -> ``concat(max(a, b), min(a, b))`` (1-Lipschitz; the last
    axis must be even). The name is what the bound interpreter recognises."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([jnp.maximum(a, b), jnp.minimum(a, b)], axis=-1)


class MinMax(nn.Module):
    """The MinMax activation as a layer (see :func:`minmax_pairs`)."""

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        if x.shape[-1] % 2:
            raise ValueError(f"MinMax needs an even number of channels (last axis), got {x.shape[-1]}; choose even "
                             f"widths/channels for the AOL models.")
        return minmax_pairs(x)


#: Activations of the AOL models: name -> (factory, smooth). ``centered_softplus`` (LCNN's, trainable ``b``,
#: slope in (0, 1), curvature ``b/4``) makes a twice-differentiable network (curvature certificate, CRT penalty).
#: Only these two, so the parameters tell them apart (a ``log_beta`` or nothing), which :func:`training_bounds`
#: relies on.
LIPSCHITZ_ACTIVATIONS = {"minmax": (MinMax, False), "centered_softplus": (CenteredSoftplus, True)}


def _act(name: str):
    if name not in LIPSCHITZ_ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r} for an AOL model; choose one of "
                         f"{sorted(LIPSCHITZ_ACTIVATIONS)}")
    return LIPSCHITZ_ACTIVATIONS[name][0]


class AOLMLP(nn.Module):
    """flatten -> [AOLDense(w) -> act] for w in widths -> Dense(num_classes) ``head``. Layers ``aol{i}``,
    activations ``act{i}``."""

    num_classes: int
    widths: Sequence[int] = (256, 256, 256)
    activation: str = "minmax"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        act = _act(self.activation)
        x = x.reshape((x.shape[0], -1))
        for i, w in enumerate(self.widths):
            x = AOLDense(int(w), name=f"aol{i}")(x, train=train)
            x = act(name=f"act{i}")(x, train=train)
        return nn.Dense(self.num_classes, name="head")(x)


class AOLCNN(nn.Module):
    """AOL convolutions, then AOL dense layers, then a plain dense ``head``.

    Per entry ``c`` of ``channels``: a 3x3 AOL convolution (stride 1) to ``c`` channels and a 4x4 AOL convolution
    with stride 2 (down-sampling by a 1-Lipschitz map, no pooling: average pooling would halve the slope and the
    certified margin with it), each followed by the activation; then flatten, ``dense_widths`` AOL dense layers
    with the activation, and the head. 28x28 inputs with two entries: 28 -> 14 -> 7.
    """

    num_classes: int
    channels: Sequence[int] = (16, 32)
    dense_widths: Sequence[int] = (256,)
    activation: str = "minmax"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if x.ndim != 4:
            raise ValueError(f"AOLCNN expects NHWC images (B, H, W, C), got shape {x.shape}")
        act = _act(self.activation)
        i = 0
        for c in self.channels:
            for kernel, stride in (((3, 3), (1, 1)), ((4, 4), (2, 2))):
                x = AOLConv(int(c), kernel_size=kernel, strides=stride, name=f"aol{i}")(x, train=train)
                x = act(name=f"act{i}")(x, train=train)
                i += 1
        x = x.reshape((x.shape[0], -1))
        for w in self.dense_widths:
            x = AOLDense(int(w), name=f"aol{i}")(x, train=train)
            x = act(name=f"act{i}")(x, train=train)
            i += 1
        return nn.Dense(self.num_classes, name="head")(x)


_LAYER = re.compile(r"^aol\d+$")
_ACT = re.compile(r"^act\d+$")


def check_lipschitz_params(params: Any, head: str = "head") -> None:
    """Raise ``ValueError`` unless ``params`` look like an AOL model's: top-level modules ``aol<i>`` (AOL layers),
    ``act<i>`` (activations, parameters only ``log_beta``) and the dense ``head``. :func:`training_bounds` is a
    bound only for such a model (every layer before the head 1-Lipschitz by construction)."""
    if not hasattr(params, "keys"):
        raise ValueError(f"params must be a mapping of module names, got {type(params).__name__}")
    if head not in params or "kernel" not in params[head]:
        raise ValueError(f"the parameters have no dense head {head!r} with a 'kernel': the certifiable-training "
                         f"losses need a model of lcnn_jax.nn.lipschitz (aol_mlp, aol_cnn), whose last layer is "
                         f"a plain dense layer named 'head'; found modules {sorted(params)}.")
    for name in params:
        if name == head or _LAYER.match(name):
            continue
        if _ACT.match(name) and set(params[name]) <= {"log_beta"}:
            continue
        raise ValueError(f"module {name!r} is not a 1-Lipschitz layer of lcnn_jax.nn.lipschitz (aol<i>, act<i>, "
                         f"head): the training-time bound would not be a bound. Build the model with "
                         f"model.name='aol_mlp' or 'aol_cnn', or drop the certifiable-training regularizer.")


def _pair_diff_norms(kernel: Array) -> Array:
    """``(K, K)``: ``||w_i - w_j||`` for the columns of a head kernel (in, K), with a gradient-safe square root."""
    diff = kernel[:, :, None] - kernel[:, None, :]
    sq = jnp.sum(diff * diff, axis=0)
    eye = jnp.eye(sq.shape[0], dtype=bool)
    safe = jnp.where(eye, 1.0, sq)
    return jnp.where(eye, 0.0, jnp.sqrt(safe))


def is_smooth(params: Any) -> bool:
    """Whether an AOL model's activations are all centred softplus (a ``log_beta`` per activation site, one site
    per AOL layer): then the network is twice differentiable. Reads the parameter names only (works under jit)."""
    layers = [n for n in params if _LAYER.match(n)]
    smooth = [n for n in params if _ACT.match(n) and "log_beta" in params[n]]
    return len(smooth) >= len(layers)  # an AOL layer whose activation has no log_beta: MinMax, piecewise linear


def training_bounds(params: Any, head: str = "head") -> tuple[Array, Array]:
    """Differentiable pairwise bounds ``(L_pair, K_pair)``, each ``(K, K)``, for an AOL model's logit differences.

    Every layer before the head is 1-Lipschitz by construction (AOL layers, MinMax, centred softplus), so
    the head's input ``h`` has slope ``<= 1``, and ``z_i - z_j = (w_i - w_j)^T h + c`` has slope
    ``L_ij = ||w_i - w_j||``. Curvature: with all slopes ``<= 1`` the composition rule gives
    ``||D^2 h|| <= sum_sites K_site`` (``b/4`` per centred softplus; ``inf`` when any activation is MinMax, the
    parameter-free one), so ``K_ij = ||w_i - w_j|| sum_sites K_site``. Both are multiplied by :data:`TRAIN_BOUND_SAFETY`, so they
    are never below the certified bounds that :func:`lcnn_jax.measures.curvature_bound` computes for the same
    parameters (tested). Raises ``ValueError`` for parameters of another model (:func:`check_lipschitz_params`).
    Cost: ``O(K^2 d)`` for a head with ``d`` inputs; no pass through the network.
    """
    check_lipschitz_params(params, head)
    w = jnp.asarray(params[head]["kernel"], jnp.float32)
    diff = _pair_diff_norms(w) * TRAIN_BOUND_SAFETY
    curv = jnp.zeros((), jnp.float32)
    if not is_smooth(params):
        curv = jnp.asarray(jnp.inf, jnp.float32)
    for name in (n for n in params if _ACT.match(n) and "log_beta" in params[n]):
        curv = curv + jnp.sum(beta_from_log(params[name]["log_beta"])) / 4.0
    k_pair = jnp.where(diff > 0, diff * curv, 0.0)  # 0 * inf = 0 on the diagonal
    return diff, k_pair


#: The entries :mod:`lcnn_jax.nn.models` adds to its registry: name -> (class, default keywords).
MODEL_REGISTRY = {"aol_mlp": (AOLMLP, {}), "aol_cnn": (AOLCNN, {})}

