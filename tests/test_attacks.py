"""Attacks: exact feasibility (eps-ball and [0, 1] box) and closed-form worst cases on linear models."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax import attacks


def _mlp_logits(seed, n_in, n_hidden, n_cls):
    rng = np.random.default_rng(seed)
    w1 = jnp.asarray(rng.standard_normal((n_in, n_hidden)) / np.sqrt(n_in), jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((n_hidden, n_cls)), jnp.float32)

    def logits_fn(xs):
        return jnp.tanh(xs.reshape(xs.shape[0], -1) @ w1) @ w2

    return logits_fn


def _binary_linear(seed, n_in):
    """Two-class linear model: the CE depends only on the margin m = d.x + c with d = w_y - w_other."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, 2))
    b = rng.standard_normal(2)

    def logits_fn(xs):
        return xs.reshape(xs.shape[0], -1) @ jnp.asarray(w, xs.dtype) + jnp.asarray(b, xs.dtype)

    def margins(xs, ys):
        z = np.asarray(xs, np.float64).reshape(len(xs), -1) @ w + b
        idx = np.arange(len(ys))
        return z[idx, ys] - z[idx, 1 - ys]

    d_norms = {"l2": np.linalg.norm(w[:, 0] - w[:, 1]), "linf": np.abs(w[:, 0] - w[:, 1]).sum()}
    return logits_fn, margins, d_norms


def _images(seed, b, shape=(4, 4, 1)):
    return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (b, *shape)), jnp.float32)


@pytest.mark.parametrize("norm,eps,step", [("linf", 0.1, 0.03), ("l2", 0.5, 0.2), ("l2", 50.0, 5.0)])
def test_pgd_stays_in_ball_and_box(norm, eps, step):
    logits_fn = _mlp_logits(0, 16, 8, 3)
    xs = _images(1, 6)
    ys = jnp.array([0, 1, 2, 0, 1, 2])
    x_adv = attacks.pgd(logits_fn, xs, ys, norm=norm, eps=eps, step_size=step, num_steps=7, key=jax.random.key(0))
    a, x0 = np.asarray(x_adv, np.float64), np.asarray(xs, np.float64)
    assert a.min() >= 0.0 and a.max() <= 1.0
    d = (a - x0).reshape(6, -1)
    if norm == "linf":
        assert np.abs(d).max() <= eps + 1e-6
    else:
        assert np.linalg.norm(d, axis=1).max() <= eps * (1 + 1e-6)
    # the attack moved the points and raised the loss of every example
    ce = lambda x: np.asarray(attacks.cross_entropy(logits_fn(x), ys))
    assert np.all(ce(x_adv) > ce(xs))


def test_pgd_beats_fgsm_and_eps_zero_is_identity():
    logits_fn = _mlp_logits(2, 16, 8, 3)
    xs = _images(3, 8)
    ys = jnp.arange(8) % 3
    ce = lambda x: float(jnp.mean(attacks.cross_entropy(logits_fn(x), ys)))
    x_fgsm = attacks.fgsm(logits_fn, xs, ys, eps=0.05)
    x_pgd = attacks.pgd(logits_fn, xs, ys, eps=0.05, step_size=0.01, num_steps=20, key=jax.random.key(1))
    assert ce(x_pgd) >= ce(x_fgsm) - 1e-6 > ce(xs)
    x_unrolled = attacks.pgd(logits_fn, xs, ys, eps=0.05, step_size=0.01, num_steps=20, key=jax.random.key(1),
                             unroll=True)
    np.testing.assert_allclose(x_unrolled, x_pgd, atol=1e-6)
    assert np.abs(np.asarray(x_fgsm - xs)).max() <= 0.05 + 1e-6
    for norm in ("linf", "l2"):
        same = attacks.pgd(logits_fn, xs, ys, norm=norm, eps=0.0, step_size=0.1, num_steps=3, key=jax.random.key(2))
        np.testing.assert_array_equal(same, xs)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_reaches_closed_form_worst_case_on_linear_model(norm):
    # Without a box the optimal attack lowers the margin by eps * ||d||_2 (L2) or eps * ||d||_1 (L-inf),
    # so the optimal loss is softplus(-(m - eps * ||d||_*)).
    logits_fn, margins, d_norms = _binary_linear(4, 10)
    xs = jnp.asarray(np.random.default_rng(5).standard_normal((32, 10)), jnp.float32)
    ys = jnp.asarray(np.random.default_rng(6).integers(0, 2, 32))
    eps = 0.3
    m = margins(xs, np.asarray(ys))
    optimal = np.logaddexp(0.0, -(m - eps * d_norms[norm]))
    x_adv = attacks.pgd(logits_fn, xs, ys, norm=norm, eps=eps, step_size=0.05, num_steps=40,
                        key=jax.random.key(0), clip=None)
    reached = np.asarray(attacks.cross_entropy(logits_fn(x_adv), ys), np.float64)
    np.testing.assert_allclose(reached, optimal, rtol=1e-4, atol=1e-5)
    if norm == "linf":  # FGSM is exactly optimal for a linear model under L-inf
        x_f = attacks.fgsm(logits_fn, xs, ys, eps=eps, clip=None)
        np.testing.assert_allclose(attacks.cross_entropy(logits_fn(x_f), ys), optimal, rtol=1e-4, atol=1e-5)
    # robust accuracy: an example survives iff its margin exceeds eps * ||d||_*
    safe = np.abs(m - eps * d_norms[norm]) > 1e-3
    attack = functools.partial(attacks.pgd, norm=norm, eps=eps, step_size=0.05, num_steps=40, clip=None)
    acc = attacks.robust_accuracy(logits_fn, xs[safe], ys[safe], attack=attack, key=jax.random.key(1), batch_size=5)
    np.testing.assert_allclose(acc, np.mean(m[safe] > eps * d_norms[norm]), atol=1e-12)
    assert acc < attacks.accuracy(logits_fn, xs[safe], ys[safe])


def test_accuracy_and_robust_accuracy_uneven_chunks_match_numpy():
    logits_fn = _mlp_logits(7, 16, 8, 3)
    xs = _images(8, 7)
    ys = jnp.array([0, 1, 2, 0, 1, 2, 0])
    expected = np.mean(np.argmax(np.asarray(logits_fn(xs)), 1) == np.asarray(ys))
    assert attacks.accuracy(logits_fn, xs, ys, batch_size=4) == pytest.approx(expected)
    attack = functools.partial(attacks.pgd, eps=0.1, step_size=0.02, num_steps=5, random_start=False)
    x_adv = attacks.pgd(logits_fn, xs, ys, eps=0.1, step_size=0.02, num_steps=5, random_start=False)
    adv_expected = np.mean(np.argmax(np.asarray(logits_fn(x_adv)), 1) == np.asarray(ys))
    assert attacks.robust_accuracy(logits_fn, xs, ys, attack=attack, batch_size=4) == pytest.approx(adv_expected)


def test_gaussian_noise_statistics_and_box():
    xs = jnp.full((4, 50, 50), 0.5, jnp.float32)
    noisy = attacks.gaussian_noise(xs, key=jax.random.key(0), std=0.1, clip=None)
    d = np.asarray(noisy - xs)
    assert abs(d.mean()) < 0.005 and abs(d.std() - 0.1) < 0.005
    clipped = attacks.gaussian_noise(xs, key=jax.random.key(0), std=1.0)
    c = np.asarray(clipped)
    assert c.min() == 0.0 and c.max() == 1.0  # N(0, 1) noise on 10^4 pixels hits both bounds


def test_attacks_reject_malformed_arguments():
    logits_fn = _mlp_logits(9, 16, 8, 3)
    xs, ys = _images(10, 3), jnp.array([0, 1, 2])
    kw = dict(step_size=0.1, num_steps=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="eps"):
        attacks.pgd(logits_fn, xs, ys, eps=-0.1, **kw)
    with pytest.raises(ValueError, match="norm"):
        attacks.pgd(logits_fn, xs, ys, norm="l1", eps=0.1, **kw)
    with pytest.raises(ValueError, match="key"):
        attacks.pgd(logits_fn, xs, ys, eps=0.1, step_size=0.1, num_steps=2)
    with pytest.raises(ValueError, match="same leading"):
        attacks.fgsm(logits_fn, xs, ys[:2], eps=0.1)
    with pytest.raises(ValueError, match="integer class labels"):
        attacks.fgsm(logits_fn, xs, ys.astype(jnp.float32), eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        attacks.fgsm(logits_fn, xs, ys, eps=float("nan"))
    with pytest.raises(ValueError, match="clip"):
        attacks.fgsm(logits_fn, xs, ys, eps=0.1, clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="num_steps"):
        attacks.pgd(logits_fn, xs, ys, eps=0.1, step_size=0.1, num_steps=-1, key=jax.random.key(0))
