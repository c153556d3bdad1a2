"""Input-space curvature of the loss (the LCNN measurement protocol) and gradient stability.

``loss_fn(x, y)`` is the per-example loss (cross-entropy at the true label, model in eval mode) of ONE
example ``x`` (any shape) with label ``y``. Both measures map it over a batch and return per-example
arrays; report their mean and std over a set. They are pure and traceable: jit them with the model's
variables and the data as arguments, building ``loss_fn`` inside (closed-over arrays would become constants of
the program: longer compilations, and new weights compile again)::

    import jax, optax
    from lcnn_jax.measures.curvature import input_curvature, gradient_stability

    @jax.jit
    def measure(variables, xs, ys, k):
        def loss_fn(x, y):
            logits = model.apply(variables, x[None])[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y)

        return input_curvature(loss_fn, xs, ys, key=k)

    out = measure(variables, xs, ys, jax.random.key(0))   # {"curvature": (B,), "hessian_norm": (B,), ...}
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lcnn_jax.autodiff import check_example_batch, check_labels, check_positive_int, per_example, safe_norm
from lcnn_jax.estimators import auto_unroll, power_iteration
from lcnn_jax.types import Array, PRNGKey

__all__ = ["input_curvature", "gradient_stability"]

#: Added to the gradient norm in the curvature ratio, as in the LCNN protocol.
CURVATURE_EPS = 1e-6


def input_curvature(
    loss_fn: Callable[[Array, Array], Array],
    xs: Array,
    ys: Array,
    *,
    key: PRNGKey,
    num_iters: int = 10,
    batch_size: int | None = None,
    unroll: int | bool | None = None,
) -> dict[str, Array]:
    """Per-example input-Hessian norm, gradient norm and curvature (LCNN protocol, SPEC 1.1).

    For each example, with ``g = grad_x loss`` and ``H = d^2 loss / dx^2``: power iteration on ``H``
    from a random normalised start ``u_0 ~ N(0, I) / ||.||``, ``num_iters`` normalised steps
    ``u <- H u / ||H u||``, then the Rayleigh quotient ``lam = u^T H u``. Returns a dict of (B,) arrays:

    * ``eigenvalue``: ``lam`` (signed; |lam| <= the largest |eigenvalue| of H),
    * ``hessian_norm``: ``|lam|``, an estimate (a lower bound) of the spectral norm ``||H||_2``,
    * ``grad_norm``: ``||g||``,
    * ``curvature``: ``|lam| / (||g|| + 1e-6)``.

    Cost: one ``jax.linearize`` of the gradient (about one forward, one backward and one tangent
    pass) and then ``num_iters + 1`` Hessian-vector products that evaluate only the linearised
    tangent program. Start vectors come from ``jax.random.split(key, B)``, so results do not depend
    on ``batch_size`` (chunked evaluation with ``lax.map`` to bound memory). ``unroll`` is passed to
    the power-iteration loop; the default unrolls it fully for ``num_iters <= 20`` (faster on CPU,
    longer compilation) and keeps it rolled beyond.
    """
    check_example_batch(xs)
    check_labels(xs, ys)
    num_iters = check_positive_int(num_iters, "num_iters")
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)

    def one(x, y, k):
        grad, hvp = jax.linearize(jax.grad(lambda x_: loss_fn(x_, y)), x)
        u0 = jax.random.normal(k, x.shape, x.dtype)
        lam = power_iteration(hvp, u0, num_iters + 1, unroll=auto_unroll(num_iters, unroll)).eigenvalue
        hess_norm = jnp.abs(lam)
        grad_norm = safe_norm(grad)
        return {
            "eigenvalue": lam,
            "hessian_norm": hess_norm,
            "grad_norm": grad_norm,
            "curvature": hess_norm / (grad_norm + CURVATURE_EPS),
        }

    keys = jax.random.split(key, xs.shape[0])
    return per_example(one, batch_size=batch_size)(xs, ys, keys)


def gradient_stability(
    loss_fn: Callable[[Array, Array], Array],
    xs: Array,
    ys: Array,
    *,
    key: PRNGKey,
    noise_std: float = 0.01,
    batch_size: int | None = None,
) -> Array:
    """Per-example cosine similarity of ``grad_x loss(x)`` and ``grad_x loss(x + n)``, ``n ~ N(0, noise_std^2 I)``.

    Values lie in [-1, 1]; higher means more stable gradients. ``noise_std`` is in input units:
    the default 0.01 is 1% of the [0, 1] pixel range (about 2.5 grey levels). The noisy input is not
    clipped to [0, 1], so the perturbation is exactly Gaussian. A zero gradient gives similarity 0.
    Cost: two gradients per example. Noise for example ``i`` comes from ``jax.random.split(key, B)[i]``.
    """
    check_example_batch(xs)
    check_labels(xs, ys)
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
    if isinstance(noise_std, (int, float)) and not noise_std >= 0:  # traced values are not checked
        raise ValueError(f"noise_std must be a non-negative float, got {noise_std!r}.")

    def one(x, y, k):
        grad = jax.grad(lambda x_: loss_fn(x_, y))
        g0 = grad(x)
        g1 = grad(x + noise_std * jax.random.normal(k, x.shape, x.dtype))
        denom = safe_norm(g0) * safe_norm(g1)
        return jnp.where(denom > 0, jnp.vdot(g0, g1) / jnp.where(denom > 0, denom, 1.0), 0.0)

    keys = jax.random.split(key, xs.shape[0])
    return per_example(one, batch_size=batch_size)(xs, ys, keys)
