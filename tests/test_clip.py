"""Tests for CLIP (SPEC 1.3) and the discrepancy principle shared with ``weight_l2``.

Oracles: the SVD of an affine network's matrix (its Lipschitz constant), difference quotients and their parameter
gradients written here with ``jnp.linalg.norm`` (not the library's ``pair_quotients``), closed-form coefficient
updates, and ``max |f'|`` on a dense grid for the 1-D regression toy. Models are tiny plain functions.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcnn_jax.data import regression_toy
from lcnn_jax.regularizers.base import Regularizer
from lcnn_jax.regularizers.clip import clip, discrepancy_principle, discrepancy_update, draw_pairs
from lcnn_jax.regularizers.weight import weight_l2

EXAMPLE_SHAPE = (2, 3)  # D = 6 input dimensions
K = 4


# ---------------------------------------------------------------------------------------------- tiny models
def affine_params(seed=0, dtype=None):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((K, 6)), dtype), "b": jnp.asarray(rng.standard_normal(K), dtype)}


def affine_apply(params, xs):
    return xs.reshape(xs.shape[0], -1) @ params["w"].T + params["b"]


def mlp_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w1": jnp.asarray(rng.standard_normal((6, 7)) / np.sqrt(6)),
            "b1": jnp.asarray(0.1 * rng.standard_normal(7)),
            "w2": jnp.asarray(rng.standard_normal((7, K)) / np.sqrt(7)),
            "b2": jnp.asarray(0.1 * rng.standard_normal(K))}


def mlp_apply(params, xs):
    h = jnp.tanh(xs.reshape(xs.shape[0], -1) @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def make_batch(seed=1, batch=8):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.uniform(size=(batch,) + EXAMPLE_SHAPE)),
            "label": jnp.asarray(rng.integers(0, K, size=batch), jnp.int32)}


def quotient_oracle(apply_fn, params, u, v):
    """||f(u) - f(v)|| / ||u - v|| for one pair, written independently of the library."""
    fu, fv = apply_fn(params, u[None])[0], apply_fn(params, v[None])[0]
    return jnp.linalg.norm(fu - fv) / jnp.linalg.norm((u - v).ravel())


def rows_of(rows, images):
    """For each row of ``rows``, the index of the identical row of ``images`` (-1 if none)."""
    r = np.asarray(rows).reshape(len(rows), -1)
    im = np.asarray(images).reshape(len(images), -1)
    eq = np.all(r[:, None, :] == im[None, :, :], axis=-1)
    return np.where(eq.any(axis=1), eq.argmax(axis=1), -1)


def jitted_loss(reg, apply_fn, params, batch):
    return jax.jit(lambda st, k: reg.loss(params, st, batch, k, apply_fn))


# ---------------------------------------------------------------------------------------------- pair ascent
@pytest.mark.parametrize("init", ["pairs", "perturb"])
def test_affine_ascent_reaches_spectral_norm_never_above(x64, init):
    params, batch = affine_params(), make_batch()
    sigma_max = np.linalg.svd(np.asarray(params["w"]), compute_uv=False)[0]
    reg = clip(1.0, num_pairs=16, init=init, redraw_every_epochs=None)
    state = reg.init(jax.random.PRNGKey(0), params, batch)
    step = jitted_loss(reg, affine_apply, params, batch)
    history = []
    for i in range(60):
        value, state, metrics = step(state, jax.random.PRNGKey(i))
        history.append(float(metrics["max_quotient"]))
        # every quotient is attained by a pair, so it can never exceed the Lipschitz constant sigma_max(W)
        assert np.all(np.asarray(state["quotient"]) <= sigma_max * (1 + 1e-12))
    history = np.array(history)
    assert history[0] < sigma_max * (1 - 1e-3)  # the draw starts visibly below the constant ...
    np.testing.assert_allclose(history[-1], sigma_max, rtol=1e-9)  # ... and the ascent climbs to it
    assert np.all(np.diff(history) >= -1e-12)  # fixed network: accepted steps only ever raise the maximum
    np.testing.assert_allclose(value, history[-1], rtol=1e-12)  # lam = 1, plain quotient


def test_pair_step_sizes_grow_on_success_and_shrink_on_failure(x64):
    params, batch = affine_params(), make_batch()
    reg = clip(1.0, num_pairs=16, init="pairs", redraw_every_epochs=None, init_step=1e-3)
    state = reg.init(jax.random.PRNGKey(0), params, batch)
    _, s1, m1 = jitted_loss(reg, affine_apply, params, batch)(state, jax.random.PRNGKey(1))
    # a tiny ascent step on a smooth quotient always succeeds: every pair accepts and grows its step by 1.3
    np.testing.assert_allclose(s1["step"], 1.3e-3, rtol=1e-12)
    assert float(m1["accept_rate"]) == 1.0
    # a constant network (W = 0): every quotient is 0, nothing can increase, every step shrinks by 1.3
    flat = {"w": jnp.zeros_like(params["w"]), "b": params["b"]}
    _, s2, m2 = jitted_loss(reg, affine_apply, flat, batch)(state, jax.random.PRNGKey(1))
    np.testing.assert_allclose(s2["step"], 1e-3 / 1.3, rtol=1e-12)
    np.testing.assert_array_equal(s2["u"], state["u"])
    assert float(m2["accept_rate"]) == 0.0


# ---------------------------------------------------------------------------------------------- the penalty
def test_penalty_comes_from_the_argmax_pair_and_no_gradient_reaches_the_pairs(x64):
    params, batch = mlp_params(), make_batch()
    reg = clip(0.7, num_pairs=6, init="pairs", redraw_every_epochs=None)
    key = jax.random.PRNGKey(9)

    def objective(p, uv, st):
        value, new_state, metrics = reg.loss(p, {**st, "u": uv[0], "v": uv[1]}, batch, key, mlp_apply)
        return value, (new_state, metrics)

    # one compiled function: value, new state, and the gradients w.r.t. the parameters AND the pair inputs
    full = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))
    plain = jax.jit(lambda p, st: reg.loss(p, st, batch, key, mlp_apply))
    state = reg.init(jax.random.PRNGKey(0), params, batch)
    for _ in range(3):  # some ascent first, so that the pairs are not the raw draw
        (_, (state, _)), _ = full(params, (state["u"], state["v"]), state)

    (value, (new_state, metrics)), (grads, g_pairs) = full(params, (state["u"], state["v"]), state)
    lam = float(state["coeff"])  # 0.7 rounded to float32: coefficients are float32 arrays

    # oracle: the pairs after this step's ascent, their quotients recomputed here, the argmax pair's gradient
    u, v = new_state["u"], new_state["v"]
    q = np.asarray(jax.jit(jax.vmap(lambda a, b: quotient_oracle(mlp_apply, params, a, b)))(u, v))
    np.testing.assert_allclose(new_state["quotient"], q, rtol=1e-10)
    best = int(np.argmax(q))
    assert q[best] > np.sort(q)[-2] * (1 + 1e-6)  # a strict maximum, so the argmax is unambiguous
    np.testing.assert_allclose(value, lam * q[best], rtol=1e-10)
    np.testing.assert_allclose(metrics["max_quotient"], q[best], rtol=1e-10)
    oracle = jax.jit(jax.grad(lambda p: lam * quotient_oracle(mlp_apply, p, u[best], v[best])))(params)
    for name in params:
        np.testing.assert_allclose(grads[name], oracle[name], rtol=1e-8, atol=1e-14)
    assert max(float(jnp.max(jnp.abs(g))) for g in grads.values()) > 1e-3

    # no gradient reaches the pair inputs, and differentiating does not change what the step does to the state
    assert float(jnp.max(jnp.abs(g_pairs[0]))) == 0.0 and float(jnp.max(jnp.abs(g_pairs[1]))) == 0.0
    value_nd, state_nd, _ = plain(params, state)
    np.testing.assert_allclose(value_nd, value, rtol=1e-14)
    for name in ("u", "v", "step", "quotient", "count"):
        np.testing.assert_array_equal(state_nd[name], new_state[name])

    # replace a non-maximizing pair by a degenerate one (u = v: quotient 0, stays 0 under the ascent)
    other = (best + 1) % len(u)
    changed = {**state, "v": state["v"].at[other].set(state["u"][other])}
    (value2, (state2, _)), (grads2, _) = full(params, (changed["u"], changed["v"]), changed)
    assert float(state2["quotient"][other]) == 0.0
    np.testing.assert_allclose(value2, value, rtol=1e-14)
    for name in params:
        np.testing.assert_allclose(grads2[name], grads[name], rtol=1e-12, atol=1e-15)


def test_squared_option_and_skip_above(x64):
    params, batch = mlp_params(), make_batch()
    state = clip(0.3, num_pairs=6, redraw_every_epochs=None).init(jax.random.PRNGKey(0), params, batch)
    key = jax.random.PRNGKey(5)

    def run(reg, grad=True):
        def loss(p):
            value, _, metrics = reg.loss(p, state, batch, key, mlp_apply)
            return value, metrics

        if not grad:
            value, metrics = jax.jit(loss)(params)
            return float(value), metrics, None
        (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return float(value), metrics, grads

    v_plain, m_plain, g_plain = run(clip(0.3, num_pairs=6, redraw_every_epochs=None))
    lam = float(state["coeff"])  # 0.3 rounded to float32
    lip = v_plain / lam
    v_sq, m_sq, g_sq = run(clip(0.3, num_pairs=6, redraw_every_epochs=None, squared=True))
    np.testing.assert_allclose(v_sq, lam * lip ** 2, rtol=1e-12)  # same pairs, squared quotient
    np.testing.assert_allclose(m_sq["clip"], lip ** 2, rtol=1e-12)
    for name in params:  # d(lam L^2) = 2 L d(lam L)
        np.testing.assert_allclose(g_sq[name], 2 * lip * g_plain[name], rtol=1e-10, atol=1e-15)

    # skip_above compares the penalty as used (squared here): just above it skips, just below it does not
    v_skip, m_skip, g_skip = run(clip(0.3, num_pairs=6, redraw_every_epochs=None, squared=True,
                                      skip_above=0.99 * lip ** 2))
    assert v_skip == 0.0 and float(m_skip["skipped"]) == 1.0 and float(m_skip["clip"]) == 0.0
    np.testing.assert_allclose(m_skip["max_quotient"], lip, rtol=1e-12)  # still logged
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in g_skip.values())
    v_keep, m_keep, _ = run(clip(0.3, num_pairs=6, redraw_every_epochs=None, squared=True,
                                 skip_above=1.01 * lip ** 2), grad=False)
    np.testing.assert_allclose(v_keep, v_sq, rtol=1e-14)
    assert float(m_keep["skipped"]) == 0.0
    # unsquared: the threshold applies to the plain quotient
    v_skip1, _, _ = run(clip(0.3, num_pairs=6, redraw_every_epochs=None, skip_above=0.99 * lip), grad=False)
    assert v_skip1 == 0.0


# ---------------------------------------------------------------------------------------------- pools and redraws
def test_init_draws_fixed_size_pool_from_the_batch():
    params, batch = affine_params(), make_batch(batch=5)
    reg = clip(1.0, num_pairs=12, init="pairs", init_step=0.5)  # more pairs than images: with replacement
    state = reg.init(jax.random.PRNGKey(3), params, batch)
    assert state["u"].shape == state["v"].shape == (12,) + EXAMPLE_SHAPE
    iu, iv = rows_of(state["u"], batch["image"]), rows_of(state["v"], batch["image"])
    assert np.all(iu >= 0) and np.all(iv >= 0) and np.all(iu != iv)  # two different batch images per pair
    np.testing.assert_array_equal(state["step"], np.full(12, 0.5, np.float32))
    assert state["coeff"].dtype == jnp.float32 and state["count"].dtype == jnp.int32
    # enough rows: no image is used twice
    iu, iv = (np.asarray(i) for i in jax.jit(lambda k: draw_pairs(k, jnp.arange(10.0)[:, None], 5, init="pairs"))(
        jax.random.PRNGKey(0)))
    assert len(set(iu.ravel()) | set(iv.ravel())) == 10


def test_perturb_pairs_are_an_image_and_a_gaussian_perturbation():
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(50, 40)), jnp.float32)
    u, v = draw_pairs(jax.random.PRNGKey(1), images, 30, init="perturb", perturb_scale=0.05)
    assert np.all(rows_of(u, images) >= 0) and len(set(rows_of(u, images))) == 30
    noise = np.asarray(v - u)
    assert abs(noise.mean()) < 0.005 and abs(noise.std() / 0.05 - 1) < 0.05  # 1200 N(0, 0.05^2) draws


def test_pool_images_redraw_on_the_host_every_n_epochs():
    params, batch = affine_params(dtype=jnp.float32), make_batch()
    batch = {**batch, "image": batch["image"].astype(jnp.float32)}
    pool = np.random.default_rng(7).uniform(size=(40,) + EXAMPLE_SHAPE).astype(np.float32)
    reg = clip(1.0, num_pairs=10, init="pairs", redraw_every_epochs=2, pool_images=pool, init_step=0.25)
    state = reg.init(jax.random.PRNGKey(0), params, batch)
    assert np.all(rows_of(state["u"], pool) >= 0) and np.all(rows_of(state["v"], pool) >= 0)  # not the batch
    _, state, _ = jitted_loss(reg, affine_apply, params, batch)(state, jax.random.PRNGKey(1))
    moved_u = np.asarray(state["u"])
    assert np.all(rows_of(moved_u, pool) == -1)  # the ascent moved every pair off the pool

    after0 = reg.epoch_end(state, jnp.float32(0.5), 0)
    np.testing.assert_array_equal(after0["u"], moved_u)  # epoch 0 of 2: no redraw
    after1 = reg.epoch_end(after0, jnp.float32(0.5), 1)
    iu, iv = rows_of(after1["u"], pool), rows_of(after1["v"], pool)
    assert np.all(iu >= 0) and np.all(iv >= 0) and np.all(iu != iv)
    np.testing.assert_array_equal(after1["step"], np.full(10, 0.25, np.float32))
    for k in after1:  # shapes and dtypes kept: the compiled step is reused
        assert after1[k].shape == state[k].shape and after1[k].dtype == state[k].dtype, k
    assert int(after1["redraw"]) == 0


def test_traced_init_with_a_pool_draws_the_same_pairs():
    params, batch = affine_params(dtype=jnp.float32), make_batch()
    batch = {**batch, "image": batch["image"].astype(jnp.float32)}
    pool = np.random.default_rng(7).uniform(size=(40,) + EXAMPLE_SHAPE).astype(np.float32)
    reg = clip(1.0, num_pairs=10, perturb_dist="uniform", pool_images=pool)
    host = reg.init(jax.random.PRNGKey(4), params, batch)
    traced = jax.jit(reg.init)(jax.random.PRNGKey(4), params, batch)  # e.g. a config check under eval_shape
    np.testing.assert_array_equal(traced["u"], host["u"])  # the same pool rows
    for k in host:  # v = u + noise may differ by one float32 rounding (the compiled add fuses differently)
        np.testing.assert_allclose(traced[k], host[k], rtol=0, atol=1e-7)
    assert np.all(rows_of(host["u"], pool) >= 0)


def test_without_pool_a_redraw_takes_the_next_batch():
    params = {"w": jnp.zeros((K, 6)), "b": jnp.ones(K)}  # constant network: the ascent never moves a pair
    batch0, batch1 = make_batch(1), make_batch(2)
    reg = clip(1.0, num_pairs=10, init="perturb", redraw_every_epochs=1)
    state = reg.init(jax.random.PRNGKey(0), params, batch0)
    assert np.all(rows_of(state["u"], batch0["image"]) >= 0)
    state = reg.epoch_end(state, jnp.float32(0.5), 0)
    assert int(state["redraw"]) == 1
    loss = jax.jit(lambda st, b, k: reg.loss(params, st, b, k, affine_apply))
    _, state, _ = loss(state, batch1, jax.random.PRNGKey(5))
    assert np.all(rows_of(state["u"], batch1["image"]) >= 0)  # fresh pairs from the step's own batch
    assert int(state["redraw"]) == 0
    u_before = np.asarray(state["u"])
    _, state, _ = loss(state, make_batch(3), jax.random.PRNGKey(6))
    np.testing.assert_array_equal(state["u"], u_before)  # no redraw pending: pairs kept


# ---------------------------------------------------------------------------------------------- discrepancy
def test_discrepancy_update_direction_and_floor():
    lam = jnp.asarray(0.25, jnp.float32)
    up = discrepancy_update(lam, jnp.float32(0.95), target=0.9, dlam=0.1)
    down = discrepancy_update(lam, jnp.float32(0.85), target=0.9, dlam=0.1)
    np.testing.assert_allclose([up, down], [0.35, 0.15], rtol=1e-6)
    at = discrepancy_update(lam, jnp.float32(0.9), target=0.9, dlam=0.1)  # not above the target: decrease
    np.testing.assert_allclose(at, 0.15, rtol=1e-6)
    assert up.dtype == jnp.float32 and up.shape == ()
    floor = discrepancy_update(jnp.asarray(0.05, jnp.float32), 0.1, target=0.9, dlam=0.1)
    assert float(floor) == 0.0
    assert float(discrepancy_update(floor, 0.1, target=0.9, dlam=0.1)) == 0.0


@pytest.mark.parametrize("make", [
    lambda **kw: clip(0.3, num_pairs=4, redraw_every_epochs=None, **kw),
    lambda **kw: weight_l2(0.3, **kw),
], ids=["clip", "weight_l2"])
def test_epoch_end_moves_lambda_after_warmup_and_never_below_zero(make):
    params, batch = affine_params(dtype=jnp.float32), make_batch()
    reg = make(target=0.9, dlam=0.1, warmup_epochs=2)
    state = reg.init(jax.random.PRNGKey(0), params, batch)
    lam = lambda s: float(s["coeff"])  # noqa: E731
    assert lam(state) == pytest.approx(0.3)
    for epoch in (0, 1):  # warm-up: the coefficient stays put whatever the accuracy
        state = reg.epoch_end(state, jnp.float32(0.99), epoch)
        assert lam(state) == pytest.approx(0.3)
    state = reg.epoch_end(state, jnp.float32(0.95), 2)
    assert lam(state) == pytest.approx(0.4, rel=1e-6)
    accs = [0.5] * 6  # far below the target: down to 0 and no further
    expected = [0.3, 0.2, 0.1, 0.0, 0.0, 0.0]
    for epoch, (acc, exp) in enumerate(zip(accs, expected), start=3):
        state = reg.epoch_end(state, jnp.float32(acc), epoch)
        assert lam(state) == pytest.approx(exp, abs=1e-6)
        assert lam(state) >= 0.0
    assert state["coeff"].dtype == jnp.float32 and state["coeff"].shape == ()

    # the reference's warm-up: train with warmup_coeff first, switch to coeff at the end of the warm-up
    reg = make(target=0.9, dlam=0.1, warmup_epochs=2, warmup_coeff=0.0)
    state = reg.init(jax.random.PRNGKey(0), params, batch)
    assert lam(state) == 0.0
    state = reg.epoch_end(state, jnp.float32(0.99), 0)
    assert lam(state) == 0.0
    state = reg.epoch_end(state, jnp.float32(0.99), 1)
    assert lam(state) == pytest.approx(0.3)
    state = reg.epoch_end(state, jnp.float32(0.5), 2)
    assert lam(state) == pytest.approx(0.2, rel=1e-6)


def test_fixed_lambda_without_target_and_weight_l2_default_has_no_hook():
    params, batch = affine_params(dtype=jnp.float32), make_batch()
    reg = clip(0.3, num_pairs=4, redraw_every_epochs=1)
    state = reg.init(jax.random.PRNGKey(0), params, batch)
    for epoch, acc in enumerate([0.99, 0.1, 0.99]):
        state = reg.epoch_end(state, jnp.float32(acc), epoch)
        assert float(state["coeff"]) == pytest.approx(0.3)
    assert clip(0.3, redraw_every_epochs=None).epoch_end is None
    assert weight_l2(0.3).epoch_end is None
    initial, hook = discrepancy_principle(0.3, target=None)
    assert initial == 0.3 and hook is None


def test_weight_l2_penalty_follows_the_moved_coefficient():
    params, batch = affine_params(dtype=jnp.float32), make_batch()
    reg = weight_l2(0.3, target=0.9, dlam=0.2)
    state = reg.init(jax.random.PRNGKey(0), params, batch)
    sq = sum(float(jnp.sum(p ** 2)) for p in params.values())
    value, _, _ = reg.loss(params, state, batch, None, affine_apply)
    np.testing.assert_allclose(value, 0.3 * sq, rtol=1e-6)
    state = reg.epoch_end(state, jnp.float32(0.95), 0)
    value, _, _ = reg.loss(params, state, batch, None, affine_apply)
    np.testing.assert_allclose(value, 0.5 * sq, rtol=1e-6)


def test_changing_lambda_does_not_recompile():
    params = affine_params(dtype=jnp.float32)
    batch = {**make_batch(), "image": make_batch()["image"].astype(jnp.float32)}
    reg = clip(0.5, num_pairs=4, target=0.9, dlam=0.25, redraw_every_epochs=2)
    state = reg.init(jax.random.PRNGKey(0), params, batch)
    traces = []

    @jax.jit
    def step(st, k):
        traces.append(1)  # runs once per trace, not per call
        return reg.loss(params, st, batch, k, affine_apply)

    key = jax.random.PRNGKey(1)
    v1, _, m1 = step(state, key)
    moved = reg.epoch_end(state, jnp.float32(0.99), 0)  # lam 0.5 -> 0.75, no redraw at epoch 0
    v2, _, m2 = step(moved, key)
    redrawn = reg.epoch_end(reg.epoch_end(moved, jnp.float32(0.1), 1), jnp.float32(0.1), 2)  # a redraw
    step(redrawn, key)
    assert len(traces) == 1 and step._cache_size() == 1
    np.testing.assert_allclose(float(m2["coeff"]), 0.75)
    np.testing.assert_allclose(v2, 1.5 * v1, rtol=1e-6)  # same pairs, coefficient x1.5


def test_coefficient_grid_vmaps():
    params = affine_params(dtype=jnp.float32)
    batch = {**make_batch(), "image": make_batch()["image"].astype(jnp.float32)}
    reg = clip(1.0, num_pairs=4, redraw_every_epochs=None)
    state = reg.init(jax.random.PRNGKey(0), params, batch)
    key = jax.random.PRNGKey(1)
    base = float(jax.jit(lambda st: reg.loss(params, st, batch, key, affine_apply)[0])(state))
    grid = {**state, "coeff": jnp.array([0.0, 1.0, 3.0], jnp.float32)}
    axes = {k: (0 if k == "coeff" else None) for k in state}
    values = jax.jit(jax.vmap(lambda st: reg.loss(params, st, batch, key, affine_apply)[0], in_axes=(axes,)))(grid)
    np.testing.assert_allclose(values, [0.0, base, 3.0 * base], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs, match", [
    ({"coeff": -1.0}, "coeff"),
    ({"init": "noise"}, "init"),
    ({"num_pairs": 0}, "num_pairs"),
    ({"target": 90, "dlam": 0.01}, "fraction"),
    ({"target": 0.9}, "dlam"),
    ({"skip_above": 0.0}, "skip_above"),
    ({"redraw_every_epochs": 0}, "redraw_every_epochs"),
    ({"pool_images": np.zeros((0, 6), np.float32)}, "pool_images"),
    ({"adaptive": "yes"}, "adaptive"),
    ({"perturb_dist": "laplace"}, "perturb_dist"),
    ({"redraw_every_steps": 0, "redraw_every_epochs": None}, "redraw_every_steps"),
    ({"cooldown": -1}, "cooldown"),
    ({"min_separation": -0.1}, "min_separation"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        clip(**kwargs)


def test_pool_shape_must_match_the_data():
    reg = clip(1.0, num_pairs=4, pool_images=np.zeros((10, 7), np.float32))
    with pytest.raises(ValueError, match="pool_images"):
        reg.init(jax.random.PRNGKey(0), affine_params(), make_batch())
    assert isinstance(reg, Regularizer) and reg.name == "clip"


# ---------------------------------------------------------------------------------------------- regression toy
def toy_mlp_params(seed, sizes=(1, 32, 32, 1)):
    rng = np.random.default_rng(seed)
    return [(jnp.asarray(rng.standard_normal((a, b)) * np.sqrt(4.0 / a), jnp.float32), jnp.zeros(b, jnp.float32))
            for a, b in zip(sizes[:-1], sizes[1:])]


def toy_apply(params, xs):
    h = xs
    for w, b in params:  # sigmoid after every layer, the output included (SPEC 1.3)
        h = jax.nn.sigmoid(h @ w + b)
    return h


def make_toy_trainer():
    """Full-batch Adam on MSE + CLIP; pairs redrawn every epoch (= step) as x ~ U[-4, 4] and a noisy copy.
    One compiled step serves every lambda: lambda is ``state["coeff"]``."""
    train = regression_toy("train", seed=0)
    batch = {"image": jnp.asarray(train.images), "label": jnp.asarray(train.labels)}
    pool = np.random.default_rng(1).uniform(-4.0, 4.0, size=(1000, 1)).astype(np.float32)
    reg = clip(0.0, num_pairs=32, init="perturb", perturb_scale=0.1, redraw_every_epochs=1, pool_images=pool)
    opt = optax.adam(1e-2)

    @jax.jit
    def train_step(params, opt_state, state, key):
        def objective(p):
            mse = jnp.mean((toy_apply(p, batch["image"]) - batch["label"]) ** 2)
            value, new_state, _ = reg.loss(p, state, batch, key, toy_apply)
            return mse + value, (new_state, mse)

        (_, (state, mse)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, mse

    def fit(lam, steps):
        """Returns (max |f'| on a dense grid of [-4, 4], training MSE)."""
        params = toy_mlp_params(0)
        state = reg.init(jax.random.PRNGKey(0), params, batch)
        state = {**state, "coeff": jnp.asarray(lam, jnp.float32)}
        opt_state = opt.init(params)
        for epoch in range(steps):
            params, opt_state, state, mse = train_step(params, opt_state, state, jax.random.PRNGKey(epoch))
            state = reg.epoch_end(state, jnp.float32(0.0), epoch)  # regression: no accuracy, fixed lambda
        return float(max_slope(params)), float(mse)

    @jax.jit
    def max_slope(params):
        grid = jnp.linspace(-4.0, 4.0, 2001)[:, None]
        return jnp.max(jnp.abs(jax.vmap(jax.grad(lambda x: toy_apply(params, x[None])[0, 0]))(grid)))

    return fit, train_step


def test_regression_toy_lambda_10_is_smoother_than_lambda_0():
    fit, train_step = make_toy_trainer()
    lip0, mse0 = fit(0.0, steps=120)
    lip10, mse10 = fit(10.0, steps=120)
    assert train_step._cache_size() == 1  # both lambdas, and every redraw, ran the same compiled step
    assert lip10 < 0.2 * lip0, (lip10, lip0)
    assert mse0 < mse10  # the price: lambda = 10 over-smooths (SPEC 1.3's expected picture)


@pytest.mark.slow
def test_regression_toy_lambda_10_is_smoother_than_lambda_0_long():
    fit, _ = make_toy_trainer()
    lip0, mse0 = fit(0.0, steps=600)
    lip10, mse10 = fit(10.0, steps=600)
    assert lip10 < 0.1 * lip0, (lip10, lip0)
    assert mse0 < 0.5 * mse10


# ---------------------------------------------------------------------------------------------- the reference code
# Oracles below are plain NumPy (float64, gradients written by hand) re-statements of what the reference code does,
# written from its behaviour as described in the library docs, never from the library's own functions.
def tanh_net(seed=3, d=6, k=K):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, d)), 0.1 * rng.standard_normal(k)


def reference_constant_step_ascent(w, b, u, v, reg_lr, steps):
    """The reference's pair ascent as it actually runs: gradient ascent on the SQUARED quotient with the constant step
    ``reg_lr`` (its x1.3 / /1.3 update is computed and dropped); a pair keeps a proposal only if its squared quotient
    grew. ``f(x) = tanh(W x + b)``. Returns the final pairs and how many steps each pair accepted."""
    f = lambda x: np.tanh(x @ w.T + b)  # noqa: E731

    def sq_quotient(a, c):
        return np.sum((f(a) - f(c)) ** 2, 1) / np.sum((a - c) ** 2, 1)

    accepted = np.zeros(len(u), int)
    for _ in range(steps):
        fu, fv = f(u), f(v)
        dy, dx = fu - fv, u - v
        num, den = np.sum(dy ** 2, 1)[:, None], np.sum(dx ** 2, 1)[:, None]
        # d/du ||f(u) - f(v)||^2 = 2 W^T ((1 - f(u)^2) * dy);  d/du ||u - v||^2 = 2 dx
        gu = 2 * ((1 - fu ** 2) * dy) @ w / den - num * 2 * dx / den ** 2
        gv = -2 * ((1 - fv ** 2) * dy) @ w / den + num * 2 * dx / den ** 2
        un, vn = u + reg_lr * gu, v + reg_lr * gv
        keep = (sq_quotient(un, vn) > sq_quotient(u, v))[:, None]
        u, v = np.where(keep, un, u), np.where(keep, vn, v)
        accepted += keep[:, 0]
    return u, v, accepted


def test_constant_step_ascent_follows_the_reference_trajectory(x64):
    from lcnn_jax.measures.lipschitz import lipschitz_pair_ascent

    w, b = tanh_net()
    rng = np.random.default_rng(4)
    u0 = rng.uniform(size=(12, 6))
    v0 = u0 + 0.1 * rng.standard_normal((12, 6))
    reg_lr, steps = 0.002, 50
    u_ref, v_ref, accepted = reference_constant_step_ascent(w, b, u0, v0, reg_lr, steps)
    assert accepted.min() > 0 and accepted.sum() < 0.5 * steps * 12  # both outcomes occur, for every pair

    f_batched = lambda xs: jnp.tanh(xs.reshape(xs.shape[0], -1) @ jnp.asarray(w).T + jnp.asarray(b))  # noqa: E731
    tau = 2 * reg_lr  # ours ascends L^2 / 2 (u += tau L grad L); the reference L^2 (u += lr 2 L grad L)
    run = jax.jit(lambda u, v, adaptive: lipschitz_pair_ascent(f_batched, u, v, num_steps=steps, init_step=tau,
                                                               min_separation=0.0, adaptive=adaptive),
                  static_argnums=2)
    res = run(jnp.asarray(u0), jnp.asarray(v0), False)
    np.testing.assert_allclose(res.u, u_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.v, v_ref, rtol=1e-9, atol=1e-12)
    adaptive = run(jnp.asarray(u0), jnp.asarray(v0), True)  # the paper's adaptive step takes another path
    assert float(jnp.max(jnp.abs(adaptive.u - res.u))) > 1e-3

    # the training path: CLIP's loss with adaptive=False on a fixed network runs the same ascent, step kept constant
    params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
    apply_fn = lambda p, xs: jnp.tanh(xs.reshape(xs.shape[0], -1) @ p["w"].T + p["b"])  # noqa: E731
    reg = clip(1.0, num_pairs=12, adaptive=False, init_step=tau, redraw_every_epochs=None)
    shaped = lambda a: jnp.asarray(a).reshape((12,) + EXAMPLE_SHAPE)  # noqa: E731
    state = {**reg.init(jax.random.PRNGKey(0), params, make_batch()), "u": shaped(u0), "v": shaped(v0)}
    step = jitted_loss(reg, apply_fn, params, make_batch())
    rates = []
    for i in range(steps):
        _, state, metrics = step(state, jax.random.PRNGKey(i))
        rates.append(float(metrics["accept_rate"]))
    np.testing.assert_allclose(np.asarray(state["u"]).reshape(12, 6), u_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(state["v"]).reshape(12, 6), v_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(state["step"], np.full(12, tau))
    np.testing.assert_allclose(np.sum(rates) * 12, accepted.sum())  # accept_rate counts accepted moves


def test_uniform_perturbation_is_one_sided():
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(50, 40)), jnp.float32)
    u, v = draw_pairs(jax.random.PRNGKey(1), images, 30, init="perturb", perturb_scale=0.1, perturb_dist="uniform")
    assert np.all(rows_of(u, images) >= 0)
    noise = np.asarray(v - u, np.float64)
    assert noise.min() >= -1e-7 and noise.max() < 0.1 + 1e-7  # U[0, 0.1), up to float32 rounding of v - u
    # 1200 draws: mean 0.05 and std 0.1 / sqrt(12) = 0.0289, each within ~4 standard errors
    assert abs(noise.mean() - 0.05) < 0.004 and abs(noise.std() / (0.1 / np.sqrt(12)) - 1) < 0.08
    with pytest.raises(ValueError, match="perturb_dist"):
        draw_pairs(jax.random.PRNGKey(1), images, 3, perturb_dist="laplace")


@pytest.mark.parametrize("use_pool, reset", [(True, True), (False, False)], ids=["pool-reset", "batch-keep_steps"])
def test_redraw_every_steps(use_pool, reset):
    params = {"w": jnp.zeros((K, 6), jnp.float32), "b": jnp.ones(K, jnp.float32)}  # constant: pairs never move
    batches = [{**make_batch(s), "image": make_batch(s)["image"].astype(jnp.float32)} for s in range(1, 9)]
    pool = np.random.default_rng(7).uniform(size=(40,) + EXAMPLE_SHAPE).astype(np.float32)
    reg = clip(1.0, num_pairs=5, init="pairs", redraw_every_epochs=None, redraw_every_steps=3, init_step=0.5,
               reset_step_on_redraw=reset, pool_images=pool if use_pool else None)
    state = reg.init(jax.random.PRNGKey(0), params, batches[0])
    loss = jax.jit(lambda st, b, k: reg.loss(params, st, b, k, affine_apply))
    source = lambda i: pool if use_pool else batches[i]["image"]  # noqa: E731
    draws = [np.asarray(state["u"])]
    for i in range(1, 8):  # steps 0..6: redraws before the ascent of steps 3 and 6
        _, state, _ = loss(state, batches[i], jax.random.PRNGKey(i))
        u = np.asarray(state["u"])
        if i - 1 in (3, 6):
            assert np.all(rows_of(u, source(i)) >= 0) and not np.array_equal(u, draws[-1]), i
            draws.append(u)
        else:
            np.testing.assert_array_equal(u, draws[-1])
    # every step of a constant network rejects and divides the step by 1.3; a reset restarts from init_step
    expected = 0.5 / 1.3 ** (1 if reset else 7)
    np.testing.assert_allclose(state["step"], np.full(5, expected, np.float32), rtol=1e-6)
    with pytest.raises(ValueError, match="redraw_every_steps"):
        clip(1.0, redraw_every_epochs=2, redraw_every_steps=3)


def reference_lamda_schedule(lam, accs, *, warmup, warmup_lamda, cooldown, goal, increment):
    """The reference's lamda_scheduler, called once after each epoch; returns lambda after each call."""
    current, out, cool = warmup_lamda, [], cooldown
    for acc in accs:
        if warmup > 0:
            warmup -= 1
            current = warmup_lamda
        elif warmup == 0:
            warmup = -1
            current = lam
        elif cool > 0:
            cool -= 1
        else:
            cool = cooldown
            current = current + increment if acc > goal else max(current - increment, 0.0)
        out.append(current)
    return out


@pytest.mark.parametrize("cooldown", [0, 1, 2])
def test_cooldown_reproduces_the_reference_scheduler(cooldown):
    accs = np.random.default_rng(cooldown).uniform(0.8, 1.0, size=30)
    # the reference's warmup=5 trains 6 epochs with warmup_lamda: our warmup_epochs=6
    expected = reference_lamda_schedule(0.5, accs, warmup=5, warmup_lamda=0.0, cooldown=cooldown, goal=0.9,
                                        increment=0.125)
    initial, hook = discrepancy_principle(0.5, target=0.9, dlam=0.125, warmup_epochs=6, warmup_coeff=0.0,
                                          cooldown=cooldown)
    state, got = {"coeff": jnp.asarray(initial, jnp.float32)}, []
    for epoch, acc in enumerate(accs):
        state = hook(state, jnp.float32(acc), epoch)
        got.append(float(state["coeff"]))
    np.testing.assert_allclose(got, expected, atol=1e-6)  # dlam = 1/8: float32-exact sums
    assert len(set(np.round(np.diff(got[6:]), 6))) > 1  # lambda moved both ways (the test could fail)
    with pytest.raises(ValueError, match="cooldown"):
        discrepancy_principle(0.5, target=0.9, dlam=0.1, cooldown=-1)


def test_apply_epoch_end_runs_every_hook():
    from lcnn_jax.regularizers import apply_epoch_end, jacreg

    params, batch = affine_params(dtype=jnp.float32), make_batch()
    regs = (clip(0.3, num_pairs=4, redraw_every_epochs=None, target=0.9, dlam=0.1),
            weight_l2(0.2, target=0.9, dlam=0.05), jacreg(0.1))
    states = tuple(r.init(jax.random.PRNGKey(i), params, batch) for i, r in enumerate(regs))
    out = apply_epoch_end(states, regs, jnp.float32(0.95), 0)
    assert float(out[0]["coeff"]) == pytest.approx(0.4) and float(out[1]["coeff"]) == pytest.approx(0.25)
    assert out[2] is states[2]  # no hook: the state passes through
    single = apply_epoch_end(states[0], regs[0], jnp.float32(0.5), 0)  # one regularizer, one state
    assert float(single["coeff"]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="one state per regularizer"):
        apply_epoch_end(states[:2], regs, jnp.float32(0.5), 0)


def test_pair_ascent_functions_share_one_min_separation_default():
    import inspect

    from lcnn_jax.measures.lipschitz import lipschitz_pair_ascent, pair_ascent_step

    d_step = inspect.signature(pair_ascent_step).parameters["min_separation"].default
    d_run = inspect.signature(lipschitz_pair_ascent).parameters["min_separation"].default
    assert d_step is None and d_run is None  # sqrt(eps) of the dtype; CLIP's training passes its own 0.0


# ---------------------------------------------------------------------------------------------- reference evaluation
def softmax_linear(seed=5, d=6, k=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, d)), rng.standard_normal(k)


def reference_pgd_l2(w, b, xs, ys, delta0, *, eps, alpha, steps, lo=0.0, hi=1.0):
    """The reference's PGD-L2 on ``logits = x W^T + b``: start on the eps-sphere, sign steps of size alpha, each
    iterate clamped to the box and rescaled onto the sphere, a sample frozen once misclassified, the result clamped
    to the box. ``delta0``: the raw uniform draw in [-eps, eps]. Also returns each sample's last updated step."""
    x = xs.reshape(len(xs), -1)
    sphere = lambda d: d / np.linalg.norm(d, axis=1, keepdims=True) * eps  # noqa: E731
    delta = sphere(np.clip(delta0.reshape(len(xs), -1), lo - x, hi - x))
    last = np.full(len(xs), -1)
    for t in range(steps):
        z = (x + delta) @ w.T + b
        active = z.argmax(1) == ys
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - np.eye(len(b))[ys]) @ w  # d CE / d x, per sample
        d = sphere(np.clip(delta + alpha * np.sign(grad), lo - x, hi - x))
        delta = np.where(active[:, None], d, delta)
        last[active] = t
    return np.clip(x + delta, lo, hi).reshape(xs.shape), last


def test_pgd_l2_clip_reference_matches_the_reference_algorithm(x64):
    from lcnn_jax import attacks

    w, b = softmax_linear()
    rng = np.random.default_rng(6)
    xs = rng.uniform(size=(40,) + EXAMPLE_SHAPE)
    ys = np.argmax(xs.reshape(40, -1) @ w.T + b, 1)  # every sample starts correctly classified
    key = jax.random.PRNGKey(3)
    eps, alpha, steps = 0.6, 0.1, 12
    delta0 = np.asarray(jax.random.uniform(key, xs.shape, jnp.float64, -eps, eps))  # the documented start draw
    x_ref, last = reference_pgd_l2(w, b, xs, ys, delta0, eps=eps, alpha=alpha, steps=steps)
    assert np.any(last < steps - 1) and np.any(last == steps - 1)  # some froze early, some ran to the end

    logits_fn = lambda x: x.reshape(x.shape[0], -1) @ jnp.asarray(w).T + jnp.asarray(b)  # noqa: E731
    x_adv = jax.jit(lambda x, y, k: attacks.pgd_l2_clip_reference(logits_fn, x, y, key=k, eps=eps, alpha=alpha,
                                                                  num_steps=steps))(xs, jnp.asarray(ys), key)
    np.testing.assert_allclose(x_adv, x_ref, rtol=1e-12, atol=1e-12)
    assert np.all(np.asarray(x_adv) >= 0) and np.all(np.asarray(x_adv) <= 1)
    assert np.all(np.linalg.norm((np.asarray(x_adv) - xs).reshape(40, -1), axis=1) <= eps * (1 + 1e-12))
    with pytest.raises(ValueError, match="alpha"):
        attacks.pgd_l2_clip_reference(logits_fn, xs, jnp.asarray(ys), key=key, eps=eps, alpha=-1.0, num_steps=1)


def test_paper_era_noise_is_unclipped_and_scaled_by_the_data_std():
    from lcnn_jax import attacks

    xs = jnp.asarray(np.random.default_rng(0).uniform(size=(64, 28, 28, 1)), jnp.float32)
    key = jax.random.PRNGKey(2)
    noisy = attacks.gaussian_noise_normalized(xs, key=key)
    # N(0, 1) in the space (x - 0.1307) / 0.3081, mapped back to pixels and never clipped
    expected = xs + 0.3081 * jax.random.normal(key, xs.shape, xs.dtype)
    np.testing.assert_allclose(noisy, expected, rtol=1e-6, atol=1e-6)
    assert float(jnp.min(noisy)) < -0.5 and float(jnp.max(noisy)) > 1.5
    clipped = attacks.gaussian_noise_normalized(xs, key=key, std=2.0, data_std=0.5, clip=(0.0, 1.0))
    np.testing.assert_allclose(clipped, jnp.clip(xs + jax.random.normal(key, xs.shape, xs.dtype), 0, 1), atol=1e-6)
