"""Certified, data-independent bounds on the slope and curvature of a network's outputs (LCNN, SPEC 1.1).

For a twice-differentiable map ``f`` let ``L_f = sup_x ||Df(x)||_2`` (its Lipschitz constant) and
``K_f = sup_{x != y} ||Df(x) - Df(y)||_2 / ||x - y||`` (the Lipschitz constant of its derivative); for a scalar
``f``, ``K_f`` bounds the spectral norm of the input Hessian everywhere. A :class:`Bound` ``(L, K)`` obeys a
small algebra:

* composition ``f . g``:  ``L = L_f L_g``,  ``K = K_f L_g^2 + L_f K_g``  (chain rule for ``D^2``),
* sum ``f + g`` (residual branches): ``L = L_f + L_g``,  ``K = K_f + K_g``,
* scalar multiple ``c f``: both scale by ``|c|``; a linear map has ``K = 0``.

Unrolled over a chain this is SPEC's ``K <= sum_i K_i prod_{j<i} L_j^2 prod_{j>i} L_j``.

How a model is bounded
----------------------
:func:`curvature_bound` (a Flax module and its variables) and :func:`function_bound` (any function of one
input) trace the computation with ``jax.make_jaxpr``, the parameters as concrete constants, and interpret
the traced program: every value that depends on the input carries a :class:`Bound` of the map from the
input to it; everything computed from parameters alone (a spectral layer's ``sigma``, batch-norm scales) is
evaluated exactly as the model computes it. So any model built from supported operations is bounded,
whatever its Python structure (residual blocks, custom modules), and nothing relies on a list of
architectures. Rules per operation (``u`` = the input's bound):

* convolution with a constant kernel: ``L *= ||A_W||_2``, certified from above by the circular-embedding
  bound of :mod:`lcnn_jax.measures.operator_norms` (with a power-iteration value from below);
* ``dot_general`` with a constant matrix (dense layers): ``L *= sigma_max`` (float64 SVD);
* elementwise multiplication/division by constants (batch norm in eval mode, ``x / sqrt 2``, the
  ``1/sigma`` of spectral layers, average pooling's ``1/count``): the scales of a chain of such operations in
  one module are multiplied first and bounded by their largest magnitude; adding constants changes nothing;
* sums of two input-dependent values: slopes and curvatures add; concatenation: ``L = sqrt(sum L_i^2)``;
* ``reduce_sum``/``broadcast_in_dim``: ``sqrt`` of the number of summed/duplicated entries;
  ``reduce_window_sum`` (pooling): ``sqrt(prod w * prod ceil(w / s))`` (rows times columns of its 0/1 matrix);
* smooth elementwise activations ``(L, K)``: centred softplus and softplus ``(1, 1/4)`` in ``b x`` (so
  ``(1, b/4)`` with their scales), logistic ``(1/4, 1/(6 sqrt3))``, tanh ``(1, 4/(3 sqrt3))``, silu
  ``(1.1, 1/2)``, sin/cos ``(1, 1)``;
* piecewise-linear maps (ReLU, max, max pooling ``L = sqrt(prod ceil(w / s))``, abs): ``K = inf`` -- their
  derivative jumps -- unless ``almost_everywhere=True``, which bounds the Hessian wherever it exists (``K = 0``
  for them, and the result says so);
* reshapes, transposes, slices, padding with constants, type conversions: ``L`` unchanged.

An operation without a rule (a product of two input-dependent values, ``exp``, a comparison of the input)
raises ``ValueError`` naming it and the module it came from.

Per output: the affine part after the last nonlinearity (typically the head ``h -> W^T h + b``) is bounded
row by row: ``output_k`` gets ``L_k = ||w_k|| L_h`` and ``K_k = ||w_k|| K_h`` (``|w_k^T D^2 h[u, u]| <=
||w_k|| ||D^2 h[u, u]||``), with ``||w_k||`` in float64.

Rounding: the norms are computed in float64 on the host and each certified factor is multiplied by
``1 + 64 eps`` of its dtype (:func:`~lcnn_jax.measures.operator_norms.safety_margin`), which covers the float64
errors and the few units in the last place by which constants computed under ``jit`` may differ from the
eager evaluation here. The bound is for the exact real-number function the model's parameters define; the
rounding of the model's own float32 arithmetic on an input is not part of it.

Example::

    import jax, jax.numpy as jnp
    from lcnn_jax.nn import make_lcnn_model
    from lcnn_jax.measures.bounds import curvature_bound
    net = make_lcnn_model("small_cnn", 10, width_mult=0.125)
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 1)))
    res = curvature_bound(net, variables, (12, 12, 1), key=jax.random.PRNGKey(1))
    res.curvature          # (10,): sup_x ||d^2 logit_k / dx^2||_2 <= res.curvature[k], model in eval mode
    dict(res.layers)       # per-module Bound(lipschitz, curvature)

Cost: one trace of the model; per convolution ``P_1 P_2 / 2`` small float64 SVDs (host) for the upper side
and ``num_iters`` convolutions and transposed convolutions on one image for the lower side; one SVD per dense
layer. Independent of any data.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from lcnn_jax.measures.operator_norms import (
    NormBounds,
    conv_general_norm_bounds,
    matrix_norm_bounds,
    safety_margin,
)
from lcnn_jax.types import Array, PRNGKey

__all__ = ["Bound", "IDENTITY", "linear", "compose", "chain", "add", "scale", "Factor", "CurvatureBound",
           "curvature_bound", "function_bound", "layer_bound", "ACTIVATION_BOUNDS"]


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
# Elementwise nonlinearities: (sup |s'|, sup |s''|) over the real line
# --------------------------------------------------------------------------------------------
_PL = "piecewise-linear"
#: ``(L, K)`` of the smooth elementwise functions the interpreter knows, by primitive or jitted-function name.
#: Proofs: softplus' = sigmoid in (0, 1), softplus'' = sigmoid' <= 1/4 (also for ``log((1 + e^z)/2)``, the
#: centred softplus before its ``1/b``, and ``logaddexp(z, c)`` in ``z``; ``log_sigmoid(z) = -softplus(-z)``);
#: sigmoid' <= 1/4 and |sigmoid''| <= 1/(6 sqrt3) (at ``sigmoid = (3 +- sqrt3)/6``); tanh' <= 1 and
#: |tanh''| <= 4/(3 sqrt3) (at ``tanh = 1/sqrt3``); silu' = s(1 + z(1 - s)) <= 1.0999 and
#: silu'' = s(1 - s)(2 + z(1 - 2s)), largest in magnitude at 0 (1/2) (checked on a fine grid in the tests).
ACTIVATION_BOUNDS = {
    "softplus": (1.0, 0.25),
    "_log_half_one_plus_exp": (1.0, 0.25),
    "logaddexp": (1.0, 0.25),
    "log_sigmoid": (1.0, 0.25),
    "logistic": (0.25, 1.0 / (6.0 * math.sqrt(3.0))),
    "tanh": (1.0, 4.0 / (3.0 * math.sqrt(3.0))),
    "silu": (1.1, 0.5),
    "swish": (1.1, 0.5),
    "sin": (1.0, 1.0),
    "cos": (1.0, 1.0),
    "relu": (1.0, _PL),
    # lcnn_jax.nn.lipschitz.minmax_pairs: (a, b) -> (max(a, b), min(a, b)) per channel pair permutes coordinates
    # pairwise at every input, so ||Df|| = 1 wherever it exists and f is 1-Lipschitz (not elementwise, but the
    # rule only uses the slope); piecewise linear
    "minmax_pairs": (1.0, _PL),
    "relu6": (1.0, _PL),
    "abs": (1.0, _PL),
}
# jitted wrappers whose body the interpreter can walk by itself (no entry needed): sigmoid -> logistic, ...
_FRIENDLY = {"_log_half_one_plus_exp": "centered_softplus"}
_PASS_THROUGH = ("convert_element_type", "copy", "copy_p", "reduce_precision", "stop_gradient",
                 "optimization_barrier")
_STRUCTURAL = ("reshape", "squeeze", "expand_dims", "transpose", "rev", "slice", "dynamic_slice")
_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
          "remat", "checkpoint", "custom_lin")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
class Factor(NamedTuple):
    """One factor of the bound, in forward order.

    path: the module path it came from (``"stage2_block0/conv1"``; ``""`` = the model's own code).
    op: ``conv``, ``dense``, ``scale`` (elementwise constants), ``sum`` (reduce_sum), ``pool_sum``,
      ``max_pool``, ``broadcast``, ``concatenate`` or the activation's name.
    lower, upper: ``lower <= slope <= upper``; ``upper`` is what the bound uses (certified), ``lower`` an
      estimate from below (power iteration for convolutions; the same value where it is exact).
    curvature: ``K`` of an elementwise nonlinearity (0 for linear factors).
    """

    path: str
    op: str
    lower: float
    upper: float
    curvature: float

    @property
    def looseness(self) -> float:
        """``upper / lower`` of the slope (1 where the factor is known exactly)."""
        return NormBounds(self.lower, self.upper).looseness


class CurvatureBound(NamedTuple):
    """Result of :func:`curvature_bound` / :func:`function_bound`.

    curvature: ``(num_outputs,)``; ``||D^2 output_k (x)||_2 <= curvature[k]`` for every input ``x``.
    lipschitz: ``(num_outputs,)``; ``||grad output_k (x)|| <= lipschitz[k]``.
    network: the :class:`Bound` of the whole output vector.
    layers: ``((path, Bound), ...)``: for every innermost module, the composition of its factors in order
      (e.g. a spectral conv's ``||A_W|| / sigma``, a Lipschitz BN's ``min(1/s, gamma)``, a centred
      softplus's ``(1, b/4)``).
    factors: every :class:`Factor`, in forward order (including the model's own pooling, sums, scalings).
    curvature_terms: ``((path, value), ...)``: each nonlinearity's share of ``network.curvature`` (its
      ``K_i`` times the slopes before (squared) and after it); they sum to ``network.curvature``.
    almost_everywhere: True if piecewise-linear operations were counted with ``K = 0`` (the bound then
      holds wherever the output is twice differentiable).
    head_input: the :class:`Bound` of the map from the input to the head's input ``h`` (the output of the last
      nonlinearity, where the final affine segment ``h -> A h + c`` starts; the input itself for an affine
      function); None when the output is not an affine function of such a value.
    pairwise_lipschitz, pairwise_curvature: ``(num_outputs, num_outputs)`` bounds for the differences
      ``output_i - output_j`` (what a margin certificate needs): ``||a_i - a_j|| * head_input`` (``a_k`` the
      rows of the exact head map ``A``, in float64) where the head ends in a dense layer followed only by
      constant scalings, additions and reshapes, never above ``L_i + L_j`` nor ``sqrt(2)`` times the
      network's bound; zero diagonal. None when the head is not of that form or has more than
      ``PAIRWISE_MAX_OUTPUTS`` outputs.
    """

    curvature: Array
    lipschitz: Array
    network: Bound
    layers: tuple
    factors: tuple
    curvature_terms: tuple
    almost_everywhere: bool
    head_input: Any = None
    pairwise_lipschitz: Any = None
    pairwise_curvature: Any = None


#: The largest number of outputs for which :func:`function_bound` computes the pairwise difference bounds.
PAIRWISE_MAX_OUTPUTS = 4096


# --------------------------------------------------------------------------------------------
# The interpreter
# --------------------------------------------------------------------------------------------
def _mul(a: float, b: float) -> float:
    """``a * b`` with ``0 * inf = 0`` (a constant map after a kink has no curvature)."""
    return 0.0 if a == 0.0 or b == 0.0 else a * b


@dataclasses.dataclass
class _Sym:
    """An input-dependent value: ``value = diag * base + const`` where ``x -> base`` has slope ``lip`` and
    curvature ``sum(curv.values())`` (contributions per nonlinearity site).

    ``anchor``: the value where the current affine segment starts (the input or a nonlinearity's output);
    ``seg``: a certified bound on the norm of the affine map ``anchor -> value``; ``rows``: per element, a
    bound on the gradient norm of that element with respect to ``anchor`` (``None``: ``seg`` for all).
    ``head``: ``(mat, scale, seg_in)`` when the value (flattened) is ``mat.T @ u * scale + const`` with ``u`` a
    value whose map from ``anchor`` has norm ``<= seg_in`` (a dense layer, then constant scalings), else None.
    """

    shape: tuple
    dtype: Any
    lip: float
    curv: dict
    diag: Any = None
    diag_path: str = ""
    anchor: Any = None
    seg: float = 1.0
    rows: Any = None
    head: Any = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Interpreter:
    def __init__(self, key: PRNGKey | None, num_iters: int, almost_everywhere: bool, strip_prefix: str = "",
                 side: str = "upper"):
        self.key, self.num_iters, self.ae = key, num_iters, almost_everywhere
        self.strip, self.side = strip_prefix, side
        self.factors: list[Factor] = []
        self.count = 0
        self.sites: dict = {}

    # ---- bookkeeping -------------------------------------------------------------------------
    def record(self, path, op, lower, upper, curvature=0.0):
        self.factors.append(Factor(path, op, float(lower), float(upper), float(curvature)))

    def site_key(self, base: str) -> str:
        """A unique name per nonlinearity call site: ``act1/centered_softplus``, ``tanh``, ``tanh#2``."""
        self.sites[base] = self.sites.get(base, 0) + 1
        n = self.sites[base]
        return base if n == 1 else f"{base}#{n}"

    def next_key(self):
        self.count += 1
        return None if self.key is None else jax.random.fold_in(self.key, self.count)

    def materialize(self, s: _Sym) -> _Sym:
        """Apply a pending elementwise scale: the slope grows by ``max |diag|``."""
        if s.diag is None:
            return s
        mags = np.abs(s.diag)
        m = float(np.max(mags)) if mags.size else 0.0
        up = m * (1.0 + safety_margin(s.dtype))
        self.record(s.diag_path, "scale", m, up)
        up = up if self.side == "upper" else m
        rows = None
        if s.anchor is not None:
            base = s.seg if s.rows is None else s.rows
            rows = np.broadcast_to(base * mags * (1.0 + safety_margin(s.dtype)), s.shape)
        head = None
        if s.head is not None:
            mat, col_scale, seg_in = s.head
            head = (mat, col_scale * np.broadcast_to(np.asarray(s.diag, np.float64), s.shape).reshape(-1), seg_in)
        return dataclasses.replace(s, lip=_mul(up, s.lip), curv={k: _mul(up, v) for k, v in s.curv.items()},
                                   diag=None, seg=_mul(up, s.seg), rows=rows, head=head)

    def linear_map(self, s: _Sym, out_shape, out_dtype, up: float, path: str, op: str, lower: float,
                   rows=None, keep_rows=False) -> _Sym:
        """A linear map of certified norm ``up`` applied to ``s`` (already materialised)."""
        self.record(path, op, lower, up)
        up = up if self.side == "upper" else lower
        new_rows = None
        if s.anchor is not None:
            if keep_rows:
                new_rows = s.rows
            elif rows is not None:
                new_rows = rows
        return _Sym(tuple(out_shape), out_dtype, _mul(up, s.lip), {k: _mul(up, v) for k, v in s.curv.items()},
                    anchor=s.anchor, seg=_mul(up, s.seg), rows=new_rows)

    def nonlinear(self, s: _Sym, lk: tuple, path: str, name: str, out_aval) -> _Sym:
        """An elementwise function with ``|f'| <= L``, ``|f''| <= K``: ``K_out = K L_in^2 + L K_in``."""
        s = self.materialize(s)
        lip_f, curv_f = lk
        if curv_f == _PL:
            curv_f = 0.0 if self.ae else math.inf
        name = _FRIENDLY.get(name, name)
        self.record(path, name, lip_f, lip_f, curv_f)
        curv = {k: _mul(lip_f, v) for k, v in s.curv.items()}
        site = self.site_key(_join(path, name))
        curv[site] = _mul(curv_f, s.lip ** 2)
        out = _Sym(tuple(out_aval.shape), out_aval.dtype, _mul(lip_f, s.lip), curv)
        out.anchor = out
        return out

    # ---- the walk ----------------------------------------------------------------------------
    def run(self, jaxpr, consts, args, prefix: str = ""):
        env: dict = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                return v.val
            return env[v]

        for var, val in zip(jaxpr.constvars, consts):
            env[var] = val
        for var, val in zip(jaxpr.invars, args):
            env[var] = val
        for eqn in jaxpr.eqns:
            vals = [read(v) for v in eqn.invars]
            path = _join(prefix, str(eqn.source_info.name_stack))
            if self.strip and not prefix:
                path = path[len(self.strip) + 1:] if path.startswith(self.strip + "/") else (
                    "" if path == self.strip else path)
            if not any(isinstance(v, _Sym) for v in vals):
                outs = _eval_eqn(eqn, vals)
            else:
                outs = self.apply(eqn, vals, path)
            for var, val in zip(eqn.outvars, outs):
                env[var] = val
        return [read(v) for v in jaxpr.outvars]

    def apply(self, eqn, vals, path) -> list:
        name = eqn.primitive.name
        sym_idx = [i for i, v in enumerate(vals) if isinstance(v, _Sym)]
        outs = eqn.outvars
        out_aval = outs[0].aval
        if len(outs) == 1 and not jnp.issubdtype(out_aval.dtype, jnp.floating):
            raise _unsupported(name, path, "it turns the input into a non-float value (a comparison or an "
                                           "index): the output is then not a smooth function of the input")
        if name in _CALLS:
            return self.call(eqn, vals, path)
        if name == "cond" and "branches_platforms" in eqn.params:
            # lax.platform_dependent: every branch computes the same function (a faster form for one backend, as
            # lcnn_jax.nn.conv and loops.materialize use it), so the bound is read from the portable default one
            default = [b for b, p in zip(eqn.params["branches"], eqn.params["branches_platforms"]) if p is None]
            if not default:
                raise _unsupported(name, path, "a platform-dependent branch without a default cannot be read")
            return self.run(default[0].jaxpr, default[0].consts, vals[1:], prefix=path)
        # elementwise-scale folding: these keep a pending diagonal, within one module
        s = vals[sym_idx[0]]
        if s.diag is not None and (s.diag_path != path):
            vals = list(vals)
            vals[sym_idx[0]] = s = self.materialize(s)
        if name in _PASS_THROUGH:
            return [dataclasses.replace(s, shape=tuple(out_aval.shape), dtype=out_aval.dtype)]
        if name == "neg":
            return [s]
        if name in ("add", "sub", "add_any"):
            if len(sym_idx) == 1:  # adding a constant: affine
                return [self.broadcast_if_needed(s, out_aval, path)]
            return [self.sum(vals[0], vals[1], out_aval, path)]
        if name in ("mul", "div"):
            if len(sym_idx) == 2:
                raise _unsupported(name, path, "it multiplies two input-dependent values")
            if name == "div" and sym_idx[0] != 0:
                raise _unsupported(name, path, "it divides by an input-dependent value")
            c = np.asarray(vals[1 - sym_idx[0]], np.float64)
            if name == "div":
                c = 1.0 / c
            s = self.broadcast_if_needed(s, out_aval, path)
            diag = c if s.diag is None else s.diag * c
            return [dataclasses.replace(s, diag=np.asarray(diag, np.float64), diag_path=path)]
        vals = [self.materialize(v) if isinstance(v, _Sym) else v for v in vals]
        s = vals[sym_idx[0]]
        if name in _STRUCTURAL:
            rows = None
            if s.rows is not None:
                rows = _move_rows(name, s.rows, eqn.params, out_aval.shape)
            head = s.head if name in ("reshape", "squeeze", "expand_dims") else None
            return [dataclasses.replace(s, shape=tuple(out_aval.shape), dtype=out_aval.dtype, rows=rows,
                                        head=head)]
        if name == "pad":
            if len(sym_idx) != 1 or sym_idx[0] != 0:
                raise _unsupported(name, path, "its padding value depends on the input")
            return [dataclasses.replace(s, shape=tuple(out_aval.shape), rows=None, head=None)]
        if name == "broadcast_in_dim":
            return [self.broadcast_if_needed(s, out_aval, path)]
        if name == "reduce_sum":
            n = s.size // max(1, int(np.prod(out_aval.shape, dtype=np.int64)))
            return [self.linear_map(s, out_aval.shape, out_aval.dtype, math.sqrt(n), path, "sum", math.sqrt(n))]
        if name == "reduce_window_sum":
            return [self.window(s, eqn.params, out_aval, path, pool="sum")]
        if name == "reduce_window_max" or name == "reduce_window_min":
            return [self.window(s, eqn.params, out_aval, path, pool="max")]
        if name in ("reduce_max", "reduce_min"):
            return [self.nonlinear(s, (1.0, _PL), path, name, out_aval)]
        if name in ("max", "min"):
            if len(sym_idx) == 2:
                a, b = vals
                lip = math.sqrt(a.lip ** 2 + b.lip ** 2)
                both = dataclasses.replace(self.sum(a, b, out_aval, path), lip=lip, anchor=None)
                return [self.nonlinear(both, (1.0, _PL), path, name, out_aval)]
            return [self.nonlinear(s, (1.0, _PL), path, name, out_aval)]
        if name == "select_n":
            if 0 in sym_idx:
                raise _unsupported(name, path, "it selects by a condition on the input (piecewise)")
            syms = [v for v in vals[1:] if isinstance(v, _Sym)]
            out = syms[0]
            for other in syms[1:]:
                out = self.sum(out, other, out_aval, path)
            return [dataclasses.replace(out, shape=tuple(out_aval.shape), rows=None, anchor=None, head=None)]
        if name == "concatenate":
            syms = [v for v in vals if isinstance(v, _Sym)]
            lip = math.sqrt(sum(v.lip ** 2 for v in syms))
            curv: dict = {}
            for v in syms:
                for k, c in v.curv.items():
                    curv[k] = curv.get(k, 0.0) + c
            self.record(path, "concatenate", 1.0, 1.0)
            return [_Sym(tuple(out_aval.shape), out_aval.dtype, lip, curv)]
        if name == "dot_general":
            return [self.dot(eqn, vals, sym_idx, out_aval, path)]
        if name == "conv_general_dilated":
            if sym_idx != [0]:
                raise _unsupported(name, path, "its kernel depends on the input")
            kernel = vals[1]
            nb = conv_general_norm_bounds(kernel, s.shape, key=self.next_key(), num_iters=self.num_iters,
                                          **eqn.params)
            return [self.linear_map(s, out_aval.shape, out_aval.dtype, nb.upper, path, "conv", nb.lower)]
        if name in ACTIVATION_BOUNDS:
            return [self.nonlinear(s, ACTIVATION_BOUNDS[name], path, name, out_aval)]
        raise _unsupported(name, path, "no bound rule is known for it")

    def call(self, eqn, vals, path):
        """Higher-order primitives: a named smooth activation, or walk into the body."""
        fname = _call_name(eqn)
        sym_idx = [i for i, v in enumerate(vals) if isinstance(v, _Sym)]
        if fname in ACTIVATION_BOUNDS and len(eqn.outvars) == 1:
            if len(sym_idx) != 1:
                raise _unsupported(fname, path, "it is applied to several input-dependent values")
            return [self.nonlinear(vals[sym_idx[0]], ACTIVATION_BOUNDS[fname], path, fname, eqn.outvars[0].aval)]
        closed = _call_jaxpr(eqn)
        if closed is None:
            raise _unsupported(eqn.primitive.name, path, "its body could not be read")
        return self.run(closed.jaxpr, closed.consts, vals, prefix=path)

    def sum(self, a: _Sym, b: _Sym, out_aval, path) -> _Sym:
        a, b = self.materialize(a), self.materialize(b)
        curv = dict(a.curv)
        for k, v in b.curv.items():
            curv[k] = curv.get(k, 0.0) + v
        out = _Sym(tuple(out_aval.shape), out_aval.dtype, a.lip + b.lip, curv)
        if a.anchor is not None and a.anchor is b.anchor:
            ra = a.seg if a.rows is None else a.rows
            rb = b.seg if b.rows is None else b.rows
            rows = None if (a.rows is None and b.rows is None) else np.broadcast_to(ra + rb, out.shape)
            out.anchor, out.seg, out.rows = a.anchor, a.seg + b.seg, rows
        return out

    def broadcast_if_needed(self, s: _Sym, out_aval, path) -> _Sym:
        n_out = int(np.prod(out_aval.shape, dtype=np.int64))
        if n_out == s.size:
            return dataclasses.replace(s, shape=tuple(out_aval.shape)) if s.diag is None else s
        s = self.materialize(s)
        factor = math.sqrt(n_out / max(1, s.size))  # each entry duplicated n_out / n_in times
        return self.linear_map(s, out_aval.shape, out_aval.dtype, factor, path, "broadcast", factor)

    def window(self, s: _Sym, params, out_aval, path, pool: str) -> _Sym:
        dims, strides = params["window_dimensions"], params["window_strides"]
        wdil = params.get("window_dilation") or (1,) * len(dims)
        if any(d != 1 for d in (params.get("base_dilation") or ())):
            raise _unsupported(f"reduce_window_{pool}", path, "base dilation is not supported")
        extent = [(w - 1) * d + 1 for w, d in zip(dims, wdil)]
        per_input = math.prod(-(-e // st) for e, st in zip(extent, strides))  # windows covering one input
        if pool == "sum":  # ||A||_2 <= sqrt(||A||_1 ||A||_inf) for the 0/1 window matrix
            f = math.sqrt(per_input * math.prod(dims))
            return self.linear_map(s, out_aval.shape, out_aval.dtype, f, path, "pool_sum",
                                   math.sqrt(math.prod(dims)) if per_input == 1 else 1.0)
        # |max over a window of (a - b)| <= the window's l2 norm of a - b; each input in <= per_input windows
        return self.nonlinear(s, (math.sqrt(per_input), _PL), path, "max_pool", out_aval)

    def dot(self, eqn, vals, sym_idx, out_aval, path) -> _Sym:
        if len(sym_idx) != 1:
            raise _unsupported("dot_general", path, "it multiplies two input-dependent values")
        (contract, batch) = eqn.params["dimension_numbers"]
        if batch[0] or batch[1]:
            raise _unsupported("dot_general", path, "batched matrix products are not supported")
        i = sym_idx[0]
        s, m = vals[i], np.asarray(vals[1 - i])
        m_contract = contract[1 - i]
        free = [d for d in range(m.ndim) if d not in m_contract]
        mat = np.transpose(m, tuple(m_contract) + tuple(free)).reshape(
            int(np.prod([m.shape[d] for d in m_contract], dtype=np.int64)), -1)
        nb = matrix_norm_bounds(mat)
        rows = None
        if s.anchor is not None:
            # output element (..., j) = <x-part, column j>: its gradient norm <= seg * ||column j||
            cols = np.linalg.norm(mat.astype(np.float64), axis=0) * (1.0 + safety_margin(m.dtype))
            cols = cols.reshape([m.shape[d] for d in free])
            # dot_general's output is (lhs free dims, rhs free dims): the matrix's columns are the trailing
            # dims when the input is the lhs, the leading ones when it is the rhs
            if i == 1:
                cols = cols.reshape(cols.shape + (1,) * (len(out_aval.shape) - cols.ndim))
            rows = np.broadcast_to(s.seg * cols, out_aval.shape)
        out = self.linear_map(s, out_aval.shape, out_aval.dtype, nb.upper, path, "dense", nb.lower, rows=rows)
        free_in = [d for d in range(len(s.shape)) if d not in contract[i]]
        if s.anchor is not None and i == 0 and math.prod(s.shape[d] for d in free_in) == 1:
            out.head = (mat, np.ones(mat.shape[1]), s.seg)  # output element j = column j . (input)
        return out


def _unsupported(name: str, path: str, why: str) -> ValueError:
    where = f"module {path!r}" if path else "the model's own code"
    return ValueError(
        f"curvature_bound: no rule for `{name}` in {where}: {why}. Supported: convolutions and dense layers "
        f"with constant weights, sums, scaling by constants, pooling, reshapes, and the activations "
        f"{sorted(ACTIVATION_BOUNDS)} (plus sigmoid, Lipschitz/plain batch norm in eval mode, spectral layers).")


def _join(prefix: str, stack: str) -> str:
    """Module path from a jaxpr name stack: Flax's scopes for helper methods (``block._norm``) are dropped."""
    parts = [p for p in "/".join((prefix, stack)).split("/") if p and "." not in p]
    return "/".join(parts)


def _call_name(eqn) -> str:
    if "name" in eqn.params and isinstance(eqn.params["name"], str):
        return eqn.params["name"]
    closed = _call_jaxpr(eqn)
    info = getattr(getattr(closed, "jaxpr", None), "debug_info", None)
    src = getattr(info, "func_src_info", None) or ""
    return src.split(" ")[0] if src else ""


def _call_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        closed = eqn.params.get(key)
        if closed is not None:
            if isinstance(closed, jcore.Jaxpr):
                return jcore.ClosedJaxpr(closed, ())
            return closed
    return None


def _eval_eqn(eqn, vals) -> list:
    """Evaluate an equation whose inputs are all constants, exactly as the model does (eagerly)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*vals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _move_rows(name: str, rows, params, out_shape):
    """Per-element row bounds follow reshapes/transposes; slices keep a subset (others: forget them)."""
    rows = np.asarray(rows)
    if name in ("reshape", "squeeze", "expand_dims"):
        return rows.reshape(out_shape)
    if name == "transpose":
        return np.transpose(rows, params["permutation"])
    if name == "rev":
        return np.flip(rows, axis=tuple(params["dimensions"]))
    if name == "slice":
        idx = tuple(slice(s, e, st) for s, e, st in zip(params["start_indices"], params["limit_indices"],
                                                          params.get("strides") or (1,) * rows.ndim))
        return rows[idx]
    return None


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
def _group_layers(factors: Sequence[Factor]) -> tuple:
    paths = [f.path for f in factors if f.path]
    leaves = []
    for p in dict.fromkeys(paths):
        if not any(q != p and q.startswith(p + "/") for q in paths):
            leaves.append(p)
    out = []
    for p in leaves:
        b = IDENTITY
        for f in factors:
            if f.path == p:
                b = compose(Bound(f.upper, f.curvature), b)
        out.append((p, b))
    return tuple(out)


def function_bound(fn: Callable[[Array], Array], example: Any, *, key: PRNGKey | None = None,
                   num_iters: int = 30, almost_everywhere: bool = False, strip_prefix: str = "",
                   factor_side: str = "upper") -> CurvatureBound:
    """Certified slope and curvature bounds of ``fn`` over all inputs of ``example``'s shape and dtype.

    ``fn`` maps one input (an array, e.g. a batch of one image) to one output array; its parameters must be
    closed over as concrete arrays (they are evaluated, not traced). See the module docstring for the rules.
    ``key`` randomises the power-iteration starts of the lower sides; ``num_iters`` power iterations per
    convolution. Per-output arrays have the output's size (flattened). ``strip_prefix``: a leading module
    name removed from the reported paths (``curvature_bound`` passes the model's class name).
    ``factor_side="lower"`` puts every factor's lower side into the same algebra instead: NOT a bound, but the
    value the bound would take if every certified factor were exact (so ``bound / that`` is the part of the
    bound's slack due to the per-factor certification, the rest being the algebra's worst-case alignment).
    """
    shape = tuple(getattr(example, "shape", example))
    dtype = getattr(example, "dtype", jnp.float32)
    closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(shape, dtype))
    if factor_side not in ("upper", "lower"):
        raise ValueError(f"factor_side must be 'upper' (the certified bound) or 'lower', got {factor_side!r}")
    interp = _Interpreter(key, int(num_iters), bool(almost_everywhere), strip_prefix, factor_side)
    x = _Sym(shape, dtype, 1.0, {})
    x.anchor = x
    outs = interp.run(closed.jaxpr, closed.consts, [x])
    syms = [o for o in outs if isinstance(o, _Sym)]
    if len(outs) != 1:
        raise ValueError(f"function_bound needs a function with one output array, got {len(outs)} outputs")
    if not syms:
        raise ValueError("the output does not depend on the input (a constant function): nothing to bound")
    out = interp.materialize(syms[0])
    k_net = float(sum(out.curv.values()))
    n_out = out.size
    per_l = np.full(n_out, out.lip)
    per_k = np.full(n_out, k_net)
    anchor = out.anchor
    if anchor is not None and out.rows is not None:
        rows = np.asarray(out.rows, np.float64).reshape(-1)
        k_anchor = float(sum(anchor.curv.values()))
        per_l = np.minimum(per_l, np.array([_mul(r, anchor.lip) for r in rows]))
        per_k = np.minimum(per_k, np.array([_mul(r, k_anchor) for r in rows]))
    factors = tuple(interp.factors)
    curv_terms = tuple(out.curv.items())
    head_input = pair_l = pair_k = None
    if anchor is not None:
        head_input = Bound(float(anchor.lip), float(sum(anchor.curv.values())))
        if out.head is not None and n_out <= PAIRWISE_MAX_OUTPUTS:
            pair_l, pair_k = _pairwise(out, head_input, per_l, per_k, k_net, dtype)
    out_dtype = jnp.float32 if dtype != jnp.float64 else dtype
    return CurvatureBound(curvature=jnp.asarray(per_k, out_dtype), lipschitz=jnp.asarray(per_l, out_dtype),
                          network=Bound(float(out.lip), k_net), layers=_group_layers(factors), factors=factors,
                          curvature_terms=curv_terms, almost_everywhere=bool(almost_everywhere),
                          head_input=head_input,
                          pairwise_lipschitz=None if pair_l is None else jnp.asarray(pair_l, out_dtype),
                          pairwise_curvature=None if pair_k is None else jnp.asarray(pair_k, out_dtype))


def _pairwise(out: _Sym, head_input: Bound, per_l, per_k, k_net: float, dtype) -> tuple:
    """Bounds on the slope and curvature of ``output_i - output_j`` for all pairs: the gradient of the difference
    with respect to the head's input ``h`` is ``P^T (m_i s_i - m_j s_j)`` (``m_k`` column k of the dense matrix,
    ``s_k`` the later constant scale of output k, ``||P|| <= seg_in``), so its norm is at most
    ``seg_in ||m_i s_i - m_j s_j||``; then the chain rule through ``h`` as for single outputs. Capped by
    ``L_i + L_j`` (triangle inequality) and ``sqrt(2) L`` (``||e_i - e_j|| = sqrt 2``)."""
    mat, col_scale, seg_in = out.head
    a = np.asarray(mat, np.float64) * col_scale[None, :]
    n = a.shape[1]
    diff = np.empty((n, n))
    for i in range(n):  # direct differences (no Gram-matrix cancellation), one row at a time
        diff[i] = np.linalg.norm(a - a[:, i:i + 1], axis=0)
    diff *= seg_in * (1.0 + safety_margin(dtype)) ** 2  # the matrix's and the scales' float64 rounding
    inf_times = lambda d, c: np.multiply(d, c, out=np.zeros_like(d), where=d != 0.0)  # noqa: E731  (0 * inf = 0)
    pair_l = np.minimum(inf_times(diff, head_input.lipschitz), per_l[:, None] + per_l[None, :])
    pair_k = np.minimum(inf_times(diff, head_input.curvature), per_k[:, None] + per_k[None, :])
    pair_l = np.minimum(pair_l, math.sqrt(2.0) * out.lip * (1.0 + safety_margin(dtype)))
    pair_k = np.minimum(pair_k, math.sqrt(2.0) * k_net * (1.0 + safety_margin(dtype)))
    np.fill_diagonal(pair_l, 0.0)
    np.fill_diagonal(pair_k, 0.0)
    return pair_l, pair_k


def _eval_kwargs(model: nn.Module) -> dict:
    """The keywords that put ``model`` in eval mode (``train=False``, ``deterministic=True``, ...; see
    :func:`lcnn_jax.nn.mode_kwargs`): running statistics, stored spectral vectors, no dropout."""
    from lcnn_jax.nn.models import mode_kwargs  # models import measures-free modules only; avoid a cycle anyway

    return mode_kwargs(model, train=False)


def _params_dtype(variables: Mapping) -> Any:
    leaves = [a for a in jax.tree_util.tree_leaves(variables.get("params", variables))
              if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)]
    return jnp.result_type(*leaves) if leaves else jnp.float32


def curvature_bound(model: nn.Module, variables: Mapping, input_shape: Sequence[int], *,
                    key: PRNGKey | None = None, num_iters: int = 30, almost_everywhere: bool = False,
                    apply_kwargs: Mapping | None = None, factor_side: str = "upper") -> CurvatureBound:
    """Certified upper bounds on the input-Hessian spectral norm and gradient norm of every output.

    Args:
      model: any Flax module built from supported operations (the library's layers, plain Flax ``Conv``/
        ``Dense``/``BatchNorm``, pooling, residual sums, your own modules around them). It is applied in eval
        mode (``train=False``, ``deterministic=True``, ... as its ``__call__`` names it): running BN statistics,
        stored spectral vectors, per example.
      variables: ``{"params": ..., "batch_stats": ..., "spectral": ...}`` as from ``model.init``/training.
      input_shape: one example's shape, e.g. ``(28, 28, 1)``; must match the shape spectral layers were
        initialised for.
      key: randomness for the power-iteration starts of the lower sides (``None``: deterministic starts).
      num_iters: power iterations per convolution for the lower side (the upper side does not iterate).
      almost_everywhere: count ReLU/max-pool kinks as ``K = 0`` (a bound wherever the Hessian exists).
      apply_kwargs: extra keywords for ``model.apply`` (override the detected ``train=False``).
      factor_side: ``"upper"`` (the certified bound) or ``"lower"`` (a diagnostic; see :func:`function_bound`).

    Returns:
      :class:`CurvatureBound` (per-output arrays of length ``num_classes``).
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a mapping with 'params' (and the model's other collections), "
                         "as returned by model.init or training")
    if not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be a positive int, got {num_iters!r}")
    kwargs = {**_eval_kwargs(model), **dict(apply_kwargs or {})}
    dtype = _params_dtype(variables)
    fn = lambda x: model.apply(variables, x, **kwargs)  # noqa: E731
    res = function_bound(fn, jax.ShapeDtypeStruct((1,) + tuple(int(d) for d in input_shape), dtype), key=key,
                         num_iters=num_iters, almost_everywhere=almost_everywhere,
                         strip_prefix=type(model).__name__, factor_side=factor_side)
    return res


def layer_bound(m: nn.Module, site: Mapping, in_shape: Sequence[int], *, key: PRNGKey | None = None,
                num_iters: int = 30, almost_everywhere: bool = False) -> tuple[Bound, tuple]:
    """``(Bound, out_shape)`` of one eval-mode layer ``m`` with variables ``site`` on per-example inputs of
    shape ``in_shape`` (no batch axis): the whole layer's slope and curvature bounds."""
    kwargs = _eval_kwargs(m)
    dtype = _params_dtype(site) if site else jnp.float32
    fn = lambda x: m.apply(dict(site), x, **kwargs)  # noqa: E731
    example = jax.ShapeDtypeStruct((1,) + tuple(int(d) for d in in_shape), dtype)
    out_shape = jax.eval_shape(fn, example).shape[1:]
    res = function_bound(fn, example, key=key, num_iters=num_iters, almost_everywhere=almost_everywhere)
    return Bound(res.network.lipschitz, res.network.curvature), tuple(out_shape)
