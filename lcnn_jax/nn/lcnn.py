"""Low-curvature network (LCNN) layers (Srinivas, Matoba, Lakkaraju & Fleuret, NeurIPS 2022).

Four drop-in layers for the pluggable-layer protocol of :mod:`lcnn_jax.nn.layers`, each called as
``layer(x, train=train)``, and a residual block for :class:`lcnn_jax.nn.models.ResNet`:

* :class:`CenteredSoftplus`: ``s(x) = (softplus(b x) - ln 2) / b``, ``b = exp(log_beta) + 1e-3``;
  slope in (0, 1), curvature ``|s''| <= b / 4``.
* :class:`LipschitzBatchNorm`: ``BN(x) * s * min(1/s, gamma)``, ``s = min_c sqrt(running_var_c + eps)``;
  in eval mode affine with Lipschitz constant ``min(1/s, gamma) <= gamma``.
* :class:`SpectralConv`: ``conv(x, W) / sigma``, ``sigma`` = operator norm of the convolution as a linear map
  on images of the real input shape (strides and zero padding included); slope 1, curvature 0.
* :class:`SpectralDense`: ``x @ W / sigma``, ``sigma = ||W||_2``; slope 1, curvature 0.
* :class:`LCNNBasicBlock`: ``act(0.5 (conv2(act(conv1(x/sqrt2))) + shortcut(x/sqrt2)))``, each conv followed
  by the norm.

(slope 1 for the spectral layers once power iteration has converged; the curvature bound in
:mod:`lcnn_jax.measures.bounds` uses the true norms, so it never relies on convergence.)

Parameters and state
--------------------
* ``CenteredSoftplus``: ``params/log_beta`` (scalar, one per site), initial ``b = 5``.
* ``LipschitzBatchNorm``: ``params/log_gamma`` (scalar, initial ``gamma = 10``), ``batch_stats/{mean, var}``.
* ``SpectralConv``/``SpectralDense``: ``params/{kernel, bias}`` and the power-iteration vector
  ``spectral/v`` (shape ``(1, H, W, C_in)`` of the real input, resp. ``(C_in,)``). It gets
  :attr:`SpectralConv.n_init_iter` (15) iterations at ``init`` and ``n_train_iter`` (1) per call with
  ``train=True`` (stored when the ``spectral`` collection is mutable); ``train=False`` uses it as is.

Weight decay must skip ``log_beta``/``log_gamma`` (the default ``optim.wd_exclude`` does); the LCNN
penalty on them lives in :mod:`lcnn_jax.regularizers.lcnn`.

Train vs eval (as in the reference code ``kylematoba/lcnn``, ``ConvBNBlock``): in training mode BN uses the
batch statistics and ``s`` the running variance *before* this step's update; in eval mode both use the
running statistics, and then the layer is affine with Lipschitz constant exactly ``min(1/s, gamma)``.
Running variances are the biased batch variances (Flax convention; PyTorch tracks the unbiased ones).

Example::

    import jax, jax.numpy as jnp
    from lcnn_jax.nn import make_lcnn_model
    net = make_lcnn_model("small_cnn", 10, width_mult=0.25)   # spectral convs, centred softplus,
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))  # Lipschitz BN, avg-pool
    logits, upd = net.apply(variables, jnp.zeros((8, 28, 28, 1)), train=True,
                            mutable=["batch_stats", "spectral"])

Cost: one forward pass per layer, plus for each spectral layer ``n_train_iter`` convolutions and
transposed convolutions on ONE image per training call and one more convolution on one image for
``sigma`` (negligible next to the batch).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding
from jax import lax

from lcnn_jax.loops import auto_unroll
from lcnn_jax.nn.conv import conv_nhwc
from lcnn_jax.nn.layers import ModuleFactory
from lcnn_jax.types import Array

__all__ = [
    "SPECTRAL",
    "BETA_EPS",
    "centered_softplus",
    "beta_from_log",
    "lipschitz_bn_scale",
    "conv_nhwc",
    "power_iterate",
    "CenteredSoftplus",
    "LipschitzBatchNorm",
    "SpectralConv",
    "SpectralDense",
    "LCNNBasicBlock",
    "LCNN_LAYERS",
    "lcnn_model_kwargs",
]

#: The collection holding the power-iteration vectors of the spectral layers.
SPECTRAL = "spectral"
#: Floor added to ``exp(log_beta)``, so the activation never degenerates (as in the reference).
BETA_EPS = 1e-3
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


# --------------------------------------------------------------------------------------------
# Centred softplus
# --------------------------------------------------------------------------------------------
@jax.custom_jvp
def _log_half_one_plus_exp(z: Array) -> Array:
    """``softplus(z) - ln 2 = log((1 + e^z) / 2)`` without overflow and without cancelling ``ln 2``.

    ``max(z, 0) + log1p(expm1(-|z|) / 2)``: the ``log1p`` argument lies in ``(-1/2, 0]``, so the value is
    accurate near 0 (where the naive form loses digits to ``ln 2``) and for ``|z|`` in the 1e4s.
    """
    return jnp.maximum(z, 0) + jnp.log1p(0.5 * jnp.expm1(-jnp.abs(z)))


@_log_half_one_plus_exp.defjvp
def _log_half_one_plus_exp_jvp(primals, tangents):
    # The |z| and max(z, 0) kinks cancel in the value; the custom rule keeps autodiff (and its
    # derivatives, via sigmoid) exact at z = 0 as well.
    (z,), (dz,) = primals, tangents
    return _log_half_one_plus_exp(z), jax.nn.sigmoid(z) * dz


def centered_softplus(x: Array, beta: Any) -> Array:
    """``s(x) = (softplus(beta x) - ln 2) / beta``: ``s(0) = 0``, ``s' = sigmoid(beta x)`` in (0, 1),
    ``s'' = beta s'(1 - s')`` so ``|s''| <= beta / 4``; ``s(x) -> x / 2`` as ``beta -> 0``.

    Finite value and gradients (in ``x`` and ``beta``) for ``|x|`` up to 1e4 and beyond in float32.
    """
    return _log_half_one_plus_exp(beta * x) / beta


def beta_from_log(log_beta: Array) -> Array:
    """The effective slope parameter ``b = exp(log_beta) + 1e-3`` of :class:`CenteredSoftplus`."""
    return jnp.exp(log_beta) + BETA_EPS


class CenteredSoftplus(nn.Module):
    """Trainable centred softplus ``(softplus(b x) - ln 2) / b``, ``b = exp(log_beta) + 1e-3``.

    One scalar parameter ``log_beta`` per site, initialised so that ``b = init_beta`` (default 5).
    Lipschitz 1 (slope ``sigmoid(b x)`` in (0, 1)), curvature ``|s''| <= b / 4``.
    """

    init_beta: float = 5.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train  # the same function in both modes
        if not self.init_beta > BETA_EPS:
            raise ValueError(f"CenteredSoftplus needs init_beta > {BETA_EPS} (b = exp(log_beta) + {BETA_EPS}), "
                             f"got {self.init_beta}")
        log_beta = self.param("log_beta",
                              lambda key: jnp.asarray(math.log(self.init_beta - BETA_EPS), jnp.float32))
        return centered_softplus(x, beta_from_log(log_beta).astype(jnp.result_type(x, log_beta)))


# --------------------------------------------------------------------------------------------
# Lipschitz batch norm
# --------------------------------------------------------------------------------------------
def lipschitz_bn_scale(running_var: Array, epsilon: float) -> Array:
    """``s = min_c sqrt(running_var_c + eps)`` under stop-gradient (``1/s`` is BN's largest per-channel slope)."""
    return lax.stop_gradient(jnp.sqrt(jnp.min(running_var) + epsilon))


class LipschitzBatchNorm(nn.Module):
    """Batch norm without affine parameters, clipped to Lipschitz constant ``gamma``.

    ``y = BN(x) * s * min(1/s, gamma)`` with ``BN(x) = (x - mu) / sqrt(var + eps)`` per channel (last
    axis), ``s = min_c sqrt(running_var_c + eps)`` (stop-gradient) and ``gamma = exp(log_gamma)``
    trainable (initial ``init_gamma = 10``). ``train=True``: batch statistics for ``BN``, running ones for
    ``s`` (before this step's update), running statistics updated as ``r <- momentum r + (1 - momentum)
    stat`` (apply with ``mutable=["batch_stats"]``; not at ``init``). ``train=False``: running statistics,
    and the layer is affine with Lipschitz constant ``min(1/s, gamma) <= gamma``.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    init_gamma: float = 10.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if not self.init_gamma > 0:
            raise ValueError(f"LipschitzBatchNorm needs init_gamma > 0, got {self.init_gamma}")
        c = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        log_gamma = self.param("log_gamma", lambda key: jnp.asarray(math.log(self.init_gamma), jnp.float32))
        s = lipschitz_bn_scale(ra_var.value, self.epsilon)
        if train:
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)  # centred: no E[x^2] - E[x]^2 cancellation
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean).astype(ra_mean.value.dtype)
                ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var).astype(ra_var.value.dtype)
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (x - mean) * lax.rsqrt(var + self.epsilon)
        return y * (s * jnp.minimum(1.0 / s, jnp.exp(log_gamma))).astype(y.dtype)


# --------------------------------------------------------------------------------------------
# Spectral normalisation by the true operator norm
# --------------------------------------------------------------------------------------------
def _pair(value: Union[int, Sequence[int]], what: str) -> tuple:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")
    return value


def _unit(v: Array, eps: float) -> Array:
    sq = jnp.sum(jnp.square(v))
    return v * lax.rsqrt(jnp.maximum(sq, eps * eps))


def _safe_norm(v: Array) -> Array:
    sq = jnp.sum(jnp.square(v))
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def power_iterate(fwd: Callable[[Array], Array], v: Array, num_iters: int, eps: float = 1e-12) -> Array:
    """``num_iters`` steps of ``v <- A^T A v / ||A^T A v||`` for the linear map ``A = fwd``.

    ``A^T`` is the exact transpose of ``fwd`` (its VJP: for a linear map the transpose, taken through the
    derivative rules so that a convolution defined by its JVP, as :func:`lcnn_jax.nn.conv.conv_nhwc` is on the
    CPU, transposes by its fast rule), so for a convolution it is the transposed convolution with the same strides
    and padding, on the same image shape. The top right
    singular vector is the fixed point; ``||A v||`` then estimates ``||A||_2`` from below.
    Cost: ``num_iters`` applications of ``A`` and of ``A^T``. A short loop (the one step per training call) is
    unrolled, a long one is a ``lax.fori_loop`` (:func:`lcnn_jax.loops.auto_unroll`): the transposed convolution
    is a backward convolution, which XLA:CPU runs on a slow path inside a ``while`` loop.
    """
    def body(_, u):
        out, transpose = jax.vjp(fwd, u)
        (w,) = transpose(out)
        return _unit(w, eps)

    if auto_unroll(num_iters) is True:
        for i in range(num_iters):
            v = body(i, v)
        return v
    return lax.fori_loop(0, num_iters, body, v)


def _spectral_sigma(module: nn.Module, fwd_for: Callable[[Array], Callable[[Array], Array]], kernel: Array,
                    v_shape: tuple, train: bool) -> Array:
    """Shared by the spectral layers: the stored vector, its update, and ``sigma = ||A(W) v||``.

    ``sigma`` is differentiable in ``W`` with ``v`` under stop-gradient, which gives ``dsigma/dW =
    u^T (dA) v`` with ``u = A v / ||A v||`` (the standard spectral-norm gradient).
    """
    frozen = lax.stop_gradient(kernel)

    def init_vector():
        v0 = jax.random.normal(module.make_rng("params"), v_shape, jnp.float32)
        return power_iterate(fwd_for(frozen.astype(jnp.float32)), _unit(v0, module.eps),
                             module.n_init_iter, module.eps)

    v_var = module.variable(SPECTRAL, "v", init_vector)
    if v_var.value.shape != v_shape:
        raise ValueError(f"{type(module).__name__} {module.name!r}: its power-iteration vector has shape "
                         f"{v_var.value.shape} but this input needs {v_shape}; the operator norm of a "
                         "convolution depends on the image size, so re-initialise the model for this input shape.")
    v = v_var.value.astype(kernel.dtype)
    if train and not module.is_initializing() and module.n_train_iter > 0:
        v = power_iterate(fwd_for(frozen), v, module.n_train_iter, module.eps)
        if module.is_mutable_collection(SPECTRAL):
            v_var.value = v.astype(v_var.value.dtype)
    return _safe_norm(fwd_for(kernel)(lax.stop_gradient(v)))


def _check_iters(module: nn.Module) -> None:
    for name in ("n_init_iter", "n_train_iter"):
        value = getattr(module, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{type(module).__name__}.{name} must be a non-negative int, got {value!r}")


class SpectralConv(nn.Module):
    """2-D convolution divided by its true operator norm on images of the real input shape.

    ``y = conv(x, W) / sigma + bias`` with ``sigma ~ ||A_W||_2``, ``A_W : R^{H x W x C_in} -> R^{H' x W' x C_out}``
    the convolution *as a linear map* (with its strides and zero padding), estimated by power iteration
    with the exact transposed convolution (not the reshaped-kernel norm of Miyato et al., which can be off
    by up to a factor ``sqrt(kh kw)``). Same constructor keywords as :class:`lcnn_jax.nn.layers.Conv`
    (``features, kernel_size, strides, padding, use_bias``); NHWC input, HWIO kernel.

    The vector ``spectral/v`` has the shape ``(1, H, W, C_in)`` seen at ``init``; applying the layer to
    another image size raises ``ValueError``. Cost per training call: ``n_train_iter`` convolutions and
    transposed convolutions on one image, plus one convolution on one image for ``sigma``.
    """

    features: int
    kernel_size: Union[int, Sequence[int]] = (3, 3)
    strides: Union[int, Sequence[int]] = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    n_init_iter: int = 15
    n_train_iter: int = 1
    eps: float = 1e-12

    def operator(self, kernel: Array) -> Callable[[Array], Array]:
        """The bias-free linear map ``v -> conv(v, kernel)`` with this layer's strides and padding."""
        strides = _pair(1 if self.strides is None else self.strides, "strides")
        padding = canonicalize_padding(self.padding, 2)
        if isinstance(padding, str) and padding not in ("SAME", "VALID"):
            raise ValueError(f"SpectralConv supports padding 'SAME', 'VALID' or explicit zero padding, got {padding!r}")
        return lambda v: conv_nhwc(v, kernel.astype(v.dtype), strides, padding)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if x.ndim != 4:
            raise ValueError(f"SpectralConv expects NHWC input (B, H, W, C), got shape {x.shape}")
        _check_iters(self)
        kh, kw = _pair(self.kernel_size, "kernel_size")
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32)
        dtype = jnp.result_type(x, kernel)
        kernel, x = kernel.astype(dtype), x.astype(dtype)
        sigma = _spectral_sigma(self, self.operator, kernel, (1,) + x.shape[1:], train)
        y = self.operator(kernel)(x) / jnp.maximum(sigma, self.eps)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(dtype)
        return y


class SpectralDense(nn.Module):
    """Dense layer ``y = x @ W / ||W||_2 + bias`` on the last axis, ``||W||_2`` by power iteration.

    Same constructor keywords as :class:`lcnn_jax.nn.layers.Dense` (``features, use_bias``); vector
    ``spectral/v`` of shape ``(C_in,)``; same iteration scheme as :class:`SpectralConv`.
    """

    features: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    n_init_iter: int = 15
    n_train_iter: int = 1
    eps: float = 1e-12

    @staticmethod
    def operator(kernel: Array) -> Callable[[Array], Array]:
        """The bias-free linear map ``v -> v @ kernel``."""
        return lambda v: v @ kernel.astype(v.dtype)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_iters(self)
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        dtype = jnp.result_type(x, kernel)
        kernel, x = kernel.astype(dtype), x.astype(dtype)
        sigma = _spectral_sigma(self, self.operator, kernel, (x.shape[-1],), train)
        y = self.operator(kernel)(x) / jnp.maximum(sigma, self.eps)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(dtype)
        return y


# --------------------------------------------------------------------------------------------
# The LCNN residual block
# --------------------------------------------------------------------------------------------
class LCNNBasicBlock(nn.Module):
    """LCNN ResNet block: ``act2(0.5 * (B2(act1(B1(x / sqrt2))) + S(x / sqrt2)))``.

    ``B_i = norm_i . conv_i`` (3x3; the first with the block's stride), ``S`` the identity or, when the
    stride or width changes, ``shortcut_norm . shortcut_conv`` (1x1, strided). This is the reference's
    ``ChannelRepeatOnce -> ApplyOverHalves(conv1, shortcut) -> ApplyOverHalves(act, id) ->
    ApplyOverHalves(conv2, id) -> SumHalves -> act`` with each conv a conv+clipped-BN block: splitting
    ``x`` into two copies scaled by ``1/sqrt2`` is an isometry and ``0.5 (a + b)`` has norm ``1/sqrt2``,
    so the block's Lipschitz constant is at most ``max(L_B, L_S)`` instead of ``L_B + L_S``.
    Same constructor as :class:`lcnn_jax.nn.models.BasicBlock` (plug in with ``ResNet(block=...)``).
    """

    features: int
    strides: int = 1
    conv: ModuleFactory = SpectralConv
    norm: Optional[ModuleFactory] = LipschitzBatchNorm
    act: ModuleFactory = CenteredSoftplus

    def _conv(self, features: int, kernel: int, strides: int, name: str) -> nn.Module:
        return self.conv(features=features, kernel_size=(kernel, kernel), strides=(strides, strides),
                         padding="SAME", use_bias=self.norm is None, name=name)

    def _norm(self, x: Array, name: str, train: bool) -> Array:
        return x if self.norm is None else self.norm(name=name)(x, train=train)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        h = x * _INV_SQRT2
        y = self._norm(self._conv(self.features, 3, self.strides, "conv1")(h, train=train), "norm1", train)
        y = self.act(name="act1")(y, train=train)
        y = self._norm(self._conv(self.features, 3, 1, "conv2")(y, train=train), "norm2", train)
        shortcut = h
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = self._conv(self.features, 1, self.strides, "shortcut_conv")(h, train=train)
            shortcut = self._norm(shortcut, "shortcut_norm", train)
        return self.act(name="act2")(0.5 * (y + shortcut), train=train)


# --------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------
#: The LCNN factories by role (what ``make_model`` accepts as ``act=``, ``norm=``, ``conv=``, ...).
LCNN_LAYERS = {"act": CenteredSoftplus, "norm": LipschitzBatchNorm, "conv": SpectralConv,
               "dense": SpectralDense, "block": LCNNBasicBlock}

_ARCH_FIELDS = {
    "mlp": ("act", "dense"),
    "lenet": ("act", "conv", "dense"),
    "small_cnn": ("act", "conv", "dense", "norm"),
    "resnet18": ("act", "conv", "dense", "norm", "block"),
    "vgg11": ("act", "conv", "dense", "norm"),
}
_POOLED = ("lenet", "small_cnn", "vgg11")


def lcnn_model_kwargs(arch: str, *, norm: bool = True, pool: str = "avg") -> dict:
    """Keyword arguments that turn the registered model ``arch`` into its LCNN variant.

    ``make_model(arch, num_classes, **lcnn_model_kwargs(arch))``: centred softplus, spectral convs and
    dense layers, Lipschitz batch norm after every conv (``norm=False``: none, convs get a bias), the
    LCNN residual block (ResNet) and average pooling (``pool='avg'``: a 2x2/2 average pool has Lipschitz
    constant 1/2 and zero curvature everywhere; ``'max'`` has Lipschitz 1 and is smooth only almost
    everywhere). ``arch`` in ``mlp, lenet, small_cnn, resnet18, vgg11``.
    """
    if arch not in _ARCH_FIELDS:
        raise ValueError(f"no LCNN variant of {arch!r}; choose one of {tuple(_ARCH_FIELDS)}")
    if pool not in ("avg", "max"):
        raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    kwargs = {k: LCNN_LAYERS[k] for k in _ARCH_FIELDS[arch]}
    if "norm" in kwargs and not norm:
        kwargs["norm"] = None
    if arch in _POOLED:
        kwargs["pool"] = pool
    return kwargs
