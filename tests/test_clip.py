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
