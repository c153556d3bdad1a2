"""Fast checks of experiments/smalldata_study.py (the small-data study of SPEC 1.2 / 1.4).

Oracles: a fabricated per-grid-point results dict whose validation and test argmaxes differ (selection must follow
validation), ``numpy`` means and sample standard deviations, a call counter on the training function (resume must
not train a finished unit again), and the data module's own subset draw (the training split the runs see).
"""
import json
import os
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import smalldata_study as study  # noqa: E402
from lcnn_jax import data as data_lib  # noqa: E402
from lcnn_jax.nn import make_model  # noqa: E402

# Out of the default run (it must stay under 3 minutes on 2 cores): the study script end to end.
# CI runs it with -m slow.
pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------ selection
def test_selection_follows_validation_not_test():
    stats = [
        {"grid": {"datagrad.coeff": 1.0}, "val_acc_mean": 0.90, "test_acc_mean": 0.99},  # best on TEST
        {"grid": {"datagrad.coeff": 10.0}, "val_acc_mean": 0.95, "test_acc_mean": 0.80},  # best on VAL
        {"grid": {"datagrad.coeff": 100.0}, "val_acc_mean": 0.93, "test_acc_mean": 0.97},
    ]
    assert study.select_by_validation(stats)["grid"] == {"datagrad.coeff": 10.0}
    # the choice does not move when only test accuracies change
    shuffled = [{**s, "test_acc_mean": t} for s, t in zip(stats, (0.1, 0.2, 0.3))]
    assert study.select_by_validation(shuffled)["grid"] == {"datagrad.coeff": 10.0}
    # and moves when validation does
    moved = [{**s, "val_acc_mean": v} for s, v in zip(stats, (0.96, 0.95, 0.93))]
    assert study.select_by_validation(moved)["grid"] == {"datagrad.coeff": 1.0}


def test_selection_skips_points_without_validation_and_rejects_empty():
    stats = [{"grid": {"a.coeff": 1.0}, "val_acc_mean": None}, {"grid": {"a.coeff": 2.0}, "val_acc_mean": 0.5}]
    assert study.select_by_validation(stats)["grid"] == {"a.coeff": 2.0}
    with pytest.raises(ValueError, match="validation"):
        study.select_by_validation([{"grid": {}, "val_acc_mean": None}])


# ------------------------------------------------------------------------------------------------ aggregation
def test_grid_stats_and_aggregate_equal_numpy_mean_and_sample_std():
    rng = np.random.default_rng(0)
    members = []
    for seed in range(5):
        for c in (0.1, 1.0):
            members.append({"seed": seed, "grid": {"x.coeff": c}, "diverged": seed == 4 and c == 1.0,
                            "val_acc": float(rng.uniform()), "test_acc": float(rng.uniform())})
    stats = {s["grid"]["x.coeff"]: s for s in study.grid_stats(members)}
    for c, n_ok in ((0.1, 5), (1.0, 4)):  # the diverged member is left out
        ok = [m for m in members if m["grid"]["x.coeff"] == c and not m["diverged"]]
        assert len(ok) == n_ok and stats[c]["seeds"] == [m["seed"] for m in ok]
        for metric in ("val_acc", "test_acc"):
            vals = np.array([m[metric] for m in ok])
            np.testing.assert_allclose(stats[c][f"{metric}_mean"], vals.mean(), rtol=1e-12)
            np.testing.assert_allclose(stats[c][f"{metric}_std"], vals.std(ddof=1), rtol=1e-12)
    assert stats[1.0]["num_diverged"] == 1

    per_seed = [{"test_acc": float(v), "jac_train": float(w)} for v, w in rng.uniform(size=(4, 2))]
    agg = study.aggregate(per_seed, metrics=("test_acc", "jac_train", "pgd_l2"))
    for m in ("test_acc", "jac_train"):
        vals = np.array([s[m] for s in per_seed])
        np.testing.assert_allclose(agg[f"{m}_mean"], vals.mean(), rtol=1e-12)
        np.testing.assert_allclose(agg[f"{m}_std"], vals.std(ddof=1), rtol=1e-12)
    assert agg["pgd_l2_mean"] is None and agg["pgd_l2_std"] is None
    assert study.mean_std([0.5]) == (0.5, 0.0)


# ------------------------------------------------------------------------------------------------ data
def test_pool_splits_train_is_the_runs_subset_and_val_is_disjoint():
    train, val = study.pool_splits(train_size=200, val_size=100, subset_seed=3)
    # what prepare_run trains on: data.subset of the mnist5k training pool with subset_seed
    expected = data_lib.subset(data_lib.load_split("mnist5k", "train"), 200, seed=3)
    np.testing.assert_array_equal(train.images, expected.images)
    np.testing.assert_array_equal(train.labels, expected.labels)
    assert len(val.labels) == 100 and np.all(np.bincount(val.labels, minlength=10) == 10)  # stratified
    seen = {img.tobytes() for img in train.images}
    assert not any(img.tobytes() in seen for img in val.images)


# ------------------------------------------------------------------------------------------------ resume
class FakeState(NamedTuple):
    params: dict
    model_state: dict


def _tiny_setup():
    model = make_model("mlp", 10, widths=(4,))
    rng = np.random.default_rng(0)

    def split(n):
        return data_lib.Split(rng.uniform(size=(n, 28, 28, 1)).astype(np.float32),
                              rng.integers(0, 10, size=n).astype(np.int32))

    data = {"train": split(8), "val": split(8), "test": split(8)}
    return model, data


def test_run_unit_trains_once_then_resumes_from_its_file(tmp_path):
    model, data = _tiny_setup()
    calls = []

    def fake_train(unit, *, epochs, seeds, workdir, vectorize):
        calls.append((unit, epochs, tuple(seeds), vectorize))
        out = []
        for seed in seeds:
            for c in study.unit_grid(unit)["datagrad.coeff"]:
                params = model.init(jax.random.PRNGKey(seed * 100 + int(c)), jnp.zeros((1, 28, 28, 1)))["params"]
                out.append(({"seed": seed, "grid": {"datagrad.coeff": c}, "diverged": False}, FakeState(params, {})))
        return model, out, 1

    kw = dict(seeds=(0, 1), out_dir=str(tmp_path / "out"), workdir=str(tmp_path / "runs"), data=data, pgd_n=4,
              jac_n=4, train_fn=fake_train)
    first = study.run_unit("mlp/datagrad", epochs=3, **kw)
    assert len(calls) == 1 and calls[0][3] is True  # mlp units are one vmapped program
    path = study.unit_path(kw["out_dir"], "mlp/datagrad")
    assert os.path.exists(path)
    # the selection recorded is the validation argmax of the recorded grid statistics
    best = max(first["grid_stats"], key=lambda s: s["val_acc_mean"])
    assert first["selected"] == best["grid"]
    assert {s["seed"] for s in first["per_seed"]} == {0, 1}
    assert all(s["grid"] == first["selected"] for s in first["per_seed"])

    again = study.run_unit("mlp/datagrad", epochs=3, **kw)
    assert len(calls) == 1  # skipped: nothing trained
    assert again == json.loads(json.dumps(first))

    study.run_unit("mlp/datagrad", epochs=4, **kw)  # other settings: not the same work, trains again
    assert len(calls) == 2

    study.write_all(kw["out_dir"])
    with open(os.path.join(kw["out_dir"], "table1.csv")) as fh:
        rows = fh.read().splitlines()
    assert len(rows) == 2 and rows[1].startswith("mlp,datagrad,")
