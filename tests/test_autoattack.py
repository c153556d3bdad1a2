"""AutoAttack and its members: APGD's reference schedule, FAB, Square and the cascade.

Oracles, all independent of the code under test: a NumPy re-statement of fra31/auto-attack's APGD loop (float64,
same start), the reference's checkpoint rule written out, closed-form boundary distances of linear classifiers
(dual norms), the exact minimum-norm adversarial point of a binary linear classifier, and a gradient-masked copy of
a linear classifier that only a gradient-free attack can break.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax import attacks


# ------------------------------------------------------------------------------------------------
# APGD, schedule="reference"
# ------------------------------------------------------------------------------------------------

def _reference_checkpoints(n):
    """fra31's rule as its loop applies it: a counter of iterations since the last check is compared with the
    period k, which starts at max(int(0.22 n), 1) and shrinks by max(int(0.03 n), 1) down to max(int(0.06 n), 1)."""
    k, size_decr, n_min = max(int(0.22 * n), 1), max(int(0.03 * n), 1), max(int(0.06 * n), 1)
    out, counter = [], 0
    for i in range(n):
        counter += 1
        if counter == k:
            out.append(i + 1)
            counter = 0
            k = max(k - size_decr, n_min)
    return tuple(out)


def test_apgd_reference_checkpoints_follow_the_reference_rule():
    for n in (10, 20, 25, 50, 100):
        assert attacks.apgd_checkpoints(n, "reference") == _reference_checkpoints(n), n
    assert attacks.apgd_checkpoints(100, "reference") == attacks.apgd_checkpoints(100, "paper")
    assert attacks.apgd_checkpoints(25, "reference") != attacks.apgd_checkpoints(25, "paper")
    with pytest.raises(ValueError, match="schedule"):
        attacks.apgd_checkpoints(10, "text")


def _numpy_reference_apgd(loss_grad, predict, x, y, x_start, *, eps, norm, n_iter, rho=0.75):
    """fra31/auto-attack ``APGDAttack.attack_single_run`` (L-inf, L2) restated in NumPy; returns the iterate after
    each iteration (after any restart from the best point) and the attack's output (last misclassified iterate, or
    the clean input). ``loss_grad(x) -> (loss per example, gradient)``."""
    n = x.shape[0]
    flat = lambda a: a.reshape(n, -1)
    col = lambda v: v.reshape((n,) + (1,) * (x.ndim - 1))

    def normalize(a):
        t = np.abs(flat(a)).max(1) if norm == "linf" else np.sqrt((flat(a) ** 2).sum(1))
        return a / col(t + 1e-12)

    def l2_proj(a):
        d = a - x
        nd = np.sqrt((flat(d) ** 2).sum(1))
        return np.clip(x + normalize(d) * col(np.minimum(eps, nd)), 0.0, 1.0)

    k, size_decr, n_min = max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    x_adv = np.clip(x_start, 0.0, 1.0)
    x_best, x_best_adv = x_adv.copy(), x_adv.copy()
    loss_steps = np.zeros((n_iter, n))
    loss, grad = loss_grad(x_adv)
    grad_best = grad.copy()
    acc = predict(x_adv) == y
    loss_best = loss.copy()
    step = 2.0 * eps * np.ones(n)
    x_old = x_adv.copy()
    counter3 = 0
    loss_best_last, reduced_last = loss_best.copy(), np.ones(n, bool)
    iterates = []
    for i in range(n_iter):
        grad2 = x_adv - x_old
        x_old = x_adv.copy()
        a = 0.75 if i > 0 else 1.0
        if norm == "linf":
            x1 = x_adv + col(step) * np.sign(grad)
            x1 = np.clip(np.minimum(np.maximum(x1, x - eps), x + eps), 0.0, 1.0)
            x1 = np.clip(np.minimum(np.maximum(x_adv + (x1 - x_adv) * a + grad2 * (1 - a), x - eps), x + eps), 0, 1)
        else:
            x1 = l2_proj(x_adv + col(step) * normalize(grad))
            x1 = l2_proj(x_adv + (x1 - x_adv) * a + grad2 * (1 - a))
        x_adv = x1
        loss, grad = loss_grad(x_adv)
        pred = predict(x_adv) == y
        acc = acc & pred
        x_best_adv[~pred] = x_adv[~pred]
        loss_steps[i] = loss
        better = loss > loss_best
        x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], loss[better]
        counter3 += 1
        if counter3 == k:
            t = np.zeros(n)
            for c in range(k):
                t += loss_steps[i - c] > loss_steps[i - c - 1]  # index -1: the last, unfilled row
            osc = t <= k * rho
            no_impr = ~reduced_last & (loss_best_last >= loss_best)
            osc = osc | no_impr
            reduced_last, loss_best_last = osc.copy(), loss_best.copy()
            step[osc] /= 2.0
            x_adv[osc], grad[osc] = x_best[osc], grad_best[osc]
            k = max(k - size_decr, n_min)
            counter3 = 0
        iterates.append(x_adv.copy())
    out = np.where(col(~acc), x_best_adv, x)
    return iterates, out


def _tanh_net(seed, d, h, k):
    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((d, h)) / np.sqrt(d) * 3, rng.standard_normal((h, k))
    return lambda xs: jnp.tanh(xs.reshape(xs.shape[0], -1) @ jnp.asarray(w1, xs.dtype)) @ jnp.asarray(w2, xs.dtype)


@pytest.mark.slow  # a long oracle test: CI runs it with -m slow (the default suite stays < 3 min)
@pytest.mark.parametrize("norm,eps,loss,n_iter", [("linf", 0.08, "ce", 50), ("linf", 0.08, "dlr", 50),
                                                  ("l2", 0.6, "ce", 40)])
def test_apgd_reference_schedule_equals_a_numpy_restatement_of_the_reference_loop(norm, eps, loss, n_iter, x64):
    f = _tanh_net(3, 16, 12, 5)
    rng = np.random.default_rng(4)
    xs = jnp.asarray(rng.uniform(0.2, 0.8, (8, 4, 4, 1)), jnp.float64)
    ys = jnp.argmax(f(xs), -1).astype(jnp.int32)
    per_ex = (lambda z, y: attacks.cross_entropy(z, y)) if loss == "ce" else (lambda z, y: attacks.dlr_loss(z, y))

    def loss_grad(x):
        xj = jnp.asarray(x)
        grad = jax.grad(lambda v: jnp.sum(per_ex(f(v), ys)))(xj)
        return np.array(per_ex(f(xj), ys)), np.array(grad)

    predict = lambda x: np.asarray(jnp.argmax(f(jnp.asarray(x)), -1))
    start, body, _ = attacks.apgd_machine(f, xs, ys, None, jnp.asarray(eps, jnp.float64), norm=norm, loss=loss,
                                          num_steps=n_iter, schedule="reference")
    key = jax.random.key(11)
    run_key = jax.random.fold_in(key, 0)  # apgd's first (only) run
    s = jax.jit(start)(run_key)
    body = jax.jit(body)
    ours = []
    for i in range(30):
        s = body(jnp.asarray(i, jnp.int32), s)
        ours.append(np.asarray(s["x"]))
    theirs, out = _numpy_reference_apgd(loss_grad, predict, np.asarray(xs), np.asarray(ys),
                                        np.asarray(jax.jit(start)(run_key)["x"]), eps=eps, norm=norm, n_iter=n_iter)
    for i in range(30):
        np.testing.assert_allclose(ours[i], theirs[i], rtol=0, atol=1e-9, err_msg=f"iterate {i}")
    # the whole attack: the same key gives the same start, so the same output (last misclassified iterate or clean)
    x_adv = attacks.apgd(f, xs, ys, norm=norm, eps=eps, num_steps=n_iter, loss=loss, key=key, schedule="reference")
    np.testing.assert_allclose(np.asarray(x_adv), out, rtol=0, atol=1e-9)
    assert (np.asarray(jnp.argmax(f(x_adv), -1)) != np.asarray(ys)).any()  # the radius makes the test non-trivial


# ------------------------------------------------------------------------------------------------
# The cascade on linear classifiers: closed-form distances to the boundary (dual norms)
# ------------------------------------------------------------------------------------------------

def _linear_logits(p, x):
    return (x.reshape(x.shape[0], -1) - 0.5) @ p


def _masked_logits(p, x):
    """The same classifier, its input behind stop_gradient: every input gradient is 0."""
    return _linear_logits(p, jax.lax.stop_gradient(x))


# One function object per model and one chunk size (BS) for every test: the compiled pieces are cached per function
# and shape, so the tests share them.
BS = 16


def _linear10(seed=0, n=40, d=64, k=10):
    """``logits = (x - 0.5) W``, inputs in [0.3, 0.7] shaped (n, 8, 8, 1); the exact distance of x to the decision
    boundary (ignoring the box, which the attacks never reach here) is ``min_{j != y} m_j / ||w_y - w_j||_*``."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, k))
    xs = rng.uniform(0.3, 0.7, (n, 8, 8, 1))
    logits_fn = _linear_logits
    z = (xs.reshape(n, -1) - 0.5) @ w
    ys = np.argmax(z, -1)
    dw = w[:, ys].T[:, None, :] - w.T[None, :, :]  # (n, k, d): w_y - w_j
    margin = z[np.arange(n), ys][:, None] - z
    dist = {}
    for norm, dual in (("linf", 1), ("l2", 2)):
        q = margin / np.maximum(np.linalg.norm(dw, ord=dual, axis=-1), 1e-300)
        q[np.arange(n), ys] = np.inf
        dist[norm] = q.min(1)
    return logits_fn, jnp.asarray(w, jnp.float32), jnp.asarray(xs, jnp.float32), jnp.asarray(ys), dist


def _check_claims(logits_fn, p, xs, ys, res, norm, eps):
    """Every claimed break is a misclassified point of the ball and the box; robust points are correct."""
    broken = ~res.robust
    xa = np.asarray(res.x_adv, np.float64)
    x0 = np.asarray(xs, np.float64)
    pred = np.asarray(jnp.argmax(logits_fn(p, jnp.asarray(res.x_adv)), -1))
    assert np.all(pred[broken] != np.asarray(ys)[broken])
    d = (xa - x0).reshape(len(x0), -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    assert np.all(size <= eps * (1 + 1e-5) + 1e-7)
    assert xa.min() >= 0.0 and xa.max() <= 1.0
    np.testing.assert_array_equal(xa[res.robust], x0[res.robust])
    assert set(res.broken_by[broken]) <= set(attacks.AUTOATTACK_STAGES) and set(res.broken_by[res.robust]) == {""}


@pytest.mark.slow  # a long oracle test: CI runs it with -m slow (the default suite stays < 3 min)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_autoattack_breaks_every_point_closer_than_0_9_eps_of_a_linear_classifier(norm):
    logits_fn, w, xs, ys, dist = _linear10()
    eps = float(np.quantile(dist[norm], 0.5))
    res = attacks.autoattack(logits_fn, xs, ys, norm=norm, eps=eps, key=jax.random.key(0), params=w,
                             num_steps=10, num_queries=10, n_target_classes=3, progress=False, batch_size=BS,
                             segment=1)
    _check_claims(logits_fn, w, xs, ys, res, norm, eps)
    close = dist[norm] < 0.9 * eps
    assert close.sum() >= 10 and not res.robust[close].any()
    assert not (~res.robust & (dist[norm] > eps * (1 + 1e-4))).any()  # nothing beyond the boundary distance
    stages = list(res.per_stage)
    assert stages == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert res.per_stage["clean"] == 1.0 and np.isclose(res.per_stage["square"], res.robust.mean())
    assert all(a >= b for a, b in zip(res.per_stage.values(), list(res.per_stage.values())[1:]))


@pytest.mark.slow
def test_plus_version_runs_its_six_stages_in_the_reference_order():
    """Slow: it compiles every stage (untargeted FAB and APGD-DLR only for this test)."""
    logits_fn, w, xs, ys, dist = _linear10(seed=2, n=12)
    eps = float(np.quantile(dist["l2"], 0.8))
    log: list = []
    res = attacks.autoattack(logits_fn, xs, ys, norm="l2", eps=eps, key=jax.random.key(0), params=w, version="plus",
                             num_steps=5, num_queries=20, n_target_classes=2, progress=False, log=log, batch_size=BS,
                             segment=1)
    _check_claims(logits_fn, w, xs, ys, res, "l2", eps)
    assert list(res.per_stage) == ["clean", "apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert [(r["stage"], r["run"]) for r in log] == [(s, r) for s, n in (("apgd-ce", 5), ("apgd-dlr", 5), ("fab", 5),
                                                                         ("square", 1), ("apgd-t", 2), ("fab-t", 2))
                                                     for r in range(n)]
    # each run attacks only the points still robust before it
    for prev, nxt in zip(log, log[1:]):
        assert nxt["points"] == prev["points"] - prev["broken"]
    assert log[0]["points"] == 12 and (~res.robust).sum() == sum(r["broken"] for r in log)
    # the points of a run (one chunk, <= BS) are padded by fewer than BS / 8 rows (powers of two padded 12 to 16)
    assert all(0 <= r["padded"] - r["points"] < BS // 8 for r in log if r["points"])


@pytest.mark.slow  # a long oracle test: CI runs it with -m slow (the default suite stays < 3 min)
def test_only_square_breaks_a_gradient_masked_classifier():
    """The same classifier behind stop_gradient: APGD and FAB see a zero gradient and find nothing on points at
    0.35-0.7 eps (APGD's random start cannot reach them), Square breaks >= 80 % of them."""
    logits_fn, w, xs, ys, dist = _linear10(seed=1, n=60)
    masked = _masked_logits
    eps = float(np.quantile(dist["linf"], 0.7))
    sel = (dist["linf"] > 0.35 * eps) & (dist["linf"] < 0.7 * eps)
    assert sel.sum() >= 10
    xs, ys = xs[sel], ys[sel]
    kw = dict(norm="linf", eps=eps, params=w, num_steps=10, n_target_classes=3, progress=False, batch_size=BS,
              segment=1)
    grad_only = attacks.autoattack(masked, xs, ys, key=jax.random.key(1), version=("apgd-ce", "apgd-t", "fab-t"), **kw)
    assert grad_only.robust.all()
    res = attacks.autoattack(masked, xs, ys, key=jax.random.key(2), num_queries=2000, **kw)
    _check_claims(masked, w, xs, ys, res, "linf", eps)
    assert set(res.broken_by[~res.robust]) == {"square"}
    assert (~res.robust).mean() >= 0.8


def test_autoattack_rejects_bad_input_before_compiling(caplog):
    logits_fn, w, xs, ys, _ = _linear10(n=6)
    kw = dict(norm="linf", eps=0.1, key=jax.random.key(0), params=w, progress=False)
    bad = [(dict(version="fast"), "version"), (dict(version=("apgd-ce", "pgd")), "version"),
           (dict(version=()), "version"), (dict(norm="l1"), "norm"), (dict(eps=0.0), "eps"),
           (dict(eps=float("nan")), "eps"), (dict(eps=-1.0), "eps"), (dict(key=None), "key"),
           (dict(batch_size=0), "batch_size"), (dict(schedule="text"), "schedule")]
    bad_labels = jnp.asarray(np.where(np.arange(6) == 0, 10, np.asarray(ys)))  # made before compilations are watched
    short_labels, flat = jnp.asarray(np.asarray(ys)[:5]), jnp.asarray(np.asarray(xs).reshape(6, -1))
    labels3 = jnp.asarray(np.asarray(ys) % 3)
    with jax.log_compiles(True), caplog.at_level("DEBUG"):
        caplog.clear()
        for change, match in bad:
            with pytest.raises(ValueError, match=match):
                attacks.autoattack(logits_fn, xs, ys, **{**kw, **change})
        with pytest.raises(ValueError, match="labels"):
            attacks.autoattack(logits_fn, xs, bad_labels, **kw)
        with pytest.raises(ValueError, match="same leading"):
            attacks.autoattack(logits_fn, xs, short_labels, **kw)
        with pytest.raises(ValueError, match="images"):
            attacks.autoattack(lambda p, x: logits_fn(p, x), flat, ys, **kw)
        with pytest.raises(ValueError, match="classes"):
            attacks.autoattack(lambda p, x: logits_fn(p, x)[:, :3], xs, labels3, **kw)
        assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


@pytest.mark.slow  # a long oracle test: CI runs it with -m slow (the default suite stays < 3 min)
def test_measure_reports_autoattack_columns_and_which_stage_broke_how_many():
    from lcnn_jax import compare, report
    from lcnn_jax.nn import make_model

    model = make_model("mlp", 10, widths=(8,))
    xs = np.random.default_rng(0).uniform(size=(6, 4, 4, 1)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), xs[:1])
    z = np.asarray(model.apply(variables, xs))
    ys = np.where(np.arange(6) < 4, np.argmax(z, -1), (np.argmax(z, -1) + 1) % 10)  # 4 correct, 2 wrong
    cfg = report.measure_defaults()
    cfg.update(dict(robust_attacks=("autoattack",), pgd_linf_eps=(), pgd_l2_eps=(50.0,), noise_std=()))
    assert not report.measure_config_problems(cfg)
    out = report.robustness(model, variables, xs, ys, cfg, jax.random.PRNGKey(1), 4)
    # a radius that covers the box: APGD-CE breaks every correct point, the later stages have nothing left to run on
    assert out["aa_l2_50"]["mean"] == 0.0 and out["accuracy"]["mean"] == pytest.approx(4 / 6)
    assert out["aa_l2_50"]["broken_by"] == {"apgd-ce": 4, "apgd-t": 0, "fab-t": 0, "square": 0}
    text = report.format_report({"test": out})
    assert "aa_l2_50 (test): broken by apgd-ce 4, apgd-t 0, fab-t 0, square 0" in text
    assert "aa_l2_50" in [c["name"] for c in compare.columns(cfg)]
    assert "aa_l2_50" not in report.attack_suite(cfg)
    assert any(n.startswith("AA:") for n in compare.robustness_notes(cfg))


@pytest.mark.slow
def test_autoattack_is_at_least_as_strong_as_apgd_and_pgd_on_a_trained_cnn():
    """The quickstart CNN at width 1/4 (mnist5k, 2 epochs), 128 test images, L-inf 0.1 and L2 1.5: the standard
    cascade (100 steps, 9 targets, 1000 queries) leaves no more robust points than the worst case of APGD-CE and
    APGD-DLR (100 steps), which leaves no more than PGD-100 (Madry's step 2.5 eps / steps). Minutes on a CPU; one
    run gave (L-inf: PGD 0.703, APGD 0.680, AutoAttack 0.672; L2: 0.570, 0.523, 0.523)."""
    import os
    import tempfile

    from _lcnn_helpers import xla_optimizations
    from lcnn_jax import data, train
    from lcnn_jax.configs import load_config

    with xla_optimizations(True):
        config = load_config(os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "quickstart.py"))
        config.model.kwargs = {"width_mult": 0.25}
        config.train.num_epochs = 2
        config.train.progress = False
        with tempfile.TemporaryDirectory() as tmp:
            train.fit(config, tmp)
            _, model, state, _ = train.load_trained(tmp)
        variables = {"params": state.params, **state.model_state}
        apply = lambda v, xs: model.apply(v, xs, train=False)  # noqa: E731
        logits_fn = jax.jit(lambda xs: apply(variables, xs))
        test = data.load_split("mnist5k", "test")
        xs, ys = jnp.asarray(test.images[:128]), jnp.asarray(test.labels[:128])
        key = jax.random.key(0)
        for norm, eps in (("linf", 0.1), ("l2", 1.5)):
            pgd = functools.partial(attacks.pgd, norm=norm, eps=eps, step_size=2.5 * eps / 100, num_steps=100)
            acc_pgd = attacks.robust_accuracy(logits_fn, xs, ys, attack=pgd, key=key)
            worst = attacks.robust_accuracy_worst_case(logits_fn, xs, ys, attacks=attacks.apgd_attacks(norm, eps),
                                                       key=key)
            res = attacks.autoattack(apply, xs, ys, norm=norm, eps=eps, key=key, params=variables, num_queries=1000,
                                     progress=False)
            print(norm, eps, acc_pgd, worst.accuracy, res.per_stage)
            assert res.per_stage["clean"] == pytest.approx(worst.clean_accuracy)
            assert res.robust.mean() <= worst.accuracy <= acc_pgd
            assert acc_pgd < worst.clean_accuracy
