"""FAB: the box-constrained hyperplane projection against a bisection on its definition, and the exact minimum-norm
adversarial point of a binary linear classifier (closed form)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax import attacks


def _bisection_step(t, w, b, norm):
    """Oracle: the box-constrained minimum-norm step onto <w, t + d> = b, by bisection on the multiplier of the
    problem's KKT form (each coordinate moves against sign(w) by min(lam |w_i|, room) for L2, min(lam, room) for
    L-inf); the box's extreme point when the hyperplane is out of reach."""
    c = w @ t - b
    s = 1.0 if c >= 0 else -1.0
    w, c = w * s, c * s
    room = np.where(w > 0, t, 1.0 - t)
    step = (lambda lam: np.minimum(lam * np.abs(w), room)) if norm == "l2" else (lambda lam: np.minimum(lam, room))
    decrease = lambda lam: np.sum(np.abs(w) * step(lam))  # noqa: E731
    if decrease(1e12) < c:
        return -np.sign(w) * room
    lo, hi = 0.0, 1e12
    for _ in range(300):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if decrease(mid) < c else (lo, mid)
    return -np.sign(w) * step(hi)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_project_hyperplane_matches_a_bisection_on_its_definition(norm, x64):
    rng = np.random.default_rng(0)
    proj = jax.jit(jax.vmap(lambda t, w, b: attacks.project_hyperplane(t, w, b, norm=norm)))
    d = 12
    t = rng.uniform(0, 1, (200, d))
    w = rng.standard_normal((200, d)) * (rng.uniform(size=(200, d)) > 0.2)  # some zero coordinates
    b = np.einsum("nd,nd->n", w, t) + rng.standard_normal(200) * rng.choice([0.1, 1.0, 10.0], 200)  # some unreachable
    out = np.asarray(proj(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)))
    ref = np.stack([_bisection_step(t[i], w[i], b[i], norm) for i in range(200)])
    np.testing.assert_allclose(out, ref, atol=1e-9)
    assert np.all(t + out >= -1e-12) and np.all(t + out <= 1 + 1e-12)
    reached = np.abs(np.einsum("nd,nd->n", w, t + out) - b) < 1e-9
    assert 0.2 < reached.mean() < 1.0  # both cases occur
    # the float32 path (bisection on 32-bit patterns): the same steps to float32 rounding (inputs O(1), d = 12)
    out32 = np.asarray(proj(*(jnp.asarray(v, jnp.float32) for v in (t, w, b))))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, ref, atol=1e-5)


def _binary(seed, n, d=64):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, 2))
    dw = w[:, 0] - w[:, 1]
    b = np.array([-dw @ np.full(d, 0.5), 0.0])
    xs = 0.5 + rng.uniform(-0.05, 0.05, (n, d))
    logits_fn = lambda x: x.reshape(x.shape[0], -1) @ jnp.asarray(w, x.dtype) + jnp.asarray(b, x.dtype)  # noqa: E731
    z = xs @ w + b
    ys = np.argmax(z, -1)
    sgn = np.where(ys == 0, 1.0, -1.0)  # the label's logit minus the other's = sgn * (dw . x + b0)
    margin = sgn * (xs @ dw + b[0])
    closest = {"l2": xs - (margin / (dw @ dw))[:, None] * (sgn[:, None] * dw),
               "linf": xs - (margin / np.abs(dw).sum())[:, None] * (sgn[:, None] * np.sign(dw))}
    return logits_fn, xs, ys, closest


@pytest.mark.slow  # a long oracle test: CI runs it with -m slow (the default suite stays < 3 min)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_returns_the_exact_minimum_norm_point_of_a_binary_linear_classifier(norm, x64):
    logits_fn, xs, ys, closest = _binary(1, 6)
    x, y = jnp.asarray(xs), jnp.asarray(ys)
    key = jax.random.key(0)
    # overshoot 1e-9: the first projection lands on the closed-form point, an iota past the boundary
    exact = attacks.fab(logits_fn, x, y, norm=norm, eps=10.0, key=key, num_steps=3, eta=1.0 + 1e-9)
    np.testing.assert_allclose(np.asarray(exact), closest[norm], atol=1e-5)
    assert np.all(np.asarray(jnp.argmax(logits_fn(exact), -1)) != ys)
    # the reference's settings (eta 1.05, beta 0.9, alpha_max 0.1): the same direction, within 1 % of the distance
    out = np.asarray(attacks.fab(logits_fn, x, y, norm=norm, eps=10.0, key=key, num_steps=20))
    step, best = out - xs, closest[norm] - xs
    ratio = np.einsum("nd,nd->n", step, best) / np.einsum("nd,nd->n", best, best)
    np.testing.assert_allclose(step, ratio[:, None] * best, atol=1e-9)
    assert np.all(ratio > 1.0) and np.all(ratio < 1.01)
    # eps below the distance: nothing within the radius, the clean input comes back
    dist = np.max(np.abs(best), 1) if norm == "linf" else np.linalg.norm(best, axis=1)
    small = attacks.fab(logits_fn, x, y, norm=norm, eps=float(dist.min()) * 0.99, key=key, num_steps=5)
    np.testing.assert_array_equal(np.asarray(small), xs)


@pytest.mark.slow  # a long oracle test: CI runs it with -m slow (the default suite stays < 3 min)
def test_fab_targeted_stepwise_equals_traced_and_rejects_bad_arguments(x64):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 5))
    logits_fn = lambda p, x: x.reshape(x.shape[0], -1) @ p  # noqa: E731
    xs = jnp.asarray(rng.uniform(0.3, 0.7, (6, 4, 4, 1)))
    p = jnp.asarray(w)
    ys = jnp.argmax(logits_fn(p, xs), -1)
    kw = dict(norm="l2", eps=2.0, key=jax.random.key(1), num_steps=7, targeted=True, target_rank=2, restarts=2)
    a = attacks.fab(lambda x: logits_fn(p, x), xs, ys, **kw)
    b = attacks.fab_stepwise(logits_fn, xs, ys, params=p, **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-10)
    z = np.asarray(logits_fn(p, xs))
    fooled = np.asarray(jnp.argmax(logits_fn(p, a), -1)) != np.asarray(ys)
    target = np.argsort(-np.where(np.eye(5)[np.asarray(ys)] > 0, -np.inf, z), axis=1)[:, 1]
    assert fooled.any()
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits_fn(p, a), -1))[fooled], target[fooled])
    for bad, match in ((dict(norm="l1"), "norm"), (dict(eps=0.0), "eps"), (dict(target_rank=5), "target_rank"),
                       (dict(eta=0.9), "eta"), (dict(key=None), "key")):
        with pytest.raises(ValueError, match=match):
            attacks.fab(lambda x: logits_fn(p, x), xs, ys, **{**kw, **bad})


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_untargeted_fab_finds_the_closest_boundary_of_a_ten_class_linear_classifier(norm, x64):
    """The exact distance to the decision boundary is min_j m_j / ||w_y - w_j||_* (dual norm); with no overshoot
    FAB's first linearisation is exact, so the point it returns lies at that distance (1e-6 relative)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 10))
    xs = rng.uniform(0.4, 0.6, (12, 64))
    logits_fn = lambda x: (x - 0.5) @ jnp.asarray(w)  # noqa: E731
    z = (xs - 0.5) @ w
    ys = np.argmax(z, -1)
    dw = w[:, ys].T[:, None, :] - w.T[None, :, :]
    q = (z[np.arange(12), ys][:, None] - z) / np.maximum(np.linalg.norm(dw, ord=1 if norm == "linf" else 2, axis=-1),
                                                         1e-300)
    q[np.arange(12), ys] = np.inf
    dist = q.min(1)
    out = attacks.fab(logits_fn, jnp.asarray(xs), jnp.asarray(ys), norm=norm, eps=10.0, key=jax.random.key(0),
                      num_steps=2, eta=1.0 + 1e-9)
    d = np.asarray(out) - xs
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    np.testing.assert_allclose(size, dist, rtol=1e-6)
    assert np.all(np.asarray(jnp.argmax(logits_fn(out), -1)) != ys)
