"""`lcnn-jax measure`: the report of a trained run against direct, independent computations."""
import json

import jax
import numpy as np
import pytest

from lcnn_jax import train as training
from lcnn_jax.cli import main
from lcnn_jax.configs import default_config
from lcnn_jax.data import load_split

# Out of the default run (it must stay under 3 minutes on 2 cores): lcnn-jax measure end to end.
# CI runs it with -m slow.
pytestmark = pytest.mark.slow


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
    assert ps["hessian_trace"]["se"] >= 0 and "std" not in ps["hessian_trace"]  # the standard error, named so
    assert "(parameter space; s.e. of 4 probes)" in out
    assert ps["hessian_top_eigenvalue"]["mean"] > 0  # CE Hessian near a trained point: positive top eigenvalue
    # how converged: no tolerance was asked for the parameter-space items; the Lipschitz item reports its residuals
    assert ps["hessian_trace"]["converged"] is None and ps["hessian_top_eigenvalue"]["n"] == 8
    assert ps["hessian_top_eigenvalue"]["relative_residual"] >= 0
    assert 0 <= t["local_lipschitz"]["converged_fraction"] <= 1 and t["local_lipschitz"]["max_relative_residual"] >= 0
    # the robust columns are those of the library's worst-case driver with the same keys (robustness is task 1)
    import ml_collections

    from lcnn_jax import attacks, report
    k_rob = jax.random.fold_in(jax.random.PRNGKey(0), 1)
    suites = report.attack_suite(ml_collections.ConfigDict(rep["measure_config"]))
    for i, (column, suite) in enumerate(suites.items()):
        if column in ("apgd_l2_2", "pgd_linf_0.1"):
            direct = attacks.robust_accuracy_worst_case(logits_fn, xs, ys, attacks=suite, batch_size=4,
                                                        key=jax.random.fold_in(k_rob, i))
            assert t[column]["mean"] == pytest.approx(direct.accuracy), column


def test_robustness_compiles_one_program_per_attack_kind_whatever_the_radii_and_splits():
    # the radius is an argument of the program, the variables too: two splits x three radii x two noise levels
    # reuse one compiled program per kind, and the values are those of the library's drivers with the same keys
    import functools

    from lcnn_jax import attacks, report
    from lcnn_jax.nn import make_model

    model = make_model("mlp", 10, widths=(8,))
    xs = np.random.default_rng(0).uniform(size=(6, 4, 4, 1)).astype(np.float32)
    ys = np.arange(6) % 10
    variables = model.init(jax.random.PRNGKey(0), xs[:1])
    cfg = report.measure_defaults()
    cfg.update(dict(robust_attacks=("pgd",), pgd_steps=2, pgd_linf_eps=(), pgd_l2_eps=(0.5, 1.0, 2.0),
                    noise_std=(0.5, 1.0)))
    key = jax.random.PRNGKey(3)
    out = [report.robustness(model, variables, x, y, cfg, key, 4) for x, y in ((xs, ys), (xs[::-1], ys[::-1]))]
    assert report._robust_program(model, "l2", "pgd", 2, step_factor=2.5)._cache_size() == 1
    assert report._noise_program(model)._cache_size() == 1 and report._clean_program(model)._cache_size() == 1
    logits_fn = lambda x: model.apply(variables, x)  # noqa: E731
    column = "pgd_l2_1"
    i = list(report.attack_suite(cfg)).index(column)
    attack = functools.partial(attacks.pgd, norm="l2", eps=1.0, step_size=2.5 * 1.0 / 2, num_steps=2)
    direct = attacks.robust_accuracy_worst_case(logits_fn, xs, ys, attacks={"pgd": attack}, batch_size=4,
                                                key=jax.random.fold_in(key, i))
    assert out[0][column]["mean"] == pytest.approx(direct.accuracy)
    assert out[0]["accuracy"]["mean"] == pytest.approx(direct.clean_accuracy)


def test_measure_missing_run_and_bad_override_exit_2(tmp_path, trained, capsys):
    assert main(["measure", "--workdir", str(tmp_path)]) == 2
    assert "lcnn-jax train" in capsys.readouterr().err
    assert main(["measure", "--workdir", trained, "--config.measure.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["measure", "--workdir", trained, "--config.train.batch_size=3"]) == 2


def test_cli_compilation_cache_directory_and_opt_out(tmp_path, monkeypatch):
    import os

    from lcnn_jax import cli

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("LCNN_JAX_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.compilation_cache_dir() == str(tmp_path / "lcnn_jax" / "xla")  # the default
    for off in ("0", "off", "False", "none"):
        monkeypatch.setenv("LCNN_JAX_COMPILATION_CACHE", off)
        assert cli.compilation_cache_dir() is None
    monkeypatch.delenv("LCNN_JAX_COMPILATION_CACHE")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "users"))
    assert cli.compilation_cache_dir() is None  # the user's own JAX cache is left to JAX
    monkeypatch.setenv("LCNN_JAX_COMPILATION_CACHE", str(tmp_path / "chosen"))
    assert cli.compilation_cache_dir() == str(tmp_path / "chosen")
    prev = jax.config.jax_compilation_cache_dir
    assert prev is None  # tests run without a cache (conftest)
    try:
        assert cli.enable_compilation_cache() == str(tmp_path / "chosen")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "chosen")
        assert os.path.isdir(tmp_path / "chosen")
        assert cli.enable_compilation_cache() is None  # already configured: left as it is
    finally:
        jax.config.update("jax_compilation_cache_dir", prev)
