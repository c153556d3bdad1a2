"""PGD adversarial training (lcnn_jax.regularizers.adversarial).

Oracles: the attack re-run by hand with the same key (lcnn_jax.attacks.pgd), and the gradient of the adversarial
cross-entropy at that fixed point; with coeff = 1 the training objective must be Madry's, value and gradient.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _lcnn_helpers import xla_optimizations
from lcnn_jax import attacks
from lcnn_jax.regularizers import adversarial_training, make_regularizer


def _setup(seed=0, n=8):
    rng = np.random.default_rng(seed)
    params = {"w1": jnp.asarray(rng.standard_normal((16, 12)) * 0.5, jnp.float32),
              "w2": jnp.asarray(rng.standard_normal((12, 3)), jnp.float32)}

    def apply_fn(p, xs):
        return jnp.tanh(xs.reshape(xs.shape[0], -1) @ p["w1"]) @ p["w2"]

    batch = {"image": jnp.asarray(rng.uniform(0, 1, (n, 4, 4, 1)), jnp.float32),
             "label": jnp.asarray(np.arange(n) % 3, jnp.int32)}
    return params, apply_fn, batch


def _ce(logits, ys):
    return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()


@pytest.mark.parametrize("norm,eps", [("l2", 0.5)])
def test_with_coeff_one_the_objective_is_the_adversarial_loss_value_and_gradient(norm, eps):
    params, apply_fn, batch = _setup()
    reg = adversarial_training(1.0, norm=norm, eps=eps, num_steps=3)
    state = reg.init(None, params, batch)
    key = jax.random.key(7)

    def objective(p):
        value, _, metrics = reg.loss(p, state, batch, key, apply_fn)
        return _ce(apply_fn(p, batch["image"]), batch["label"]) + value, metrics

    def oracle(p):  # the same PGD (same key, Madry's step 2.5 eps / 3), then the plain CE at that fixed point
        x_adv = attacks.pgd(lambda x: apply_fn(p, x), batch["image"], batch["label"], norm=norm, eps=eps,
                            step_size=2.5 * eps / 3, num_steps=3, key=key)
        return jax.value_and_grad(lambda q: _ce(apply_fn(q, x_adv), batch["label"]))(p)

    ((total, metrics), grad), (madry, madry_grad) = jax.jit(
        lambda p: (jax.value_and_grad(objective, has_aux=True)(p), oracle(p)))(params)
    np.testing.assert_allclose(total, madry, rtol=1e-5)
    np.testing.assert_allclose(metrics["ce_adv"], madry, rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(grad[k], madry_grad[k], rtol=2e-4, atol=1e-6)
    # the attack raised the loss: the term (CE(x_adv) - CE(x)) is positive
    assert float(metrics["adversarial"]) > 0


def test_coefficients_and_radius_live_in_the_state_and_vmap():
    params, apply_fn, batch = _setup(1)
    reg = make_regularizer("adversarial", coeff=0.5, eps=0.3, num_steps=2)
    states = [reg.init(None, params, batch)]
    states.append({**states[0], "coeff": jnp.float32(1.0), "eps": jnp.float32(0.6)})
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    key = jax.random.key(3)
    value = lambda s: reg.loss(params, s, batch, key, apply_fn)[0]  # noqa: E731
    vals, one = jax.jit(lambda st, ss: (jax.vmap(value)(st), [value(s) for s in ss]))(stacked, states)
    one = [float(v) for v in one]
    np.testing.assert_allclose(vals, one, rtol=1e-5)
    assert one[1] > 2 * one[0] > 0  # twice the weight on a larger radius


def test_adversarial_training_rejects_misuse():
    for kwargs, match in [(dict(eps=0.0), "eps"), (dict(eps=0.1, norm="l1"), "norm"),
                          (dict(eps=0.1, num_steps=0), "num_steps"), (dict(eps=0.1, coeff=-1.0), "coeff"),
                          (dict(eps=0.1, step_size=0.1, step_factor=2.0), "not both"),
                          (dict(eps=0.1, clip=(1.0, 0.0)), "clip")]:
        with pytest.raises(ValueError, match=match):
            adversarial_training(**kwargs)
    with pytest.raises(ValueError, match="adversarial"):
        make_regularizer("adversarial", eps=0.1, bogus=1)
    params, apply_fn, batch = _setup(2)
    reg = adversarial_training(eps=0.1)
    with pytest.raises(ValueError, match="label"):
        reg.loss(params, reg.init(None, params, batch), {"image": batch["image"]}, jax.random.key(0), apply_fn)


@pytest.mark.slow
def test_adversarial_training_raises_pgd_accuracy_on_mnist5k():
    """The quickstart small CNN at width 1/4 on mnist5k, 3 epochs, seed 0: standard training against PGD adversarial
    training (L2, eps 1, 3 steps), evaluated by PGD-L2 (20 steps) at eps 1 on the 1000 test images."""
    with xla_optimizations(True):  # seconds of compilation save minutes of running
        _standard_against_adversarial()


def _standard_against_adversarial():
    import os
    import tempfile

    from lcnn_jax import data
    from lcnn_jax.configs import load_config
    from lcnn_jax.train import fit, load_trained

    test = data.load_split("mnist5k", "test")
    xs, ys = jnp.asarray(test.images), jnp.asarray(test.labels)
    accs = {}
    for name, regs in (("standard", {}), ("adversarial", {"adversarial": {"eps": 1.0, "num_steps": 3}})):
        config = load_config(os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "quickstart.py"))
        config.model.kwargs = {"width_mult": 0.25}
        config.train.num_epochs = 3
        config.train.progress = False
        config.regularizers = regs
        with tempfile.TemporaryDirectory() as tmp:
            fit(config, tmp)
            _, model, state, _ = load_trained(tmp)
        variables = {"params": state.params, **state.model_state}
        logits_fn = jax.jit(lambda x, v=variables, m=model: m.apply(v, x, train=False))
        attack = functools.partial(attacks.pgd, norm="l2", eps=1.0, step_size=2.5 / 20, num_steps=20)
        accs[name] = (attacks.accuracy(logits_fn, xs, ys, batch_size=500),
                      attacks.robust_accuracy(logits_fn, xs, ys, attack=attack, key=jax.random.key(0),
                                              batch_size=500))
    print({k: f"clean {a:.3f} PGD-L2(1) {r:.3f}" for k, (a, r) in accs.items()})
    assert accs["adversarial"][1] > accs["standard"][1] + 0.05
