"""Certified operator norms of convolutions and matrices: ``lower <= ||A||_2 <= upper``.

A convolution is a linear map on images of one shape, and its operator (spectral) norm ``||A||_2`` depends on
that shape, the strides and the zero padding. This module brackets it from both sides:

**Upper bound (certified), by the circular embedding** (Sedghi, Gupta & Long, ICLR 2019). Zero-pad each
spatial axis of the input to ``P = n + lo + hi`` (or crop, for negative padding). The stride-1 convolution of
the padded image is a restriction of the *circular* convolution on a ``P``-periodic grid: its outputs
``y[i] = sum_a K[a] x_pad[i + a]``, ``i <= P - k``, never wrap around. Restricting outputs, subsampling them
(a stride), zero-padding the input or inserting zeros between its samples (input dilation) are maps of norm
``<= 1``, so ``||A||_2 <= ||C_P||_2``. The circular convolution is diagonalised by the 2-D DFT: for each of
the ``P_1 x P_2`` frequencies ``f`` it acts on channels by the ``C_out x C_in`` matrix
``K_hat(f) = sum_a K[a] exp(-2 pi i <a, f / P>)``, hence ``||C_P||_2 = max_f sigma_max(K_hat(f))``.
We evaluate this in float64 NumPy on the host (FFT, then the largest eigenvalue of each frequency's smaller Gram
matrix, one row of frequencies at a time so memory stays ``O(P_2 C_in C_out)``), raise it by ``8 n eps_64`` for
the float64 eigenvalue error (``n`` the Gram size), and multiply by ``1 + margin`` with ``margin = 64 eps(dtype)``
of the kernel's dtype: it covers the float64 FFT rounding and a few units in the last place by which the kernel
the model applies under ``jit`` may differ from the one evaluated here. The bound is for
the exact linear map ``A``; the rounding of the convolution's own float32 arithmetic is not part of it.

**Lower side (an estimate from below)**: ``||A v|| / ||v||`` for a unit ``v`` is at most ``||A||`` for every
``v``; ``v`` is the real part of the top singular pair of the maximising frequency (the circular bound's
witness, restricted to the real image), refined by power iteration on ``A^T A`` with the exact transposed
convolution (``jax.linear_transpose``) in the kernel's dtype. It is exact up to that dtype's rounding of the
last quotient. ``upper / lower`` says how loose the certified value can be.

Dense layers (``dot_general`` with a constant matrix): ``sigma_max`` by a float64 SVD; lower = the SVD value,
upper = it times ``1 + margin``.

Example::

    import numpy as np
    from lcnn_jax.measures.operator_norms import conv_norm_bounds
    kernel = np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype(np.float32)     # HWIO
    nb = conv_norm_bounds(kernel, (7, 7, 2), strides=(1, 1), padding="SAME")
    assert nb.lower <= nb.upper                     # lower <= ||A||_2 <= upper

Cost: upper: ``P_1 P_2 / 2`` Hermitian eigenvalue problems of size ``min(C_in, C_out)`` (float64, host);
lower: ``num_iters`` convolutions and transposed convolutions on one image (compiled once per geometry).
The LCNN ResNet-18 on 32x32x3 (20 convolutions): about 20 s on one CPU core.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcnn_jax.types import PRNGKey

__all__ = ["NormBounds", "safety_margin", "conv_norm_bounds", "conv_general_norm_bounds", "matrix_norm_bounds",
           "circular_conv_norm"]


class NormBounds(NamedTuple):
    """``lower <= ||A||_2 <= upper`` (``upper`` certified; ``lower`` an estimate from below)."""

    lower: float
    upper: float

    @property
    def looseness(self) -> float:
        """``upper / lower`` (>= 1; ``inf`` if ``lower == 0 < upper``, 1 for the zero map)."""
        if self.upper == 0.0:
            return 1.0
        return self.upper / self.lower if self.lower > 0 else math.inf


def safety_margin(dtype: Any) -> float:
    """Relative margin ``64 eps(dtype)`` added to every certified norm (see the module docstring)."""
    return 64.0 * float(np.finfo(np.dtype(dtype)).eps)


def _top_singular_values(mats: np.ndarray) -> np.ndarray:
    """Largest singular value of each matrix of a stack ``(F, m, n)``, from the smaller Gram matrix.

    ``eigvalsh`` of ``M^H M`` (or ``M M^H``) is several times faster than an SVD; its float64 eigenvalues are
    exact for a Gram matrix perturbed by ``<= c n eps ||M||^2``, so the value is multiplied by
    ``1 + 8 n eps_64`` (:func:`_gram_margin`) to stay above ``sigma_max``.
    """
    if mats.shape[-1] <= mats.shape[-2]:
        gram = np.conj(np.swapaxes(mats, -1, -2)) @ mats
    else:
        gram = mats @ np.conj(np.swapaxes(mats, -1, -2))
    lam = np.linalg.eigvalsh(gram)[..., -1]
    return np.sqrt(np.maximum(lam, 0.0)) * (1.0 + _gram_margin(gram.shape[-1]))


def _gram_margin(n: int) -> float:
    return 8.0 * n * float(np.finfo(np.float64).eps)


def circular_conv_norm(kernel: np.ndarray, grid: Sequence[int]) -> tuple[float, tuple, np.ndarray]:
    """``max_f sigma_max(K_hat(f))``: the norm of the circular convolution by ``kernel`` on ``grid``.

    ``kernel`` has shape ``(k_1, ..., k_d, C_in, C_out)`` with ``k_i <= grid[i]``. Returns the norm (float64),
    the maximising frequency ``f`` and a unit ``u`` (``(C_in,)`` complex) such that the input
    ``exp(2 pi i <f, n / grid>) u`` attains it for the cross-correlation ``y[i] = sum_a K[a] x[i + a]`` that
    ``lax.conv_general_dilated`` computes (whose symbol is the complex conjugate of the DFT of ``K``).
    Frequencies ``f`` and ``-f`` give conjugate matrices, so the last axis uses the real FFT.
    """
    kernel = np.asarray(kernel, np.float64)
    d = kernel.ndim - 2
    grid = tuple(int(g) for g in grid)
    if len(grid) != d or any(k > g for k, g in zip(kernel.shape[:d], grid)):
        raise ValueError(f"grid {grid} must have {d} sizes, each >= the kernel's {kernel.shape[:d]}")
    # Real FFT over the first spatial axis (the kernel is real), then one first-axis frequency at a time
    # the full FFT over the others, so memory stays O(prod(grid[1:]) C_in C_out).
    first = np.fft.rfft(kernel, n=grid[0], axis=0)
    best, best_f, best_v = -1.0, None, None
    for f0 in range(first.shape[0]):
        k_hat = np.fft.fftn(first[f0], s=grid[1:], axes=tuple(range(d - 1))) if d > 1 else first[f0]
        mats = np.swapaxes(k_hat.reshape((-1,) + k_hat.shape[-2:]), -1, -2)  # C_out x C_in per frequency
        s = _top_singular_values(mats)
        j = int(np.argmax(s))
        if s[j] > best:
            rest = np.unravel_index(j, grid[1:]) if d > 1 else ()
            _, _, vh = np.linalg.svd(mats[j])  # the witness: one SVD at the best frequency so far
            best, best_f, best_v = float(s[j]), (f0,) + tuple(int(r) for r in rest), vh[0]
    return best, best_f, best_v


class _ConvGeometry(NamedTuple):
    strides: tuple
    padding: tuple
    lhs_dilation: tuple
    rhs_dilation: tuple
    feature_group_count: int


def _dilate(kernel: np.ndarray, rhs_dilation: Sequence[int]) -> np.ndarray:
    """Insert ``r - 1`` zeros between kernel taps along each spatial axis (the dilated kernel)."""
    d = len(rhs_dilation)
    shape = tuple((k - 1) * r + 1 for k, r in zip(kernel.shape[:d], rhs_dilation)) + kernel.shape[d:]
    out = np.zeros(shape, kernel.dtype)
    out[tuple(slice(None, None, r) for r in rhs_dilation)] = kernel
    return out


def _polyphase(kernel: np.ndarray, strides: Sequence[int]) -> np.ndarray:
    """The stride-1 kernel that acts on the polyphase components of the input.

    With ``a = s q + r`` (``0 <= r < s``), ``y[i] = sum_a K[a] x[s i + a] = sum_{q, r} K[s q + r] x_r[i + q]``
    where ``x_r[m] = x[s m + r]``: a stride-1 convolution with ``prod(s) C_in`` input channels (ordered
    ``(r_1, ..., r_d, c)``) and ``ceil(k / s)`` taps per axis. Splitting ``x`` into its components is a
    permutation (an isometry), so this map has exactly the strided convolution's norm.
    """
    d = len(strides)
    taps = [-(-k // st) for k, st in zip(kernel.shape[:d], strides)]
    padded = np.zeros(tuple(t * st for t, st in zip(taps, strides)) + kernel.shape[d:], kernel.dtype)
    padded[tuple(slice(0, k) for k in kernel.shape[:d])] = kernel
    split = padded.reshape(tuple(x for t, st in zip(taps, strides) for x in (t, st)) + kernel.shape[d:])
    order = tuple(range(0, 2 * d, 2)) + tuple(range(1, 2 * d, 2)) + (2 * d, 2 * d + 1)
    out = np.transpose(split, order)
    return out.reshape(tuple(taps) + (-1, kernel.shape[-1]))


def _upper(kernel_sp_io: np.ndarray, in_spatial: Sequence[int], geo: _ConvGeometry) -> tuple[float, Any, tuple]:
    """Certified norm (before the margin) of the convolution; also its witness ``(group, f, u)`` and grid.

    Pipeline of the map: input dilation (inserting zeros: an isometry) to ``n = (n_in - 1) l + 1`` samples,
    cropping for negative padding (norm <= 1), zero padding by ``(lo, hi)``, then the strided valid
    convolution ``y[i] = sum_a K[a] x_pad[s i + a]``, ``s i + a <= P - 1`` with ``P = n + lo + hi``. On a
    circular grid of ``N >= max(n + max(lo, hi), k)`` samples holding the image at ``[lo, lo + n)``, an index
    ``s i + a >= N`` wraps to ``s i + a - N <= lo + n + hi - 1 - N < lo``, i.e. onto padding zeros, so the
    valid outputs are a restriction of the circular convolution's. With ``N`` a multiple of ``s`` the
    circular strided convolution is the stride-1 circular convolution of the polyphase components
    (:func:`_polyphase`) on ``N / s`` samples, whose norm the DFT gives exactly.
    """
    kernel = _dilate(kernel_sp_io, geo.rhs_dilation)
    d = len(in_spatial)
    grid = []
    for n_in, ld, (lo, hi), k, st in zip(in_spatial, geo.lhs_dilation, geo.padding, kernel.shape[:d], geo.strides):
        n = (n_in - 1) * ld + 1 + min(lo, 0) + min(hi, 0)
        lo, hi = max(lo, 0), max(hi, 0)
        if n <= 0 or n + lo + hi < k:
            return 0.0, None, ()  # nothing left of the image, or no output: the zero map
        big = max(n + max(lo, hi), k)
        grid.append(-(-big // st))
    grid = tuple(grid)
    g_count = geo.feature_group_count
    cout_g = kernel.shape[-1] // g_count
    best, witness = 0.0, None
    for g in range(g_count):  # block diagonal over feature groups
        norm, f, u = circular_conv_norm(_polyphase(kernel[..., g * cout_g:(g + 1) * cout_g], geo.strides), grid)
        if norm > best:
            best, witness = norm, (g, f, u)
    return best, witness, grid


def _to_sp_io(kernel: np.ndarray, rhs_spec: Sequence[int]) -> np.ndarray:
    """Rearrange a kernel with ``rhs_spec = (out, in, *spatial)`` dimension indices to ``(*spatial, in, out)``."""
    return np.transpose(kernel, tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0]))


def _witness_image(witness, grid, lhs_shape, lhs_spec, geo: _ConvGeometry, cin_g: int) -> np.ndarray:
    """A real input image near the circular bound's maximiser (a start for power iteration); batch size 1."""
    out = np.zeros(lhs_shape, np.float64)
    if witness is None:
        return out + 1.0
    g, f, u = witness
    d = len(grid)
    spatial = [lhs_shape[i] for i in lhs_spec[2:]]
    u = u.reshape(tuple(geo.strides) + (cin_g,))  # polyphase channels (r_1, ..., r_d, c)
    img = np.zeros(tuple(spatial) + (cin_g,), np.complex128)
    for idx in np.ndindex(*spatial):
        pos = [n * ld + lo for n, ld, (lo, _) in zip(idx, geo.lhs_dilation, geo.padding)]
        if any(p < 0 or p >= gi * st for p, gi, st in zip(pos, grid, geo.strides)):
            continue  # cropped away by negative padding
        m = [p // st for p, st in zip(pos, geo.strides)]
        r = tuple(p % st for p, st in zip(pos, geo.strides))
        img[idx] = np.exp(2j * np.pi * sum(fi * mi / gi for fi, mi, gi in zip(f, m, grid))) * u[r]
    real = np.real(img) if np.any(np.real(img)) else np.imag(img)
    channels = np.zeros(tuple(spatial) + (lhs_shape[lhs_spec[1]],))
    channels[..., g * cin_g:(g + 1) * cin_g] = real
    order = (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],)
    np.moveaxis(out, order, range(len(order)))[0] = channels
    return out


@functools.partial(jax.jit, static_argnames=("params", "num_iters"))
def _power_lower(kernel, v0, *, params: tuple, num_iters: int):
    """``||A v|| / ||v||`` after ``num_iters`` power iterations on ``A^T A`` from ``v0`` (estimate from below)."""
    kw = dict(params)

    def op(v):
        return lax.conv_general_dilated(v, kernel, **kw)

    transpose = jax.linear_transpose(op, jax.ShapeDtypeStruct(v0.shape, v0.dtype))

    def body(_, v):
        (w,) = transpose(op(v))
        n = jnp.sqrt(jnp.sum(jnp.square(w)))
        return jnp.where(n > 0, w / jnp.where(n > 0, n, 1.0), v)

    v = lax.fori_loop(0, num_iters, body, v0 / jnp.sqrt(jnp.sum(jnp.square(v0))))
    return jnp.sqrt(jnp.sum(jnp.square(op(v)))) / jnp.sqrt(jnp.sum(jnp.square(v)))


def conv_general_norm_bounds(kernel: Any, lhs_shape: Sequence[int], *, window_strides: Sequence[int],
                             padding: Sequence[tuple], lhs_dilation: Sequence[int] | None = None,
                             rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                             feature_group_count: int = 1, batch_group_count: int = 1, key: PRNGKey | None = None,
                             num_iters: int = 30, **unused: Any) -> NormBounds:
    """Bounds on ``||v -> lax.conv_general_dilated(v, kernel, ...)||_2`` for inputs of shape ``lhs_shape``.

    Takes the keyword parameters of ``lax.conv_general_dilated`` as they appear in a jaxpr (explicit
    ``padding`` pairs, ``ConvDimensionNumbers``); ``precision``/``preferred_element_type`` are ignored. The
    batch axis of ``lhs_shape`` is irrelevant (the map acts on each example alike). ``key`` perturbs the
    power-iteration start (``None``: no perturbation); ``num_iters`` power iterations for the lower side
    (0: the quotient of the circular bound's witness image alone).
    """
    if not isinstance(num_iters, int) or num_iters < 0:
        raise ValueError(f"num_iters must be a non-negative int, got {num_iters!r}")
    del unused
    if batch_group_count != 1:
        raise ValueError("operator-norm bounds support batch_group_count == 1 only (a convolution's transpose "
                         "with respect to its kernel, not a layer)")
    kernel = jnp.asarray(kernel)
    nd = kernel.ndim - 2
    if dimension_numbers is None:
        dimension_numbers = lax.conv_dimension_numbers(tuple(lhs_shape), kernel.shape, None)
    elif not isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        dimension_numbers = lax.conv_dimension_numbers(tuple(lhs_shape), kernel.shape, dimension_numbers)
    lhs_spec, rhs_spec, _ = dimension_numbers
    if isinstance(padding, str):
        raise ValueError("pass explicit padding pairs (as in a jaxpr), or use conv_norm_bounds for 'SAME'/'VALID'")
    geo = _ConvGeometry(tuple(window_strides), tuple(tuple(int(p) for p in pair) for pair in padding),
                        tuple(lhs_dilation or (1,) * nd), tuple(rhs_dilation or (1,) * nd), int(feature_group_count))
    k_np = _to_sp_io(np.asarray(kernel, np.float64), rhs_spec)
    in_spatial = [lhs_shape[i] for i in lhs_spec[2:]]
    raw, witness, grid = _upper(k_np, in_spatial, geo)
    upper = raw * (1.0 + safety_margin(kernel.dtype))
    if raw == 0.0:
        return NormBounds(0.0, 0.0)
    shape1 = list(lhs_shape)
    shape1[lhs_spec[0]] = 1
    v0 = _witness_image(witness, grid, tuple(shape1), lhs_spec, geo, k_np.shape[nd])
    if not np.any(v0):
        v0 = np.ones_like(v0)
    if key is not None:
        noise = np.asarray(jax.random.normal(key, tuple(shape1), jnp.float32), np.float64)
        v0 = v0 / np.linalg.norm(v0) + 1e-2 * noise / np.linalg.norm(noise)
    params = (("window_strides", geo.strides), ("padding", geo.padding), ("lhs_dilation", geo.lhs_dilation),
              ("rhs_dilation", geo.rhs_dilation), ("dimension_numbers", dimension_numbers),
              ("feature_group_count", geo.feature_group_count))
    v0 = jnp.asarray(v0, kernel.dtype)
    if num_iters == 0:  # the witness alone: one convolution, no compiled loop
        out = np.asarray(lax.conv_general_dilated(v0, kernel, **dict(params)), np.float64)
        lower = float(np.linalg.norm(out) / np.linalg.norm(np.asarray(v0, np.float64)))
    else:
        lower = float(_power_lower(kernel, v0, params=params, num_iters=int(num_iters)))
    return NormBounds(min(lower, upper), upper)


def conv_norm_bounds(kernel: Any, image_shape: Sequence[int], *, strides: Sequence[int] = (1, 1),
                     padding: Any = "SAME", key: PRNGKey | None = None, num_iters: int = 30) -> NormBounds:
    """Bounds on the operator norm of an NHWC/HWIO convolution (Flax ``Conv``'s layout) on ``image_shape``.

    ``image_shape = (H, W, C_in)`` (one example); ``padding`` ``'SAME'``, ``'VALID'`` or explicit pairs.
    """
    kernel = jnp.asarray(kernel)
    lhs_shape = (1,) + tuple(int(s) for s in image_shape)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs_shape[1:-1], kernel.shape[:-2], tuple(strides), padding)
    dn = lax.conv_dimension_numbers(lhs_shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    return conv_general_norm_bounds(kernel, lhs_shape, window_strides=tuple(strides), padding=tuple(padding),
                                    dimension_numbers=dn, key=key, num_iters=num_iters)


def matrix_norm_bounds(matrix: Any) -> NormBounds:
    """``sigma_max`` of a matrix (float64 SVD on the host); ``upper`` adds the dtype's safety margin.

    A stack ``(B, m, n)`` (a block-diagonal map) gives the largest ``sigma_max`` over the blocks.
    """
    m = np.asarray(matrix)
    dtype = m.dtype if np.issubdtype(m.dtype, np.floating) else np.float32
    m = m.astype(np.float64)
    if m.size == 0:
        return NormBounds(0.0, 0.0)
    if m.ndim == 2:
        m = m[None]
    # sigma_max from the smaller Gram matrix would square the condition; the SVD of a thin matrix is cheap.
    s = float(np.max(np.linalg.svd(m, compute_uv=False)[:, 0]))
    return NormBounds(s, s * (1.0 + safety_margin(dtype)))
