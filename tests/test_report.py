"""`lcnn-jax measure`: the report of a trained run against direct, independent computations."""
import json

import jax
import numpy as np
import pytest

from lcnn_jax import training
from lcnn_jax.cli import main
from lcnn_jax.configs import default_config
from lcnn_jax.data import load_split


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    c = default_config()
    c.model.name, c.model.kwargs = "mlp", {"widths": (16,), "act": "softplus"}
    c.data.train_size, c.train.batch_size, c.train.num_steps = 200, 50, 12
    c.train.progress = False
    training.fit(c, workdir)
    return workdir


@pytest.mark.slow
def test_measure_report_matches_direct_computation(trained, capsys):
    rc = main(["measure", "--workdir", trained, "--config.measure.num_examples=10", "--config.measure.batch_size=4",
               "--config.measure.hessian_examples=50", "--config.measure.hessian_probes=4",
               "--config.measure.hessian_lanczos_iters=8", "--config.measure.pgd_steps=5",
               "--config.measure.splits=('test',)", "--config.measure.curvature_iters=3",
               "--config.measure.lipschitz_iters=8", "--config.measure.noise_std=(0.5,)",
               "--config.measure.pgd_l2_eps=(2.0,)", "--config.measure.robust_attacks=('apgd','pgd')",
               "--config.measure.apgd_steps=10", "--config.measure.certified_l2_eps=(0.05,2.0)",
               "--config.measure.progress=False"])
    out = capsys.readouterr().out
    assert rc == 0 and "curvature" in out and "pgd_l2_2" in out and "noise_0.5" in out and "apgd_l2_2" in out
    rep = json.load(open(f"{trained}/measures.json"))

    config, model, state, info = training.load_trained(trained)
    variables = {"params": state.params, **state.model_state}
    test = load_split("mnist5k", "test")
    xs, ys = test.images[:10], test.labels[:10]
    logits_fn = lambda x: model.apply(variables, x, train=False)  # noqa: E731
    # Oracle: the dense Jacobian of each example (jacfwd), its Frobenius norm.
    jac = np.stack([np.asarray(jax.jacfwd(lambda z: logits_fn(z[None])[0])(x)).reshape(10, -1) for x in xs])
    fro = np.linalg.norm(jac, axis=(1, 2))
    t = rep["test"]
    assert t["jacobian_frobenius"]["n"] == 10  # 10 examples in chunks of 4: the padded chunk is trimmed
    np.testing.assert_allclose(t["jacobian_frobenius"]["mean"], fro.mean(), rtol=1e-4)
    np.testing.assert_allclose(t["jacobian_frobenius"]["std"], fro.std(), rtol=1e-3)
    # Local Lipschitz (power iteration) is a lower bound on, and close to, the top singular value.
    sv = np.linalg.svd(jac, compute_uv=False)[:, 0]
    assert t["local_lipschitz"]["mean"] <= sv.mean() * (1 + 1e-4)
    assert t["local_lipschitz"]["mean"] >= 0.9 * sv.mean()
    assert "train" not in rep  # only the requested split
    acc = float(np.mean(np.argmax(np.asarray(logits_fn(xs)), -1) == ys))
    assert t["accuracy"]["mean"] == pytest.approx(acc)
    for item in ("pgd_linf_0.1", "pgd_l2_2", "apgd_linf_0.1", "apgd_l2_2", "noise_0.5", "certified_l2_0.05"):
        assert 0.0 <= t[item]["mean"] <= acc
    # certified accuracy against the attacks at the same radius, and against an independent certify call
    assert t["certified_l2_2"]["mean"] <= t["apgd_l2_2"]["mean"] <= t["pgd_l2_2"]["mean"] + 0.1
    from lcnn_jax.measures import certified, curvature_bound
    cert = certified.certify(logits_fn, xs, ys, curvature_bound(model, variables, xs.shape[1:]))
    assert t["certified_l2_0.05"]["mean"] == pytest.approx(cert.accuracy(0.05))
    np.testing.assert_allclose(t["certified_radius"]["mean"], cert.radius.mean(), rtol=1e-5)
    curv = t["curvature"]["mean"]
    ratio = t["hessian_norm"]["mean"] / (t["grad_norm"]["mean"] + 1e-6)
    assert curv > 0 and np.isfinite(ratio)
    assert -1.0 <= t["gradient_stability"]["mean"] <= 1.0
    ps = rep["parameter_space"]
    assert ps["hessian_trace"]["n"] == 4 and np.isfinite(ps["hessian_trace"]["mean"])
    assert ps["hessian_top_eigenvalue"]["mean"] > 0  # CE Hessian near a trained point: positive top eigenvalue


def test_measure_missing_run_and_bad_override_exit_2(tmp_path, trained, capsys):
    assert main(["measure", "--workdir", str(tmp_path)]) == 2
    assert "lcnn-jax train" in capsys.readouterr().err
    assert main(["measure", "--workdir", trained, "--config.measure.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["measure", "--workdir", trained, "--config.train.batch_size=3"]) == 2
