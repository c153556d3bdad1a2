"""Fast checks of the CLIP experiment scripts (experiments/clip_regression_toy.py, clip_table.py, bench_clip.py).

Oracles: finite-difference slopes of the trained toy network (numpy, independent of autodiff), the singular values
of a linear map (its Lipschitz constant), the Lipschitz constant of ``a + b tanh(x)`` in closed form, the train
accuracy that ``fit_sweep`` itself computed with its own eval step, the warm-up rule of the discrepancy principle,
and ``numpy`` means / sample standard deviations.
"""
import csv
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import clip_regression_toy as toy  # noqa: E402
from experiments import clip_table as table  # noqa: E402

# Out of the default run (it must stay under 3 minutes on 2 cores): the CLIP study scripts.
# CI runs it with -m slow.
pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------ Lipschitz helper
def test_pair_ascent_lipschitz_is_not_fooled_by_float32_rounding():
    # f has Lipschitz constant exactly 0.05 (slope at x = 0); the ascent collapses pairs to a few ulps, where the
    # float32 quotient is a ratio of rounding errors. The float64 re-scoring must stay a true lower bound.
    apply_fn = lambda variables, xs: variables["a"] + variables["b"] * jnp.tanh(xs)  # noqa: E731
    b = np.float32(0.05)
    variables = {"a": jnp.float32(0.25), "b": jnp.asarray(b)}
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    u = jax.random.uniform(k1, (100, 1), minval=-4.0, maxval=4.0)
    v = u + 0.1 * jax.random.normal(k2, u.shape)
    res = table.pair_ascent_lipschitz(apply_fn, variables, u, v, chunk=100, max_steps=400, rtol=0.0)
    # exact bound b (as stored in float32); float64 rounding at ~1e-8 separations is ~1e-8 relative
    assert 0.999 * float(b) <= res["estimate"] <= float(b) * (1 + 1e-7), res["estimate"]


def test_pair_ascent_lipschitz_of_a_linear_map_approaches_its_spectral_norm():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 6)).astype(np.float32)
    sigma = np.linalg.svd(w.astype(np.float64), compute_uv=False)[0]
    apply_fn = lambda variables, xs: xs.reshape(xs.shape[0], -1) @ variables["w"].T  # noqa: E731
    u = jnp.asarray(rng.uniform(size=(32, 2, 3)), jnp.float32)
    v = jnp.asarray(rng.uniform(size=(32, 2, 3)), jnp.float32)
    res = table.pair_ascent_lipschitz(apply_fn, {"w": jnp.asarray(w)}, u, v, chunk=25, max_steps=200)
    assert 0.98 * sigma <= res["estimate"] <= sigma * (1 + 1e-6), (res, sigma)


# ------------------------------------------------------------------------------------------------ regression toy
def fd_max_slope(model, params, lo, hi, h=2e-3):
    """max |f(x + h) - f(x)| / h over a grid of [lo, hi]: forward passes only, no autodiff."""
    x = np.arange(lo, hi, h, dtype=np.float64)
    y = np.asarray(model.apply({"params": params}, jnp.asarray(x[:, None], jnp.float32)), np.float64)[:, 0]
    return float(np.max(np.abs(np.diff(y)) / np.diff(x.astype(np.float32).astype(np.float64))))


WIDTHS = (64, 32)  # the script's network at a smaller width, to keep the test fast


@pytest.mark.slow
def test_toy_warm_starts_smoothness_order_estimates_and_outputs(tmp_path):
    # one test (one training run): under pytest-xdist a shared fixture would train once per worker
    model = toy.toy_model(WIDTHS)
    run = toy.fit_toy(toy.LAMBDAS, steps=150, lr=1e-2, num_pairs=32, chunk=150, model=model)
    train = toy.regression_toy("train", seed=0)

    def mse(params):
        pred = np.asarray(model.apply({"params": params}, jnp.asarray(train.images)), np.float64)
        return float(np.mean((pred - train.labels) ** 2))

    # warm starts, in the documented order: lambda k starts where lambda k-1 stopped
    assert run.lams == (10.0, 1.0, 1e-10, 0.0)
    for k in range(1, 4):
        assert run.start_mse[k] == pytest.approx(mse(run.params[k - 1]), rel=1e-5)
        assert run.start_mse[k] == pytest.approx(run.final_mse[k - 1], rel=1e-5)
    assert run.final_mse[3] < run.start_mse[0]

    # lambda = 10 is smoother than lambda = 0, by finite differences and by the script's autodiff slope
    p10, p0 = run.params[0], run.params[3]
    fd10, fd0 = fd_max_slope(model, p10, -4, 4), fd_max_slope(model, p0, -4, 4)
    assert fd10 < 0.5 * fd0, (fd10, fd0)
    assert toy.max_abs_slope(model, p10, -4, 4) == pytest.approx(fd10, rel=2e-2)
    assert toy.max_abs_slope(model, p0, -4, 4) == pytest.approx(fd0, rel=2e-2)
    ests = []
    for i, params in ((0, p10), (3, p0)):
        est = toy.pair_ascent_estimate(model, params, key=jax.random.PRNGKey(i), num_pairs=128, max_steps=150)
        lo, hi = est["span"]
        # mean value theorem: no pair's quotient exceeds max |f'| over the interval the pairs span
        assert est["estimate"] <= 1.001 * fd_max_slope(model, params, min(lo, -4), max(hi, 4), h=5e-4)
        assert est["estimate"] >= 0.9 * fd_max_slope(model, params, -4, 4)
        ests.append(est["estimate"])
    assert ests[0] < ests[1]

    rows = [{"lam": lam, "lipschitz_pair_ascent": 1.0, "lipschitz_raw_float32": 1.0, "max_slope_grid": 1.0,
             "max_slope_pair_span": 1.0, "train_mse": 0.1, "target_mse_grid": 0.1, "target_mse_gaps": 0.1}
            for lam in run.lams]
    path = str(tmp_path / "toy.png")
    toy.plot_toy(model, run, path, rows)
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    md = toy.markdown_table(rows, {"steps": 1, "lr": 0.1, "data_loss": "sum", "num_pairs": 8, "command": "x",
                                   "device": "cpu", "train_wall_s": 1.0})
    assert md.count("\n| ") == 5  # header + one line per lambda


# ------------------------------------------------------------------------------------------------ MNIST table
def test_aggregate_row_mean_and_sample_std():
    per_seed = [{"train_acc": 0.5, "final_coeff": None}, {"train_acc": 0.7, "final_coeff": None},
                {"train_acc": 0.9, "final_coeff": None}]
    rec = table.aggregate_row("weightreg90", per_seed, 3)
    assert rec["method"] == "weightreg" and rec["target"] == 90 and rec["num_seeds"] == 3
    assert rec["train_acc_mean"] == pytest.approx(np.mean([0.5, 0.7, 0.9]))
    assert rec["train_acc_std"] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    assert rec["final_coeff_mean"] is None and rec["test_acc_mean"] is None
    assert set(rec) == set(table.CSV_COLUMNS)


@pytest.mark.slow
def test_table_one_epoch_one_seed_row(tmp_path, monkeypatch):
    eval_data = table.load_eval_data(None, test_limit=50, lip_pairs=16)
    kw = dict(epochs=1, seeds=[0], out_dir=str(tmp_path / "out"), workdir=str(tmp_path / "runs"), eval_data=eval_data,
              pgd_steps=2, lip_max_steps=50)
    res = table.run_row("clip90", **kw)
    assert res["trained_with"] == "fit_sweep", res["note"]
    (seed,) = res["per_seed"]
    # the training split evaluated here is the one fit_sweep trained and evaluated on (its own eval step)
    with open(os.path.join(res["workdir"], "sweep_results.json")) as fh:
        sweep_res = json.load(fh)
    assert seed["train_acc"] == pytest.approx(sweep_res["members"][0]["train_accuracy"], abs=1e-9)
    assert sweep_res["members"][0]["num_train"] == 3500
    # one epoch is inside the 6 warm-up epochs, where lambda is the warm-up value 0
    assert seed["final_coeff"] == 0.0
    for k in ("train_acc", "test_acc", "noise_acc", "noise_paper_acc", "pgd_acc", "pgd_ref_acc"):
        assert 0.0 <= seed[k] <= 1.0
    assert "official_test_acc" not in seed
    assert seed["lipschitz"] > 0 and np.isfinite(seed["lipschitz"])

    # resumable: a second call reads the saved row instead of training
    monkeypatch.setattr(table, "train_row", lambda *a, **k: pytest.fail("retrained a finished row"))
    again = table.run_row("clip90", **kw)
    assert again["per_seed"] == json.loads(json.dumps(res["per_seed"]))

    paths = table.write_outputs([again], {"epochs": 1, "seeds": [0], "pgd_steps": 2, "command": "test",
                                          "output": "linear", "device": "cpu", "wall_s": 1.0}, str(tmp_path / "out"))
    with open(paths["csv"]) as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == table.CSV_COLUMNS
        (row,) = list(reader)
    assert row["row"] == "clip90" and row["epochs"] == "1" and row["num_seeds"] == "1"
    assert float(row["train_acc_mean"]) == pytest.approx(seed["train_acc"])
    assert row["official_test_acc_mean"] == ""
    md = open(paths["md"]).read()
    assert "clip90: 91.8/91.6/78/36.2" in md and "54000" in md and "3500" in md
    assert "Our PGD is the stronger evaluation" in md and "PGD (ref. attack) %" in md


def test_unknown_row_is_rejected():
    with pytest.raises(ValueError, match="unknown row"):
        table.row_config("clip80", epochs=1)


def test_reference_variants_and_config_digest():
    from lcnn_jax.configs import load_config

    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs")
    cfg = lambda name: load_config(os.path.join(base, name))  # noqa: E731
    ours, ref, fixed = (cfg(f"clip_mnist5k.py:{v}").regularizers.clip.to_dict()
                        for v in ("clip90", "clip_reference90", "clip_reference"))
    # the reference code's settings: constant step, uniform U[0, 0.1), redraw every 2000 steps, lambda every 2nd epoch
    assert (ref["adaptive"], ref["perturb_dist"], ref["redraw_every_steps"], ref["redraw_every_epochs"],
            ref["cooldown"]) == (False, "uniform", 2000, None, 1)
    assert (ours["adaptive"], ours["perturb_dist"], ours["redraw_every_epochs"], ours["cooldown"]) == (
        True, "gaussian", 5, 0)
    for c in (ours, ref, fixed):  # its 6 warm-up epochs at lambda 0, its ascent step and squared, skipped term
        assert (c["warmup_epochs"], c["warmup_coeff"], c["coeff"], c["init_step"], c["squared"], c["skip_above"]) == (
            6, 0.0, 0.1, 20.0, True, 5000.0)
    assert fixed["target"] is None and ref["target"] == 0.9  # the shipped example never moves lambda
    # Fashion-MNIST holds out the reference's 6000 training images as the pair pool, like MNIST its 500
    assert cfg("clip_fashion_mnist.py:clip85").data.pair_pool_size == 6000
    assert cfg("clip_mnist5k.py:standard").data.pair_pool_size == 500
    # a changed row config gets another checkpoint folder and invalidates saved rows
    a, b = table.row_config("clip90", epochs=3), table.row_config("clip90", epochs=3, seed=5)
    assert table.config_digest(a) == table.config_digest(b)  # seeds are listed separately
    b.regularizers.clip.cooldown = 1
    assert table.config_digest(a) != table.config_digest(b)
