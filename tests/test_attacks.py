"""Attacks: exact feasibility (eps-ball and [0, 1] box) and closed-form worst cases on linear models."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _lcnn_helpers import xla_optimizations
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


@pytest.mark.slow  # long for the default run; CI runs it
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


def test_params_argument_gives_the_closure_results_and_one_compilation():
    # logits_fn(params, xs) with params an argument of the program = the closed-over form, for both drivers
    rng = np.random.default_rng(11)
    params = {"w1": jnp.asarray(rng.standard_normal((16, 8)) / 4, jnp.float32),
              "w2": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)}

    def apply(p, xs):
        return jnp.tanh(xs.reshape(xs.shape[0], -1) @ p["w1"]) @ p["w2"]

    xs, ys = _images(12, 7), jnp.array([0, 1, 2, 0, 1, 2, 0])
    closed = functools.partial(apply, params)
    attack = functools.partial(attacks.pgd, eps=0.2, step_size=0.05, num_steps=4)
    key = jax.random.key(3)
    assert attacks.accuracy(apply, xs, ys, batch_size=4, params=params) == attacks.accuracy(closed, xs, ys,
                                                                                          batch_size=4)
    assert attacks.robust_accuracy(apply, xs, ys, attack=attack, key=key, batch_size=4, params=params) == \
        attacks.robust_accuracy(closed, xs, ys, attack=attack, key=key, batch_size=4)
    with_params = attacks.robust_accuracy_worst_case(apply, xs, ys, attacks={"pgd": attack}, key=key, batch_size=4,
                                                     params=params)
    closure = attacks.robust_accuracy_worst_case(closed, xs, ys, attacks={"pgd": attack}, key=key, batch_size=4)
    assert with_params.accuracy == closure.accuracy and with_params.clean_accuracy == closure.clean_accuracy


def test_attack_unroll_rule_and_unrolled_steps_compute_the_same_iterates(monkeypatch):
    from lcnn_jax import loops

    monkeypatch.setattr(loops, "MAX_AUTO_UNROLL", 20)  # the library's value (conftest sets 0 for the suite)
    assert attacks.attack_unroll(20) is True and attacks.attack_unroll(3) is True
    assert attacks.attack_unroll(21) == 1 and attacks.attack_unroll(100, unroll=True) is True
    assert attacks.attack_unroll(20, unroll=1) == 1 and attacks.attack_unroll(20, unroll=False) == 1
    logits_fn = _mlp_logits(13, 16, 8, 3)
    xs, ys = _images(14, 6), jnp.arange(6) % 3
    runs = [attacks.pgd(logits_fn, xs, ys, norm="l2", eps=0.5, step_size=0.1, num_steps=7, key=jax.random.key(4),
                        unroll=u) for u in (1, None)]  # rolled vs the default (fully unrolled, 7 <= 20)
    runs += [attacks.apgd(logits_fn, xs, ys, norm="linf", eps=0.1, num_steps=7, key=jax.random.key(5), unroll=u)
             for u in (1, None)]
    np.testing.assert_allclose(runs[1], runs[0], atol=1e-6)
    np.testing.assert_allclose(runs[3], runs[2], atol=1e-6)


def _conv_apply(p, xs):
    """A tiny convolutional network (the layer whose backward pass apgd_stepwise exists for)."""
    h = jax.lax.conv_general_dilated(xs, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(h.reshape(xs.shape[0], -1)) @ p["w"]


@pytest.mark.parametrize("norm,loss,restarts", [("linf", "ce", 2), ("l2", "dlr", 1), ("l2", "dlr_targeted", 1)])
def test_apgd_stepwise_computes_the_iterates_of_apgd(norm, loss, restarts, x64):
    """The host-driven segments (5 steps, then the remaining 2 of 12) give apgd's result: in float64, where a
    different fusion of the same operations cannot flip one of APGD's comparisons, to 1e-10."""
    rng = np.random.default_rng(21)
    params = {"k": jnp.asarray(rng.standard_normal((3, 3, 1, 2)), jnp.float64),
              "w": jnp.asarray(rng.standard_normal((32, 5)) / 4, jnp.float64)}
    xs = jnp.asarray(rng.uniform(0, 1, (6, 4, 4, 1)), jnp.float64)
    ys = jnp.argmax(_conv_apply(params, xs), axis=-1).astype(jnp.int32)  # all correct: every example is attacked
    kw = dict(norm=norm, eps=0.3 if norm == "linf" else 1.0, num_steps=12, loss=loss, restarts=restarts,
              key=jax.random.key(7))
    ref = attacks.apgd(functools.partial(_conv_apply, params), xs, ys, unroll=1, **kw)
    out = attacks.apgd_stepwise(_conv_apply, xs, ys, params=params, **kw)
    assert out.dtype == jnp.float64 and float(jnp.min(jnp.max(jnp.abs(ref - xs), axis=(1, 2, 3)))) > 0.01  # all moved
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="segment"):
        attacks.apgd_stepwise(_conv_apply, xs, ys, params=params, segment=0, **kw)
    with pytest.raises(ValueError, match="norm"):
        attacks.apgd_stepwise(_conv_apply, xs, ys, params=params, **{**kw, "norm": "l1"})


def test_pgd_l2_starts_uniform_in_the_ball_or_at_a_uniform_radius():
    # identity "model", zero steps: the returned point is the random start. "ball": radius eps U^(1/d), so
    # P(r <= q eps) = q^d; "radial" (torchattacks): eps U, uniform radius on [0, eps].
    n, d, eps = 4000, 16, 1.0
    xs = jnp.full((n, d), 0.5, jnp.float32)
    ys = jnp.zeros(n, jnp.int32)
    radii = {}
    for start in ("ball", "radial"):
        x0 = attacks.pgd(lambda x: x[:, :2], xs, ys, norm="l2", eps=eps, step_size=0.0, num_steps=0,
                         key=jax.random.key(6), clip=None, l2_start=start)
        radii[start] = np.linalg.norm(np.asarray(x0 - xs, np.float64), axis=1)
        assert radii[start].max() <= eps * (1 + 1e-6)
    for q in (0.5, 0.8, 0.95):
        assert abs(np.mean(radii["ball"] <= q * eps) - q ** d) < 0.02
        assert abs(np.mean(radii["radial"] <= q * eps) - q) < 0.03
    with pytest.raises(ValueError, match="l2_start"):
        attacks.pgd(lambda x: x, xs[:2], ys[:2], norm="l2", eps=eps, step_size=0.1, num_steps=1,
                    key=jax.random.key(0), l2_start="sphere")


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


# ------------------------------------------------------------------------------------------------ APGD
def _checkpoint_oracle(n):
    """The paper's schedule by its definition, in exact rational arithmetic (hundredths)."""
    p = [0, 22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 3, 6)
        if nxt > 100:
            break
        p.append(nxt)
    return tuple(sorted({-(-q * n // 100) for q in p[1:]}))


def test_apgd_checkpoints_follow_the_papers_schedule():
    assert attacks.apgd_checkpoints(100, "paper") == (22, 41, 57, 70, 80, 87, 93, 99)
    for n in (1, 3, 10, 37, 100, 250, 1000):
        assert attacks.apgd_checkpoints(n, "paper") == _checkpoint_oracle(n), n
    assert attacks.apgd_checkpoints(0, "paper") == () and attacks.apgd_checkpoints(0) == ()


def test_dlr_losses_match_their_definitions():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((50, 7)) * 3
    y = rng.integers(0, 7, 50)
    t = rng.integers(0, 7, 50)
    t = np.where(t == y, (y + 1) % 7, t)
    srt = np.sort(z, axis=1)[:, ::-1]
    zy = z[np.arange(50), y]
    other = np.where(np.arange(7)[None] == y[:, None], -np.inf, z).max(1)
    dlr = -(zy - other) / (srt[:, 0] - srt[:, 2] + 1e-12)
    dlr_t = -(zy - z[np.arange(50), t]) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)
    got = attacks.dlr_loss(jnp.asarray(z, jnp.float32), jnp.asarray(y))
    got_t = attacks.dlr_loss(jnp.asarray(z, jnp.float32), jnp.asarray(y), targets=jnp.asarray(t))
    np.testing.assert_allclose(got, dlr, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got_t, dlr_t, rtol=2e-5, atol=2e-6)
    # invariant to shifting and (positive) scaling the logits, the point of the DLR loss
    np.testing.assert_allclose(attacks.dlr_loss(jnp.asarray(5 * z + 3, jnp.float32), jnp.asarray(y)), dlr,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm,eps,loss", [("linf", 0.3, "ce"), ("l2", 3.0, "dlr")])
def test_apgd_never_leaves_the_ball_or_the_box(norm, eps, loss):
    logits_fn = _mlp_logits(0, 16, 8, 4)
    xs = _images(1, 8)
    xs = xs.at[:2].set(jnp.round(xs[:2]))  # pixels at the box's faces
    ys = jnp.arange(8) % 4
    x_adv = attacks.apgd(logits_fn, xs, ys, norm=norm, eps=eps, num_steps=15, loss=loss, key=jax.random.key(0),
                         restarts=2)
    a = np.asarray(x_adv)
    assert a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0  # exact
    if norm == "linf":  # exact: the float32 interval the projection clips to
        e = np.float32(eps)
        x0 = np.asarray(xs)
        assert np.all(a >= x0 - e) and np.all(a <= x0 + e)
    else:  # the ball, up to the rounding of the stored float32 coordinates (values in [0, 1]: <= 2^-24 each)
        d = (a.astype(np.float64) - np.asarray(xs, np.float64)).reshape(8, -1)
        assert np.linalg.norm(d, axis=1).max() <= eps * (1 + 1e-6) + np.sqrt(d.shape[1]) * 2.0 ** -24
    ce = lambda x: np.asarray(attacks.cross_entropy(logits_fn(x), ys))  # noqa: E731
    assert np.mean(ce(x_adv)) > np.mean(ce(xs))


def _binary_linear_box_optimum(w, b, xs, ys, norm, eps, clip):
    """The margin-minimising point of ball (cap) box for a two-class linear model, in float64.

    margin m(x) = c.x + const, c = w_y - w_other. L-inf (with or without the box): separable, each coordinate
    at its extreme against sign(c). L2: the KKT point x(t) = clip(x0 - t c) with ||x(t) - x0|| = eps (bisection
    on t; the norm grows with t), or the box corner where even t -> inf stays inside the ball."""
    out = []
    for x0, y in zip(np.asarray(xs, np.float64).reshape(len(xs), -1), np.asarray(ys)):
        c = w[:, y] - w[:, 1 - y]
        lo, hi = (-np.inf, np.inf) if clip is None else clip
        if norm == "linf":
            x = np.clip(x0 - eps * np.sign(c), lo, hi)
        else:
            x_of = lambda t: np.clip(x0 - t * c, lo, hi)  # noqa: E731
            if np.linalg.norm(x_of(1e9) - x0) <= eps:
                x = x_of(1e9)
            else:
                t0, t1 = 0.0, 1.0
                while np.linalg.norm(x_of(t1) - x0) < eps:
                    t1 *= 2
                for _ in range(200):
                    tm = 0.5 * (t0 + t1)
                    t0, t1 = (tm, t1) if np.linalg.norm(x_of(tm) - x0) < eps else (t0, tm)
                x = x_of(t0)
        out.append(x)
    xo = np.stack(out)
    z = xo @ w + b
    idx = np.arange(len(xo))
    return z[idx, ys] - z[idx, 1 - ys]


@pytest.mark.parametrize("norm,clip", [("linf", (0.0, 1.0)), ("l2", None), ("l2", (0.0, 1.0))])
def test_apgd_finds_the_closed_form_worst_case_of_a_linear_model(norm, clip):
    rng = np.random.default_rng(11)
    n_in = 12
    w, b = rng.standard_normal((n_in, 2)), rng.standard_normal(2)
    logits_fn = lambda xs: xs.reshape(len(xs), -1) @ jnp.asarray(w, xs.dtype) + jnp.asarray(b, xs.dtype)  # noqa
    xs = jnp.asarray(rng.uniform(0, 1, (40, n_in)), jnp.float32)
    ys_np = rng.integers(0, 2, 40)
    ys = jnp.asarray(ys_np)
    eps = 0.15 if norm == "linf" else 0.6
    m_opt = _binary_linear_box_optimum(w, b, xs, ys_np, norm, eps, clip)
    # schedule="paper" returns the point of highest loss where the attack fails, "reference" the clean input
    x_adv = attacks.apgd(logits_fn, xs, ys, norm=norm, eps=eps, num_steps=60, key=jax.random.key(3), clip=clip,
                         schedule="paper")
    x_ref = attacks.apgd(logits_fn, xs, ys, norm=norm, eps=eps, num_steps=60, key=jax.random.key(3), clip=clip)
    z_ref = np.asarray(x_ref, np.float64) @ w + b
    m_ref = z_ref[np.arange(40), ys_np] - z_ref[np.arange(40), 1 - ys_np]
    z = np.asarray(x_adv, np.float64) @ w + b
    m = z[np.arange(40), ys_np] - z[np.arange(40), 1 - ys_np]
    clean = np.asarray(xs, np.float64) @ w + b
    clean_m = clean[np.arange(40), ys_np] - clean[np.arange(40), 1 - ys_np]
    survive = m_opt > 0  # the attack cannot flip these: it must return the loss maximiser
    assert survive.sum() >= 5 and (~survive & (clean_m > 0)).sum() >= 3
    tol = 1e-4 * np.abs(w).sum()
    assert np.all(m[survive] >= m_opt[survive] - tol)  # no feasible point beats the optimum (checks the oracle)
    if norm == "l2" and clip is not None:
        # Projecting onto the ball and then clipping (the authors' convention) is not the Euclidean projection onto
        # ball (cap) box, so APGD stops short of the optimum here: within 2 % of the margin it could remove.
        np.testing.assert_array_less(m[survive] - m_opt[survive], 0.02 * (clean_m[survive] - m_opt[survive]))
    else:
        np.testing.assert_allclose(m[survive], m_opt[survive], rtol=0, atol=tol)
    assert np.all(m[~survive] < 0)  # every flippable example is flipped
    assert np.all(m_ref[~survive] < 0)
    np.testing.assert_array_equal(np.asarray(x_ref)[survive], np.asarray(xs)[survive])


def test_worst_case_counts_an_example_only_if_every_attack_fails():
    # logits = the first 3 features; feature 3 is a code saying which attacks succeed on that example
    # (1: A, 2: B, 3: both, 4: misclassified already, 0: none); the oracle is plain bookkeeping.
    codes = np.array([0, 1, 2, 3, 4, 0, 1, 0, 2, 0])
    ys = np.arange(10) % 3
    xs = np.zeros((10, 4), np.float32)
    xs[np.arange(10), ys] = 1.0
    xs[codes == 4, :3] = np.eye(3, dtype=np.float32)[(ys[codes == 4] + 1) % 3]
    xs[:, 3] = codes
    logits_fn = lambda x: x[:, :3]  # noqa: E731

    def flip_where(hit_codes):
        def attack(f, x, y, key):
            del f, key
            hit = jnp.isin(x[:, 3], jnp.asarray(hit_codes, x.dtype))
            wrong = jax.nn.one_hot((y + 1) % 3, 3, dtype=x.dtype)
            return x.at[:, :3].set(jnp.where(hit[:, None], wrong, x[:, :3]))
        return attack

    res = attacks.robust_accuracy_worst_case(logits_fn, jnp.asarray(xs), jnp.asarray(ys),
                                             attacks={"A": flip_where([1, 3]), "B": flip_where([2, 3])},
                                             key=jax.random.key(0), batch_size=4)
    np.testing.assert_array_equal(res.robust, codes == 0)
    assert res.accuracy == pytest.approx(np.mean(codes == 0))
    assert res.clean_accuracy == pytest.approx(np.mean(codes != 4))
    assert res.per_attack == pytest.approx({"A": np.mean(~np.isin(codes, [1, 3, 4])),
                                            "B": np.mean(~np.isin(codes, [2, 3, 4]))})
    # the worst case is never above any single attack
    assert res.accuracy <= min(res.per_attack.values())
    with pytest.raises(ValueError, match="at least one attack"):
        attacks.robust_accuracy_worst_case(logits_fn, jnp.asarray(xs), jnp.asarray(ys), attacks={})


def test_apgd_rejects_malformed_arguments():
    logits_fn = _mlp_logits(9, 16, 8, 3)
    xs, ys, key = _images(10, 3), jnp.array([0, 1, 2]), jax.random.key(0)
    for kwargs, match in [(dict(norm="l1"), "norm"), (dict(loss="hinge"), "loss"), (dict(eps=-1.0), "eps"),
                          (dict(num_steps=-2), "num_steps"), (dict(restarts=0), "restarts"),
                          (dict(loss="dlr_targeted"), "at least 4 classes"), (dict(rho=1.5), "rho"),
                          (dict(key=None), "key")]:
        with pytest.raises(ValueError, match=match):
            attacks.apgd(logits_fn, xs, ys, **{"eps": 0.1, "key": key, **kwargs})
    with pytest.raises(ValueError, match="at least 3 classes"):
        attacks.apgd(lambda x: logits_fn(x)[:, :2], xs, ys % 2, eps=0.1, loss="dlr", key=key)
    with pytest.raises(ValueError, match="losses"):
        attacks.apgd_attacks("l2", 1.0, losses=("ce", "cw"))


@pytest.mark.slow
def test_apgd_is_at_least_as_strong_as_pgd_on_a_trained_cnn():
    """The quickstart network at the compare runs' width 1/4 (small CNN on mnist5k, 2 epochs), 250 test images,
    100 steps each: APGD-CE alone, and the worst case of APGD-CE and APGD-DLR, against PGD with Madry's step
    2.5 eps / steps. ~3 minutes on 2 CPU cores."""
    with xla_optimizations(True):  # seconds of compilation save minutes of running
        _apgd_against_pgd()


def _apgd_against_pgd():
    import os
    import tempfile

    from lcnn_jax import data
    from lcnn_jax.configs import load_config
    from lcnn_jax.train import fit, load_trained

    config = load_config(os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "quickstart.py"))
    config.model.kwargs = {"width_mult": 0.25}
    config.train.num_epochs = 2
    config.train.progress = False
    with tempfile.TemporaryDirectory() as tmp:
        fit(config, tmp)
        _, model, state, _ = load_trained(tmp)
    variables = {"params": state.params, **state.model_state}
    logits_fn = jax.jit(lambda xs: model.apply(variables, xs, train=False))
    test = data.load_split("mnist5k", "test")
    xs, ys = jnp.asarray(test.images[:250]), jnp.asarray(test.labels[:250])
    key = jax.random.key(0)
    for norm, eps in (("l2", 1.5), ("linf", 0.1)):
        pgd = functools.partial(attacks.pgd, norm=norm, eps=eps, step_size=2.5 * eps / 100, num_steps=100)
        acc_pgd = attacks.robust_accuracy(logits_fn, xs, ys, attack=pgd, key=key)
        acc_apgd_ce = attacks.robust_accuracy(logits_fn, xs, ys, key=key,
                                              attack=functools.partial(attacks.apgd, norm=norm, eps=eps))
        worst = attacks.robust_accuracy_worst_case(logits_fn, xs, ys, attacks=attacks.apgd_attacks(norm, eps),
                                                   key=key)
        print(f"{norm} eps={eps}: clean {worst.clean_accuracy:.3f}  PGD-100 {acc_pgd:.3f}  APGD-CE {acc_apgd_ce:.3f}"
              f"  APGD-DLR {worst.per_attack['apgd_dlr']:.3f}  worst case {worst.accuracy:.3f}")
        assert worst.accuracy <= acc_apgd_ce <= acc_pgd
        assert acc_pgd < worst.clean_accuracy  # the radius is one where the attacks matter
