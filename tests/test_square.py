"""Square: the reference's schedule of square sides, feasibility (ball and box), traced = host-driven, and the L2
pattern's construction."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax import attacks


def test_square_sides_follow_the_reference_schedule():
    # p_init 0.8 halved after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000; side round(sqrt(p h w))
    assert [attacks.square_p(i, 5000) for i in (0, 10, 11, 50, 51, 4000, 4001)] == \
        [0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 64, 0.8 / 128]
    assert attacks.square_p(5, 100, rescale_schedule=True) == 0.1  # query 5 of 100 counts as 500 of 10000
    assert attacks.square_sizes(5000, (28, 28, 1), "linf") == [
        (25, 0, 11), (18, 11, 40), (13, 51, 150), (9, 201, 300), (6, 501, 500), (4, 1001, 1000), (3, 2001, 2000),
        (2, 4001, 999)]
    # L2: odd sides, at least 3
    assert [s for s, _, _ in attacks.square_sizes(5000, (32, 32, 3), "l2")] == [29, 21, 15, 11, 7, 5, 3]


@pytest.mark.slow  # a long oracle test: CI runs it with -m slow (the default suite stays < 3 min)
@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_square_stays_in_ball_and_box_and_stepwise_equals_traced(norm, eps):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((2 * 6 * 6, 4)), jnp.float32)
    logits_fn = lambda p, x: jnp.tanh(x.reshape(x.shape[0], -1) - 0.5) @ p  # noqa: E731
    xs = jnp.asarray(rng.uniform(0, 1, (5, 6, 6, 2)), jnp.float32)
    ys = jnp.argmax(logits_fn(w, xs), -1)
    kw = dict(norm=norm, eps=eps, key=jax.random.key(3), num_queries=15, restarts=2)
    traced = attacks.square(lambda x: logits_fn(w, x), xs, ys, **kw)
    host = attacks.square_stepwise(logits_fn, xs, ys, params=w, chunk=4, **kw)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(host), atol=1e-6)
    d = np.asarray(traced - xs, np.float64).reshape(5, -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    assert np.all(size <= eps * (1 + 1e-5)) and float(traced.min()) >= 0 and float(traced.max()) <= 1
    fooled = np.asarray(jnp.argmax(logits_fn(w, traced), -1) != ys)
    np.testing.assert_array_equal(np.asarray(traced)[~fooled], np.asarray(xs)[~fooled])  # failures: the clean input
    with pytest.raises(ValueError, match="images"):
        attacks.square(lambda x: logits_fn(w, x), xs.reshape(5, -1), ys, **kw)


def test_l2_pattern_is_two_opposite_halves_of_unit_norm():
    from lcnn_jax.attacks.square import _eta

    for s in (3, 5, 7):
        e = _eta(s)
        assert np.isclose(np.sqrt((e ** 2).sum()), 1.0)
        assert np.all(e[: s // 2] > 0) and np.all(e[s // 2:] < 0)
        np.testing.assert_allclose(e[: s // 2].sum() / np.abs(e[s // 2:]).sum(), 1.0, atol=0.35)
        np.testing.assert_allclose(e, e[:, ::-1])  # symmetric left-right: nested rectangles around the centre
