"""Pluggable layers: activation, normalisation, convolution and dense factories.

Every model in :mod:`lcnn_jax.nn.models` is built from *factories*, not from hard-wired layers, so
that LCNN (trainable centred softplus, Lipschitz batch norm, spectrally normalised convolutions and
dense layers) or any other variant can be swapped in without copying a model.

The protocol
------------
A **factory** is any callable that returns a fresh Flax linen module; a Module class itself is a
factory, and so is ``functools.partial(SomeModule, field=value)``. Every *site* in a model calls its
factory once, so each site owns its own module (and its own parameters, e.g. a per-site ``log_beta``).

**Every pluggable layer is called the same way**::

    y = layer(x, train=train)        # __call__(self, x, train: bool = False)

``train`` is passed even to layers that ignore it (ReLU, plain convolutions), so a layer that needs it
(batch norm, a spectral norm that runs power iteration only while training) is a drop-in.
Models always construct layers with **keyword** arguments; a factory must accept:

=============  ==============================================================================
kind           constructor keywords (all passed by keyword)
=============  ==============================================================================
activation     ``act(name=...)``
norm           ``norm(name=...)``  (features are inferred from the input)
conv           ``conv(features=int, kernel_size=(kh, kw), strides=(sh, sw),
               padding='SAME'|'VALID', use_bias=bool, name=...)``; input/output NHWC
dense          ``dense(features=int, use_bias=bool, name=...)``; acts on the last axis
=============  ==============================================================================

``norm=None`` in a model means "no normalisation layer" (and convolutions then get a bias); the
:class:`Identity` layer is available where a norm *object* is wanted that does nothing.

Mutable state (batch statistics, power-iteration vectors) lives in collections; apply a model in
training mode with ``mutable=[...]`` listing them (``"batch_stats"`` for :class:`BatchNorm`).

Example::

    import jax, jax.numpy as jnp
    from lcnn_jax.nn import layers, models
    act = layers.activation("softplus", beta=10.0)     # a factory; every site gets its own module
    net = models.SmallCNN(num_classes=10, act=act, norm=layers.BatchNorm)
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    logits, updates = net.apply(variables, jnp.zeros((8, 28, 28, 1)), train=True,
                                mutable=["batch_stats"])

Cost: all layers here are one forward pass each; nothing iterates.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcnn_jax.types import Array
from lcnn_jax.nn import conv as conv_ops

ModuleFactory = Callable[..., nn.Module]

ACTIVATIONS = ("relu", "sigmoid", "tanh", "softplus", "identity")
NORMS = ("batch", "none")
POOLS = ("max", "avg")


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------
def softplus_beta(x: Array, beta: Any = 1.0) -> Array:
    """``softplus(beta * x) / beta = log(1 + exp(beta * x)) / beta``, numerically stable.

    ``jax.nn.softplus`` is ``logaddexp(z, 0)``, which neither overflows for large positive ``z`` nor
    loses the linear tail; its derivative ``sigmoid(beta * x)`` is finite everywhere. Large beta
    approaches ReLU (error at most ``ln 2 / beta``, attained at 0).
    """
    return jax.nn.softplus(beta * x) / beta


def _apply_activation(kind: str, x: Array, beta: float) -> Array:
    if kind == "relu":
        return jax.nn.relu(x)
    if kind == "sigmoid":
        return jax.nn.sigmoid(x)
    if kind == "tanh":
        return jnp.tanh(x)
    if kind == "softplus":
        return softplus_beta(x, beta)
    if kind == "identity":
        return x
    raise ValueError(f"unknown activation {kind!r}; choose one of {ACTIVATIONS}")


class Activation(nn.Module):
    """A fixed (parameter-free) pointwise activation; ``kind`` in :data:`ACTIVATIONS`.

    ``softplus`` computes ``softplus(beta * x) / beta`` (see :func:`softplus_beta`); ``beta`` is
    ignored by the other kinds. The default ``Activation()`` is ReLU.
    """

    kind: str = "relu"
    beta: float = 1.0

    def __call__(self, x: Array, train: bool = False) -> Array:
        del train  # a fixed activation behaves the same in both modes
        return _apply_activation(self.kind, x, self.beta)


def activation(name: str, **kwargs: Any) -> ModuleFactory:
    """Factory for a fixed activation by name: ``'relu' | 'sigmoid' | 'tanh' | 'softplus' | 'identity'``.

    Only ``'softplus'`` takes a keyword, ``beta`` (> 0, default 1): ``softplus(beta x) / beta``.
    Returns ``functools.partial(Activation, kind=name, ...)``; call it (optionally with ``name=``) to
    get one module per site.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS} "
                         "or pass a module factory instead of a name")
    allowed = ("beta",) if name == "softplus" else ()
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"activation {name!r} does not accept {unknown}; it accepts {list(allowed)}")
    if name == "softplus":
        beta = float(kwargs.get("beta", 1.0))
        if not beta > 0:
            raise ValueError(f"softplus needs beta > 0, got {beta}")
        return functools.partial(Activation, kind=name, beta=beta)
    return functools.partial(Activation, kind=name)


def resolve_activation(spec: Union[str, ModuleFactory],
                       kwargs: Optional[Mapping[str, Any]] = None) -> ModuleFactory:
    """A name (see :func:`activation`, with ``kwargs``) or a factory (returned as is) -> factory."""
    if isinstance(spec, str):
        return activation(spec, **dict(kwargs or {}))
    if not callable(spec):
        raise ValueError(f"activation must be a name in {ACTIVATIONS} or a module factory, got {spec!r}")
    if kwargs:
        raise ValueError("act_kwargs only apply to an activation given by name; bind them into your "
                         "factory with functools.partial instead")
    return spec


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
class Identity(nn.Module):
    """A layer that returns its input (a norm that does nothing); ``__call__(x, train=False) = x``."""

    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        return x


class BatchNorm(nn.BatchNorm):
    """Batch norm over all axes but the last, with the pluggable-layer call ``norm(x, train=...)``.

    Training: ``y = (x - mean_B) / sqrt(var_B + eps) * scale + bias`` with the (biased) batch
    statistics, and running statistics updated as ``r <- momentum * r + (1 - momentum) * stat_B``
    (apply with ``mutable=["batch_stats"]``). Evaluation (``train=False``): the running statistics,
    so each example's output is independent of the rest of the batch.
    Defaults ``momentum=0.9, epsilon=1e-5`` match PyTorch's ``BatchNorm2d`` (its momentum 0.1 is our
    ``1 - momentum``), except that PyTorch tracks the unbiased running variance.
    Parameters ``scale``, ``bias`` (in ``params``), ``mean``, ``var`` (in ``batch_stats``).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5

    def __call__(self, x: Array, train: bool = False) -> Array:  # type: ignore[override]
        return super().__call__(x, use_running_average=not train)


def normalization(name: str, **kwargs: Any) -> Optional[ModuleFactory]:
    """Factory for a normalisation by name: ``'batch'`` -> :class:`BatchNorm`, ``'none'`` -> ``None``.

    ``'batch'`` accepts the :class:`flax.linen.BatchNorm` fields as keywords (e.g. ``momentum``).
    ``None`` means the model has no normalisation layer (and its convolutions get a bias).
    """
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; choose one of {NORMS} or pass a module factory")
    if name == "none":
        if kwargs:
            raise ValueError(f"norm 'none' takes no keywords, got {sorted(kwargs)}")
        return None
    valid = set(BatchNorm.__dataclass_fields__) - {"parent", "name", "use_running_average"}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(f"norm 'batch' does not accept {unknown}; it accepts {sorted(valid)}")
    return functools.partial(BatchNorm, **kwargs) if kwargs else BatchNorm


def resolve_norm(spec: Union[None, str, ModuleFactory],
                 kwargs: Optional[Mapping[str, Any]] = None) -> Optional[ModuleFactory]:
    """``None`` / a name (see :func:`normalization`) / a factory (returned as is) -> factory or None."""
    if spec is None:
        if kwargs:
            raise ValueError("norm_kwargs given but norm is None")
        return None
    if isinstance(spec, str):
        return normalization(spec, **dict(kwargs or {}))
    if not callable(spec):
        raise ValueError(f"norm must be None, a name in {NORMS} or a module factory, got {spec!r}")
    if kwargs:
        raise ValueError("norm_kwargs only apply to a norm given by name; bind them into your "
                         "factory with functools.partial instead")
    return spec


# --------------------------------------------------------------------------------------------
# Linear layers
# --------------------------------------------------------------------------------------------
class Conv(nn.Conv):
    """:class:`flax.linen.Conv` with the pluggable-layer call ``conv(x, train=...)`` (train unused).

    ``y = conv(x, kernel) + bias`` on NHWC input; kernel ``(kh, kw, C_in, features)`` (LeCun-normal
    init), bias zeros. Constructed as ``Conv(features=, kernel_size=, strides=, padding=, use_bias=)``.
    The convolution is :func:`lcnn_jax.nn.conv.conv_general_dilated`: on the CPU a first layer with few input
    channels runs as a sum of shifted images (same values and derivatives, faster there).
    """

    conv_general_dilated: Optional[Callable] = conv_ops.conv_general_dilated

    def __call__(self, x: Array, train: bool = False) -> Array:  # type: ignore[override]
        del train
        return super().__call__(x)


class Dense(nn.Dense):
    """:class:`flax.linen.Dense` with the pluggable-layer call ``dense(x, train=...)`` (train unused).

    ``y = x @ kernel + bias`` on the last axis; kernel ``(in, features)``.
    """

    def __call__(self, x: Array, train: bool = False) -> Array:  # type: ignore[override]
        del train
        return super().__call__(x)


# --------------------------------------------------------------------------------------------
# Pooling (fixed, not pluggable by factory; both kinds have Lipschitz constant <= 1 per window)
# --------------------------------------------------------------------------------------------
def _blocks(x: Array, k: int) -> Array:
    """``(B, H, W, C) -> (B, H/k, W/k, k*k, C)``: the non-overlapping ``k x k`` windows, row-major inside each."""
    b, h, w, c = x.shape
    return x.reshape(b, h // k, k, w // k, k, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // k, w // k, k * k, c)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def max_pool_blocks(x: Array, k: int) -> Array:
    """Max pooling over non-overlapping ``k x k`` windows of an NHWC array whose H and W are multiples of ``k``:
    the values of ``flax.linen.max_pool(x, (k, k), strides=(k, k))`` and the same derivative (all of a window's
    tangent / cotangent goes to its first maximum in row-major order, as XLA's select-and-scatter gives it), at a
    fraction of the cost of the backward pass on XLA:CPU: the gradient is a mask product, not select-and-scatter
    (input gradient of the small CNN at width 0.5, 256 MNIST images, 2 CPU cores: 109 -> 58 ms, in
    ``experiments/results/attack_speed.md``). Defined by its JVP (``jax.custom_jvp``), so forward mode, reverse
    mode and forward-over-reverse (HVPs) all work."""
    return _blocks(x, k).max(axis=3)


@max_pool_blocks.defjvp
def _max_pool_blocks_jvp(k, primals, tangents):
    (x,), (t,) = primals, tangents
    xb = _blocks(x, k)
    first = jax.nn.one_hot(jnp.argmax(xb, axis=3), k * k, axis=3, dtype=t.dtype)  # argmax: the first maximum
    return xb.max(axis=3), jnp.sum(_blocks(t, k) * first, axis=3)


def pool2d(x: Array, kind: str = "max", window: int = 2, stride: Optional[int] = None,
           padding: str = "VALID") -> Array:
    """2-D max or average pooling of an NHWC array over ``window x window`` patches.

    ``stride`` defaults to ``window``. With ``padding='SAME'`` average pooling divides by the number
    of real (non-padded) entries, so padding never shrinks activations.
    """
    if kind not in POOLS:
        raise ValueError(f"unknown pool {kind!r}; choose one of {POOLS}")
    stride = window if stride is None else stride
    shape, strides = (window, window), (stride, stride)
    if kind == "max":
        if stride == window and x.ndim == 4 and x.shape[1] % window == 0 and x.shape[2] % window == 0:
            return max_pool_blocks(x, window)  # SAME and VALID agree: the windows tile the image
        return nn.max_pool(x, shape, strides=strides, padding=padding)
    return nn.avg_pool(x, shape, strides=strides, padding=padding, count_include_pad=False)
