"""Certifiable training (lcnn_jax.regularizers.certifiable) and the certificates of 1-Lipschitz networks.

Independent oracles: dense float64 Jacobians and Hessians (jax.jacfwd / jax.hessian of the model run in float64)
at random, data and adversarial points; APGD with restarts at the certified radius on tiny trained networks (ReLU
and smooth); a fine grid search for the true distance to the decision boundary of a 2-D toy classifier; the
certified bound of lcnn_jax.measures.curvature_bound for the training-time bound.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcnn_jax import attacks
from lcnn_jax.data import load_split
from lcnn_jax.measures import certified, curvature_bound, function_bound
from lcnn_jax.nn.lipschitz import training_bounds
from lcnn_jax.nn.models import make_model
from lcnn_jax.regularizers import make_regularizer
from lcnn_jax.regularizers.certifiable import curvature_penalty, lipschitz_margin, margin_logits, trades_kl

SHAPE = (7, 7, 1)


def _data(n=512, split="train"):
    """mnist5k images average-pooled 4x4 to 7x7 (tiny networks train in a second)."""
    s = load_split("mnist5k", split)
    x = np.asarray(s.images[:n], np.float32).reshape(n, 7, 4, 7, 4, 1).mean(axis=(2, 4))
    return jnp.asarray(x), jnp.asarray(s.labels[:n], jnp.int32)


def _net(activation="minmax", kind="aol_mlp"):
    if kind == "aol_mlp":
        return make_model("aol_mlp", 10, widths=(32, 32), activation=activation)
    return make_model("aol_cnn", 10, channels=(4,), dense_widths=(16,), activation=activation)


def _train(net, regs, steps=150, seed=0, lr=3e-3):
    """A few Adam steps on CE + the regularizers (the library's regularizer interface, its own tiny loop)."""
    xs, ys = _data()
    variables = net.init(jax.random.PRNGKey(seed), xs[:1])
    params = variables["params"]
    batch0 = {"image": xs[:64], "label": ys[:64]}
    states = [r.init(jax.random.PRNGKey(1), params, batch0) for r in regs]
    apply_fn = lambda p, x: net.apply({"params": p}, x)  # noqa: E731
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, states, batch, key):
        def loss(p):
            total = optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, batch["image"]), batch["label"]).mean()
            for r, s in zip(regs, states):
                total = total + r.loss(p, s, batch, key, apply_fn)[0]
            return total
        g = jax.grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt

    for i in range(steps):
        j = (i * 64) % (len(xs) - 64)
        params, opt = step(params, opt, states, {"image": xs[j:j + 64], "label": ys[j:j + 64]},
                           jax.random.PRNGKey(i))
    return {"params": params}


def _bound(net, variables):
    return curvature_bound(net, variables, SHAPE, num_iters=1)


def test_registry_names_and_bad_arguments():
    assert make_regularizer("lipschitz_margin", eps=0.5).name == "lipschitz_margin"
    assert make_regularizer("crt", coeff=0.1).name == "crt"
    with pytest.raises(ValueError, match="eps"):
        lipschitz_margin(eps=0.0)
    with pytest.raises(ValueError, match="variant"):
        lipschitz_margin(variant="bogus")
    net = _net()
    v = net.init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
    with pytest.raises(ValueError, match="infinite"):  # MinMax: no curvature bound
        curvature_penalty(0.1).init(jax.random.PRNGKey(0), v["params"], None)
    smooth = _net("centered_softplus")
    sv = smooth.init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
    for reg in (curvature_penalty(0.1), lipschitz_margin()):  # the trainer builds the states under jit
        jax.jit(lambda p, reg=reg: reg.init(jax.random.PRNGKey(0), p, None))(sv["params"])
    plain = make_model("mlp", 10, widths=(8,))
    pv = plain.init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
    with pytest.raises(ValueError, match="1-Lipschitz"):
        lipschitz_margin().init(jax.random.PRNGKey(0), pv["params"], None)


def test_eps_ramp():
    reg = lipschitz_margin(eps=1.0, warmup_epochs=4)
    net = _net()
    v = net.init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
    s = reg.init(jax.random.PRNGKey(0), v["params"], None)
    seen = [float(s["eps"])]
    for epoch in range(5):
        s = reg.epoch_end(s, jnp.float32(0.5), epoch)
        seen.append(float(s["eps"]))
    np.testing.assert_allclose(seen, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_margin_logits_argmax_is_the_lipschitz_certificate():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(200, 5)) * 2, jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, 200))
    a = rng.uniform(0.5, 2.0, (5, 5))
    pair = jnp.asarray((a + a.T) * (1 - np.eye(5)), jnp.float32)
    eps = 0.3
    g = np.asarray(z)[np.arange(200), np.asarray(y)][:, None] - np.asarray(z)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(np.eye(5, dtype=bool)[np.asarray(y)], np.inf, g / np.asarray(pair)[np.asarray(y)]).min(1)
    for variant in ("gloro", "tsuzuku"):
        ok = np.asarray(jnp.argmax(margin_logits(z, y, pair, eps, variant), -1) == y)
        np.testing.assert_array_equal(ok, r > eps)


def test_trades_kl_is_the_kl_from_the_clean_to_the_bottom_logit_distribution():
    """Oracle: KL(p || q) in float64 from its definition, p = softmax(z) with a 0 appended, q = softmax of z and the
    bottom logit of the *predicted* class c, max_{j != c} (z_j + eps L_cj) (GloRo's TRADES loss)."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(64, 6)) * 3
    a = rng.uniform(0.2, 1.5, (6, 6))
    pair = (a + a.T) * (1 - np.eye(6))
    eps = 0.7
    c = z.argmax(1)
    bot = np.array([max(z[i, j] + eps * pair[c[i], j] for j in range(6) if j != c[i]) for i in range(64)])
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    full = np.concatenate([z, bot[:, None]], 1)
    logq = full - full.max(1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(1, keepdims=True))
    oracle = (p * (np.log(p) - logq[:, :6])).sum(1)
    got = trades_kl(jnp.asarray(z, jnp.float32), jnp.asarray(pair, jnp.float32), eps)
    np.testing.assert_allclose(np.asarray(got), oracle, rtol=1e-5, atol=1e-6)
    # The regularizer's term is coeff * the batch mean, and its "certified" metric is the pairwise certificate.
    net = _net()
    xs, ys = _data(32)
    v = net.init(jax.random.PRNGKey(0), xs[:1])
    reg = lipschitz_margin(eps=eps, coeff=2.0, variant="trades")
    s = reg.init(jax.random.PRNGKey(0), v["params"], None)
    apply_fn = lambda p_, x: net.apply({"params": p_}, x)  # noqa: E731
    value, _, metrics = reg.loss(v["params"], s, {"image": xs, "label": ys}, jax.random.PRNGKey(0), apply_fn)
    logits = np.asarray(apply_fn(v["params"], xs), np.float64)
    pair_l = np.asarray(training_bounds(v["params"], "head")[0], np.float64)
    expect = 2.0 * np.asarray(trades_kl(jnp.asarray(logits), jnp.asarray(pair_l), eps)).mean()
    np.testing.assert_allclose(float(value), expect, rtol=1e-5)
    ok = np.asarray(jnp.argmax(margin_logits(jnp.asarray(logits), ys, jnp.asarray(pair_l), eps), -1) == ys)
    np.testing.assert_allclose(float(metrics["certified"]), ok.mean())


@pytest.mark.parametrize("activation,kind", [("minmax", "aol_mlp"), ("centered_softplus", "aol_mlp"),
                                             pytest.param("minmax", "aol_cnn", marks=pytest.mark.slow),
                                             pytest.param("centered_softplus", "aol_cnn", marks=pytest.mark.slow)])
def test_training_bound_never_below_the_certified_bound(activation, kind):
    """Random (scaled up) and trained parameters: L_train >= L_certified and K_train >= K_certified, every pair."""
    if True:
        net = _net(activation, kind)
        v = net.init(jax.random.PRNGKey(3), jnp.zeros((1,) + SHAPE))
        big = {"params": jax.tree_util.tree_map(lambda a: 5.0 * a, v["params"])}
        trained = _train(net, [lipschitz_margin(eps=0.5, coeff=1.0)], steps=30)
        for variables in (v, big, trained):
            res = _bound(net, variables)
            pl, pk = training_bounds(variables["params"])
            assert np.all(np.asarray(pl, np.float64) >= np.asarray(res.pairwise_lipschitz, np.float64))
            if activation == "centered_softplus":
                assert np.all(np.asarray(pk, np.float64) >= np.asarray(res.pairwise_curvature, np.float64))
                assert np.isfinite(float(res.network.curvature))
            else:
                assert not np.isfinite(float(res.network.curvature))


def _net64(net, variables):
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    return lambda x: net.apply(v64, x[None])[0]


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["minmax", "centered_softplus"])
def test_lipschitz_and_curvature_bounds_exceed_dense_float64_derivatives(x64, activation):
    """At random, data and adversarial points: ||grad (z_i - z_j)|| <= L_ij and ||hess (z_i - z_j)|| <= K_ij."""
    xs, ys = _data(16, "test")
    if True:
        net = _net(activation)
        variables = _train(net, [lipschitz_margin(eps=0.5, coeff=1.0)], steps=40)
        res = _bound(net, variables)
        pl, pk = np.asarray(res.pairwise_lipschitz, np.float64), np.asarray(res.pairwise_curvature, np.float64)
        logits = lambda x: net.apply(variables, x)  # noqa: E731
        adv = attacks.apgd(logits, xs, ys, norm="l2", eps=2.0, num_steps=10, key=jax.random.PRNGKey(0))
        pts = jnp.concatenate([xs, adv, jax.random.uniform(jax.random.PRNGKey(1), (8,) + SHAPE)], 0)
        f = _net64(net, variables)
        jac = jax.vmap(jax.jacfwd(f))(jnp.asarray(pts, jnp.float64)).reshape(len(pts), 10, -1)
        diff = jac[:, :, None, :] - jac[:, None, :, :]
        gnorm = np.asarray(jnp.linalg.norm(diff, axis=-1))
        assert np.all(gnorm <= pl[None] * (1 + 1e-9) + 1e-12)
        assert gnorm.max() > 0.05 * pl.max()  # the bound is not vacuous
        if activation == "centered_softplus":
            for x in pts[::4]:
                h = np.asarray(jax.hessian(f)(jnp.asarray(x, jnp.float64))).reshape(10, x.size, x.size)
                for i, j in ((0, 1), (3, 7), (9, 2)):
                    hn = np.linalg.norm(h[i] - h[j], 2)
                    assert hn <= pk[i, j] * (1 + 1e-9)


@pytest.mark.slow  # a long oracle test: CI runs it with -m slow (the default suite stays < 3 min)
def test_second_order_radius_is_below_the_true_distance_on_a_2d_toy():
    """A smooth 2-D classifier; the true distance to its boundary by a fine polar grid search."""
    rng = np.random.default_rng(0)
    w1 = jnp.asarray(rng.normal(size=(2, 16)) * 2.0, jnp.float32)
    b1 = jnp.asarray(rng.normal(size=16), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)

    def logits_fn(xs):
        return jax.nn.softplus(xs.reshape(xs.shape[0], -1) @ w1 + b1) @ w2

    bound = function_bound(logits_fn, jax.ShapeDtypeStruct((1, 2), jnp.float32))
    assert certified.curvature_certificate_is_sound(bound)
    xs = jnp.asarray(rng.uniform(-2, 2, (16, 2)), jnp.float32)
    ys = jnp.argmax(logits_fn(xs), -1)
    cert = certified.certify(logits_fn, xs, ys, bound, curvature=True)
    angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)  # the grid: 0.5 degree, step 0.004
    dirs = np.stack([np.cos(angles), np.sin(angles)], 1)
    steps = np.linspace(0, 4, 1001)[1:]
    w1n, b1n, w2n = (np.asarray(a, np.float64) for a in (w1, b1, w2))
    for x, y, r, rc in zip(np.asarray(xs), np.asarray(ys), cert.radius, cert.curvature_radius):
        pts = x[None, None] + steps[None, :, None] * dirs[:, None, :]
        pred = np.argmax(np.logaddexp(0.0, pts @ w1n + b1n) @ w2n, -1)  # the same network in float64 NumPy
        flips = pred != y
        dist = np.min(np.where(flips.any(1), steps[np.argmax(flips, 1)], np.inf))
        assert r <= dist and rc <= dist
    assert np.all(cert.radius >= cert.lipschitz_radius)
    assert np.any(cert.curvature_radius > cert.lipschitz_radius)  # the second-order one matters somewhere


def test_certified_by_names_the_certificate():
    cert = certified.Certificate(radius=np.array([0.0, 1.0, 1.0, 1.0]), lipschitz_radius=np.array([0.0, 1.0, 0.2, 0.6]),
                                 curvature_radius=np.array([0.0, 0.1, 1.0, 0.7]), margin=np.ones(4),
                                 method="pairwise+curvature")
    assert list(cert.certified_by(0.5)) == ["", "pairwise", "curvature", "pairwise"]
    assert list(cert.certified_by(0.65)) == ["", "pairwise", "curvature", "curvature"]
    cert = cert._replace(radius=np.array([0.0, 1.0, 1.0, 0.9]))
    assert list(cert.certified_by(0.8)) == ["", "pairwise", "curvature", "mixed"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["relu_mlp", "aol_minmax", "aol_smooth"])
def test_certified_examples_survive_apgd_with_restarts_at_their_radius(model):
    if model == "relu_mlp":
        net = make_model("mlp", 10, widths=(32,), act="relu")
        variables = _train(net, [], steps=150)
    else:
        net = _net("minmax" if model == "aol_minmax" else "centered_softplus")
        variables = _train(net, [lipschitz_margin(eps=1.0, coeff=3.0)], steps=300)
    xs, ys = _data(200, "test")
    logits = lambda x: net.apply(variables, x)  # noqa: E731
    res = _bound(net, variables)
    cert = certified.certify(logits, xs, ys, res)
    pos = cert.radius[cert.radius > 0]
    assert len(pos) > 10
    for r in np.quantile(pos, [0.25, 0.5, 0.9]):
        adv = attacks.apgd(logits, xs, ys, norm="l2", eps=float(r), num_steps=50, restarts=3,
                           key=jax.random.PRNGKey(int(r * 1e6)))
        broken = np.asarray(jnp.argmax(logits(adv), -1) != ys)
        assert not np.any(broken & (cert.radius > r)), (model, r)
