"""`lcnn-jax compare` on a tiny problem: files and columns, aggregates against numpy, the bold best entries,
resuming without recomputation, and the error for an unknown method.

Oracles: ``numpy`` mean / sample std of the per-cell values read back from ``results.csv``; argmax/argmin of the
aggregate means computed here from the cells; call counts of spied train/measure functions.
"""
import csv
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcnn_jax import compare  # noqa: E402
from lcnn_jax.compare import run as compare_run  # noqa: E402  (where run_compare looks its helpers up)
from lcnn_jax.train import sweep  # noqa: E402
from lcnn_jax.configs import apply_overrides, load_config  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs",
                      "compare_mnist5k.py")
METHODS = ("standard", "datagrad")
SEEDS = (0, 1)


def tiny_config():
    """The shipped compare config, shrunk: MLP 784-16-10 (ReLU, so minimum sharpness is defined), 2 methods,
    2 seeds, 12 steps, 16 measured images, 2-step PGD, 3-step APGD, certified accuracy at the attacks' L2 radius."""
    config = load_config(CONFIG)
    config.model.name = "mlp"
    config.model.kwargs = {"widths": (16,), "act": "relu"}
    apply_overrides(config, [
        f"compare.methods={METHODS!r}", f"compare.seeds={SEEDS!r}", "compare.progress=False",
        "train.num_steps=12", "train.batch_size=32", "train.log_every=6", "train.checkpoint_every=6",
        "train.progress=False", "train.eval_batch_size=1000",
        "compare.measure.num_examples=16", "compare.measure.batch_size=16", "compare.measure.hessian_examples=16",
        "compare.measure.hessian_probes=2", "compare.measure.hessian_lanczos_iters=3",
        "compare.measure.lipschitz_iters=2", "compare.measure.curvature_iters=2", "compare.measure.pgd_steps=2",
        "compare.measure.pgd_l2_eps=(1.0,)", "compare.sharpness_chunk=16", "compare.measure.apgd_steps=3",
        "compare.measure.certified_l2_eps=(0.01, 1.0)",
        "compare.method_specs.datagrad.regularizers.datagrad.coeff=0.1",
    ])
    return config


@pytest.mark.slow
def test_compare_end_to_end(tmp_path, monkeypatch):
    """One tiny compare run (compiling dominates), then every check on it, in order; one test function so that
    pytest-xdist never runs the compare twice in parallel workers."""
    workdir = str(tmp_path / "compare")
    built, real = [], compare.Measurer
    monkeypatch.setattr(compare_run, "Measurer", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    run = (workdir, compare.run_compare(tiny_config(), workdir))
    assert len(built) == 1  # standard and datagrad train the same MLP: one compiled measurement suite
    monkeypatch.undo()
    check_all_files_exist_with_the_documented_columns(run)
    check_aggregate_is_numpy_mean_and_sample_std_of_the_cells(run)
    check_bold_marks_the_best_mean_in_each_ranked_column(run)
    check_rerun_recomputes_nothing(run, monkeypatch)
    monkeypatch.undo()
    check_a_missing_cell_is_measured_again_from_the_checkpoint_without_training(run, monkeypatch)


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def check_all_files_exist_with_the_documented_columns(run):
    workdir, obj = run
    names = [c["name"] for c in obj["columns"]]
    assert names == [c["name"] for c in compare.columns(tiny_config().compare.measure)]
    for required in ("test_accuracy", "clean_accuracy", "jacobian_frobenius", "curvature", "gradient_stability",
                     "local_lipschitz", "hessian_trace", "minimum_sharpness", "pgd_linf_0.1", "pgd_l2_1",
                     "apgd_linf_0.1", "apgd_l2_1", "certified_l2_0.01", "certified_l2_1", "certified_radius",
                     "noise_1"):
        assert required in names
    rows = read_csv(os.path.join(workdir, "results.csv"))
    assert list(rows[0].keys()) == ["method", "seed", "member", "diverged"] + names
    assert sorted((r["method"], int(r["seed"])) for r in rows) == sorted((m, s) for m in METHODS for s in SEEDS)
    summary = read_csv(os.path.join(workdir, "results_summary.csv"))
    assert [r["method"] for r in summary] == list(METHODS)
    assert list(summary[0].keys()) == ["method", "num_seeds"] + [f"{n}_{s}" for n in names for s in ("mean", "std")]
    with open(os.path.join(workdir, "results.json")) as fh:
        js = json.load(fh)
    assert set(js["aggregate"]) == set(METHODS) and len(js["cells"]) == len(METHODS) * len(SEEDS)
    for m in METHODS:
        for s in SEEDS:
            assert os.path.exists(os.path.join(workdir, "cells", m, f"seed{s}.json"))
    for fig in ("accuracy_vs_curvature.png", "robustness_vs_jacobian.png"):
        path = os.path.join(workdir, "figures", fig)
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # every measured value of a ReLU MLP is finite, accuracies are fractions, norms positive
    for r in rows:
        for n in names:
            v = float(r[n])
            assert np.isfinite(v), (r["method"], n)
            if n.endswith("accuracy") or n.startswith(("pgd_", "apgd_", "noise_", "certified_l2")):
                assert 0.0 <= v <= 1.0
        assert float(r["jacobian_frobenius"]) > 0 and float(r["minimum_sharpness"]) > 0
        # a certificate is never beaten by an attack; the worst case is never above the clean accuracy
        assert float(r["certified_l2_1"]) <= float(r["apgd_l2_1"]) <= float(r["clean_accuracy"])
        assert float(r["certified_l2_1"]) <= float(r["certified_l2_0.01"]) <= float(r["clean_accuracy"])


def check_aggregate_is_numpy_mean_and_sample_std_of_the_cells(run):
    workdir, _ = run
    rows = read_csv(os.path.join(workdir, "results.csv"))
    with open(os.path.join(workdir, "results.json")) as fh:
        js = json.load(fh)
    for m in METHODS:
        mine = [r for r in rows if r["method"] == m]
        for col in js["columns"]:
            vals = np.array([float(r[col["name"]]) for r in mine])
            agg = js["aggregate"][m][col["name"]]
            np.testing.assert_allclose(agg["mean"], vals.mean(), rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(agg["std"], vals.std(ddof=1), rtol=1e-9, atol=1e-15)
            assert agg["n"] == len(SEEDS)
    # seeds differ: the two seeds of a method are not the same network
    std = [r for r in rows if r["method"] == "standard"]
    assert float(std[0]["jacobian_frobenius"]) != float(std[1]["jacobian_frobenius"])


def parse_markdown(path):
    with open(path) as fh:
        lines = [l.strip() for l in fh if l.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header[1:], cells[1:]))
    return header[1:], table


def check_bold_marks_the_best_mean_in_each_ranked_column(run):
    workdir, _ = run
    rows = read_csv(os.path.join(workdir, "results.csv"))
    with open(os.path.join(workdir, "results.json")) as fh:
        js = json.load(fh)
    header, table = parse_markdown(os.path.join(workdir, "results.md"))
    assert list(table) == list(METHODS)
    checked = 0
    for col, label in zip(js["columns"], header):
        means = {m: np.mean([float(r[col["name"]]) for r in rows if r["method"] == m]) for m in METHODS}
        bold = {m for m in METHODS if table[m][label].startswith("**")}
        if col["direction"] is None:
            assert not bold
            assert label == col["label"]
            continue
        assert label.endswith("↑" if col["direction"] == "higher" else "↓")
        pick = max if col["direction"] == "higher" else min
        target = pick(means.values())
        assert bold == {m for m, v in means.items() if v == target}, (col["name"], means, bold)
        checked += 1
    assert checked >= 10


def test_markdown_best_on_known_aggregates():
    cols = [{"name": "test_accuracy", "label": "acc", "direction": "higher"},
            {"name": "curvature", "label": "curv", "direction": "lower"},
            {"name": "train_time_s", "label": "t", "direction": None}]
    cells = [{"method": "a", "test_accuracy": 0.9, "curvature": 3.0, "train_time_s": 1.0},
             {"method": "a", "test_accuracy": 0.8, "curvature": 5.0, "train_time_s": 1.0},
             {"method": "b", "test_accuracy": 0.95, "curvature": 7.0, "train_time_s": 2.0},
             {"method": "b", "test_accuracy": 0.5, "curvature": float("nan"), "train_time_s": 2.0},
             {"method": "c", "test_accuracy": 0.99, "curvature": 1.0, "train_time_s": 3.0, "diverged": True}]
    agg = compare.aggregate(cells, [c["name"] for c in cols], ["a", "b", "c"])
    assert agg["a"]["test_accuracy"]["mean"] == pytest.approx(0.85)
    assert agg["a"]["test_accuracy"]["std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert agg["b"]["curvature"] == {"mean": 7.0, "std": 0.0, "n": 1}  # NaN left out
    assert agg["c"]["test_accuracy"]["n"] == 0  # diverged left out
    best = compare.best_methods(agg, cols)
    assert best == {"test_accuracy": ["a"], "curvature": ["a"]}  # 0.85 > 0.725; 4 < 7
    md = compare.format_markdown(agg, cols, best)
    assert "| a | **85.0 ± 7.1** | **4 ± 1.4** | 1 ± 0 |" in md
    assert "| c | n/a | n/a | n/a |" in md


def check_rerun_recomputes_nothing(run, monkeypatch):
    workdir, first = run
    calls = {"train": 0, "measure": 0, "fit_sweep": 0}

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(compare_run, "train_method", spy("train", compare.train_method))
    monkeypatch.setattr(compare_run, "measure_cell", spy("measure", compare.measure_cell))
    monkeypatch.setattr(sweep, "fit_sweep", spy("fit_sweep", sweep.fit_sweep))
    mtimes = {m: os.path.getmtime(os.path.join(workdir, "cells", m, "seed0.json")) for m in METHODS}
    again = compare.run_compare(tiny_config(), workdir)
    assert calls == {"train": 0, "measure": 0, "fit_sweep": 0}
    assert mtimes == {m: os.path.getmtime(os.path.join(workdir, "cells", m, "seed0.json")) for m in METHODS}
    assert again["aggregate"] == json.loads(json.dumps(first["aggregate"]))


def check_a_missing_cell_is_measured_again_from_the_checkpoint_without_training(run, monkeypatch):
    workdir, first = run
    calls = {"measure": 0, "fit_sweep": 0}

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    path = os.path.join(workdir, "cells", "datagrad", "seed1.json")
    with open(path) as fh:
        before = json.load(fh)
    os.remove(path)
    monkeypatch.setattr(compare_run, "measure_cell", spy("measure", compare.measure_cell))
    monkeypatch.setattr(sweep, "fit_sweep", spy("fit_sweep", sweep.fit_sweep))
    compare.run_compare(tiny_config(), workdir)
    assert calls == {"measure": 1, "fit_sweep": 0}
    with open(path) as fh:
        after = json.load(fh)
    # same checkpoint, same measurement key: the same numbers, although the first run measured this cell with
    # the suite compiled for `standard` and this run builds one for `datagrad` alone
    for k in ("test_accuracy", "jacobian_frobenius", "curvature", "minimum_sharpness", "pgd_l2_1"):
        assert after[k] == pytest.approx(before[k], rel=1e-5), k


def test_unknown_method_is_a_clear_error_naming_the_choices(tmp_path):
    config = tiny_config()
    config.compare.methods = ("standard", "dropout")
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['dropout'\]") as err:
        compare.run_compare(config, str(tmp_path))
    for name in ("standard", "weight_decay", "lcnn", "datagrad", "spectreg", "jacreg", "derivative",
                 "derivative_secant", "clip"):
        assert f"'{name}'" in str(err.value)
    assert not os.listdir(tmp_path)  # nothing trained or written


def test_method_configs_follow_the_specs():
    config = load_config(CONFIG)
    assert compare.check_methods(config) == ("standard", "weight_decay", "lcnn", "datagrad", "spectreg",
                                             "derivative", "derivative_secant", "clip",
                                             "adversarial")  # quick: JacReg in :full
    lcnn = compare.method_config(config, "lcnn")
    assert lcnn.model.name == "lcnn_small_cnn" and "act" not in lcnn.model.kwargs  # no relu inherited
    assert set(lcnn.regularizers.keys()) == {"lcnn"}
    assert compare.method_config(config, "weight_decay").optim.weight_decay == 5e-4
    assert compare.method_config(config, "standard").optim.weight_decay == 0.0
    assert compare.is_piecewise_linear(compare.method_config(config, "clip"))
    assert not compare.is_piecewise_linear(lcnn)
    # one width reference: overriding the base width resizes the LCNN variant too
    apply_overrides(config, ["model.kwargs.width_mult=0.5"])
    assert compare.method_config(config, "lcnn").model.kwargs.width_mult == 0.5
    full = load_config(CONFIG + ":full")
    assert full.compare.seeds == (0, 1, 2) and full.train.num_epochs > config.train.num_epochs
    assert compare.check_methods(full) == compare.check_methods(config)[:5] + ("jacreg", "derivative",
                                                                             "derivative_secant", "clip",
                                                                             "adversarial")
    adv = compare.method_config(config, "adversarial").regularizers.adversarial
    assert (adv.coeff, adv.norm, adv.eps, adv.num_steps) == (1.0, "l2", 1.0, 3)
    assert config.compare.measure.robust_attacks == ("apgd", "pgd")  # the README compares the two
    assert compare.method_config(config, "derivative").regularizers.derivative.reading == "target"
    assert compare.method_config(config, "derivative_secant").regularizers.derivative.reading == "secant_tangent"
    with pytest.raises(ValueError, match="quick"):
        load_config(CONFIG + ":huge")


def test_cli_compare_bad_method_exits_2(tmp_path, capsys):
    from lcnn_jax import cli

    rc = cli.main(["compare", "--config", CONFIG, "--workdir", str(tmp_path / "w"),
                   "--config.compare.methods=('nope',)"])
    assert rc == 2
    assert "nope" in capsys.readouterr().err
