"""Convolutions as each backend runs them fastest: a network's first layer on the CPU as sums of shifted images.

Why this module exists: XLA:CPU hands a convolution with one or three input channels (the first layer on grey or
RGB images) to a generic loop instead of its fast convolution library, and its input gradient (one or three
*output* channels) likewise: on the small CNN (first layer 5x5, 1 -> 16 channels) the profiler showed these two
among the largest costs of an attack's input gradient. A convolution with ``C_in * kh * kw`` taps is also

    y[n, h, w, :] = sum_{i, j, c} x_pad[n, h + i, w + j, c] * W[i, j, c, :],

a sum of ``C_in * kh * kw`` shifted copies of the image, each times one row of the kernel: XLA:CPU fuses that
into one pass over the output. Its transpose, the input gradient, is a matrix product ``dy @ W^T``
(``kh * kw * C_in`` columns) followed by a sum of shifted slices of that product.

Cost (the same multiply-adds as the convolution, ``N H' W' C_out C_in kh kw``, in other kernels): forward, one
fused pass over the output reading the stored input ``C_in kh kw`` times, plus one stored copy each of the input and
the output; input gradient, one matmul into ``N H' W' x (C_in kh kw)`` values (memory for them) and one fused pass
summing ``kh kw`` shifted slices; weight gradient, ``lax``'s.

:func:`conv_nhwc` (and :func:`conv_general_dilated`, the same as Flax's ``Conv`` hook) takes that path when the
kernel has at most :data:`MAX_TAPS` taps, stride 1, no dilation and zero padding no wider than the kernel; other
convolutions, and every convolution on GPU/TPU (``lax.platform_dependent``), stay ``lax.conv_general_dilated``.
It is defined by its JVP (``jax.custom_jvp``), so values and derivatives of every order, forward and reverse, are
those of the convolution to float rounding (tests/test_conv.py checks them against ``lax`` in float64):

* the tangent in the input is written as ``patches(dx) @ W`` with the patches built by *padding* the input
  (one padded copy per tap), so that JAX's transpose of it, the input gradient, is the product above followed by
  *slices*: the fast direction on XLA:CPU (the transpose of a sum of slices is a sum of pads, which it runs slowly);
* the tangent in the kernel is ``lax``'s convolution, so weight gradients are what they were;
* the output is stored once (:func:`lcnn_jax.loops.materialize`): without it XLA fuses the sum of shifted images
  into every consumer (max pooling's argmax recomputed it, and the forward pass ran slower than the convolution);
  the input too, so that the taps read it instead of each recomputing what produced it (an attack's earlier steps).

Figures: ``experiments/bench_conv.py`` (``experiments/results/conv/bench.md``) and
``experiments/results/attack_speed.md``; :data:`FEW_CHANNEL_CONV` switches the path off for comparisons.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from lcnn_jax import loops

__all__ = ["FEW_CHANNEL_CONV", "MAX_TAPS", "conv_nhwc", "conv_general_dilated", "uses_few_channel_path"]

Array = jax.Array

#: Whether :func:`conv_nhwc` may take the shifted-sum path on the CPU (read while tracing).
FEW_CHANNEL_CONV = True

#: The path is taken for kernels of at most this many taps ``C_in * kh * kw`` (grey 5x5 = 25, RGB 3x3 = 27): the
#: forward pass is one fused term per tap, so it pays off only while taps are few.
MAX_TAPS = 32

_NHWC = ("NHWC", "HWIO", "NHWC")
Pads = tuple  # ((top, bottom), (left, right))


def _pads(x_shape, k_shape, strides, padding) -> Pads:
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(tuple(x_shape[1:3]), tuple(k_shape[:2]), tuple(strides), padding)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def uses_few_channel_path(x_shape: Sequence[int], k_shape: Sequence[int], strides: Sequence[int],
                          padding: Any) -> bool:
    """Whether :func:`conv_nhwc` computes this convolution as a sum of shifted images on the CPU (see the module
    docstring): stride 1, at most :data:`MAX_TAPS` taps, zero padding within ``kernel - 1`` on each side."""
    kh, kw, cin, _ = k_shape
    if not FEW_CHANNEL_CONV or tuple(strides) != (1, 1) or cin * kh * kw > MAX_TAPS:
        return False
    if isinstance(padding, str) and padding not in ("SAME", "VALID"):
        return False
    pads = _pads(x_shape, k_shape, strides, padding)
    return len(pads) == 2 and all(0 <= p <= k - 1 for (lo, hi), k in zip(pads, (kh, kw)) for p in (lo, hi))


def _lax_conv(x: Array, w: Array, pads: Pads) -> Array:
    return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_NHWC)


def _shifted_sum(x: Array, w: Array, pads: Pads) -> Array:
    """The convolution as the sum over taps of a shifted image times a kernel row (the forward pass)."""
    kh, kw, cin, _ = w.shape
    # the image is stored, so that the taps read it instead of each recomputing whatever produced it (in an
    # attack: every earlier step's update, XLA fusing the whole chain into each step's taps)
    xp = jnp.pad(loops.materialize(x), ((0, 0), pads[0], pads[1], (0, 0)))
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    terms = (xp[:, i:i + ho, j:j + wo, c:c + 1] * w[i, j, c] for i in range(kh) for j in range(kw)
             for c in range(cin))
    return functools.reduce(lambda a, b: a + b, terms)


def _padded_patches_matmul(u: Array, w: Array, pads: Pads) -> Array:
    """The same linear map of ``u``, written so that its transpose is a matmul and slices (the input gradient).

    ``patches[n, h, w, (i, j, c)] = u_pad[n, h + i, w + j, c]``, built from one copy of ``u`` padded per tap (the
    copy for tap ``(i, j)`` starts at ``(kh - 1 - i, kw - 1 - j)``) cropped to the output window, so the transpose
    slices where this pads."""
    kh, kw, cin, cout = w.shape
    (top, bottom), (left, right) = pads
    _, h, wd, _ = u.shape
    ho, wo = h + top + bottom - kh + 1, wd + left + right - kw + 1
    zero = jnp.zeros((), u.dtype)
    copies = [lax.pad(u, zero, ((0, 0, 0), (kh - 1 - i, i, 0), (kw - 1 - j, j, 0), (0, 0, 0)))
              for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(copies, axis=-1)[:, kh - 1 - top:kh - 1 - top + ho, kw - 1 - left:kw - 1 - left + wo]
    return jnp.einsum("nhwk,ko->nhwo", patches, w.reshape(kh * kw * cin, cout))


def _forward(x: Array, w: Array, pads: Pads) -> Array:
    return lax.platform_dependent(x, w, cpu=lambda a, b: loops.materialize(_shifted_sum(a, b, pads)),
                                  default=lambda a, b: _lax_conv(a, b, pads))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _few_channel_conv(x: Array, w: Array, pads: Pads) -> Array:
    return _forward(x, w, pads)


@functools.partial(_few_channel_conv.defjvp, symbolic_zeros=True)
def _few_channel_conv_jvp(pads, primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    y = _few_channel_conv(x, w, pads)  # itself again, so that higher derivatives take this rule too
    parts = []
    if not isinstance(dx, SymbolicZero):
        parts.append(lax.platform_dependent(dx, w, cpu=lambda a, b: _padded_patches_matmul(a, b, pads),
                                            default=lambda a, b: _lax_conv(a, b, pads)))
    if not isinstance(dw, SymbolicZero):
        parts.append(_lax_conv(x, dw, pads))
    return y, functools.reduce(lambda a, b: a + b, parts) if parts else jnp.zeros_like(y)


def conv_nhwc(x: Array, kernel: Array, strides: Sequence[int] = (1, 1), padding: Any = "SAME") -> Array:
    """``lax.conv_general_dilated`` on NHWC input with an HWIO kernel (Flax ``Conv``'s convention), on the CPU as a
    sum of shifted images when the kernel has few taps (:func:`uses_few_channel_path`; module docstring). The same
    values (to float rounding) and derivatives of every order either way. ``padding``: ``'SAME'``, ``'VALID'`` or
    ``((top, bottom), (left, right))``."""
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"conv_nhwc expects NHWC input and an HWIO kernel, got shapes {x.shape} and {kernel.shape}")
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"the input has {x.shape[-1]} channels but the kernel expects {kernel.shape[2]} input "
                         f"channels (kernel shape {kernel.shape}, HWIO)")
    strides = tuple(strides)
    if (uses_few_channel_path(x.shape, kernel.shape, strides, padding) and x.dtype == kernel.dtype
            and jnp.issubdtype(x.dtype, jnp.inexact)):
        return _few_channel_conv(x, kernel, _pads(x.shape, kernel.shape, strides, padding))
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Optional[Sequence[int]] = None, rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> Array:
    """``lax.conv_general_dilated``'s signature (what ``flax.linen.Conv(conv_general_dilated=...)`` calls): the
    plain NHWC / HWIO convolutions of :func:`conv_nhwc`'s path go there, everything else to ``lax`` unchanged."""
    plain = (lhs.ndim == 4 and rhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
             and precision is None and preferred_element_type is None
             and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and dimension_numbers is not None
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if plain and lhs.shape[-1] == rhs.shape[2]:
        return conv_nhwc(lhs, rhs, window_strides, padding)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                    precision=precision, preferred_element_type=preferred_element_type)
