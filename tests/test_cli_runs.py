"""The command line around runs of one's own model (issue 15): ``lcnn-jax sweep`` trains the config's sweep section
(``train`` refuses one), ``lcnn-jax measure`` says what a sweep or compare run holds and measures the members
chosen (exit 2 listing them when the choice is missing, ambiguous or wrong), and the tables fit 120 characters.

The fast tests work on hand-made run directories (nothing is trained or loaded) and synthetic results; the
``slow`` ones train a batch-norm + dropout model of tests/_own_models.py as a sweep and in a compare run.
"""
import json
import os
import re

import numpy as np
import pytest
from _own_models import (MODELS_FILE, BNDropNet, accuracy, one_paragraph_error, registry,  # noqa: F401 (fixture)
                         tiny_config, tiny_config_file)

from lcnn_jax import cli, compare, report, runs
from lcnn_jax import train as training
from lcnn_jax import io as lio
from lcnn_jax.train import single as train_single, sweep
from lcnn_jax.configs import default_config
from lcnn_jax.nn import register_model
from lcnn_jax.tables import fit_columns, format_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "experiments", "configs", "quickstart.py")


# ----------------------------------------------------------------------------------------------------------
# The command line: sweeps, member choice (hand-made run directories: nothing is trained or loaded)


def test_train_refuses_a_sweep_section_before_loading_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_single, "prepare_run", lambda *a, **k: pytest.fail("train must stop before loading"))
    rc = cli.main(["train", "--config", QUICKSTART, "--workdir", str(tmp_path / "w"), "--config.sweep.seeds=(0,1)",
                   "--config.regularizers.datagrad.coeff=0.0", "--config.sweep.grid.datagrad.coeff=(0.0,0.01)"])
    msg = one_paragraph_error(capsys.readouterr().err)
    assert rc == 2 and "4 members" in msg and "`lcnn-jax sweep --config" in msg
    assert not os.path.exists(tmp_path / "w")
    config = default_config()
    assert sweep.single_run_conflict(config) is None
    config.sweep.seeds = (0,)  # the config's own seed: one run, the one train trains
    assert sweep.single_run_conflict(config) is None
    config.sweep.seeds = (3,)
    assert sweep.single_run_conflict(config) == "sweep.seeds=(3,): 1 member"


def _fake_sweep(path, seeds=(0, 1), coeffs=(0.0, 0.01)):
    """The files of a finished sweep, without checkpoints: enough to list and choose members."""
    members = training.sweep_members(seeds, {"spectreg.coeff": coeffs})
    os.makedirs(path, exist_ok=True)
    lio.write_json_atomic(os.path.join(path, "config.json"), default_config().to_dict())
    lio.write_json_atomic(os.path.join(path, "sweep.json"), {
        "seeds": list(seeds), "grid": {"spectreg.coeff": list(coeffs)}, "data_order": "per_seed",
        "members": [{"index": m.index, "id": m.id, "seed": m.seed, "grid": m.values} for m in members]})
    for m in members:
        os.makedirs(os.path.join(path, "members", m.id), exist_ok=True)
    return members


@pytest.mark.parametrize("args, needles", [
    ([], ["holds a sweep of 4 members (seeds 0, 1 x spectreg.coeff 0, 0.01); say which to measure",
          "member 003 (seed 1, spectreg.coeff=0.01)", "--member all"]),
    (["--seed", "1"], ["--seed 1 matches 2 of them: member 002 (seed 1, spectreg.coeff=0); member 003"]),
    (["--member", "7"], ["none of them matches --member 7. Members: member 000"]),
    (["--method", "lcnn"], ["--method chooses among the methods of a compare run"]),
])
def test_measure_on_a_sweep_says_which_members_exist(tmp_path, monkeypatch, capsys, args, needles):
    _fake_sweep(str(tmp_path / "sw"))
    monkeypatch.setattr(sweep, "load_sweep", lambda *a: pytest.fail("nothing may be loaded"))
    assert cli.main(["measure", "--workdir", str(tmp_path / "sw")] + args) == 2
    msg = one_paragraph_error(capsys.readouterr().err)
    assert all(n in msg for n in needles), msg


def test_member_selection_on_sweeps_member_folders_and_runs(tmp_path):
    _fake_sweep(str(tmp_path / "sw"))
    wd = runs.inspect_workdir(str(tmp_path / "sw"))
    assert wd.kind == "sweep" and [m.id for m in wd.members] == ["000", "001", "002", "003"]
    by = lambda **k: [m.id for m in runs.select_members(wd, **k)]  # noqa: E731
    assert by(member="002") == ["002"] == by(member=2) == by(member="2")
    assert by(member="all") == ["000", "001", "002", "003"] and by(member="all", seed=1) == ["002", "003"]
    one = runs.inspect_workdir(str(tmp_path / "sw" / "members" / "001"))
    assert one.kind == "member" and [m.id for m in runs.select_members(one)] == ["001"]
    assert one.members[0].out_dir == os.path.join(str(tmp_path / "sw"), "members", "001")
    with pytest.raises(runs.MemberChoiceError, match="none of them matches --member 000"):
        runs.select_members(one, member="000")
    single = tmp_path / "run"
    single.mkdir()
    lio.write_json_atomic(str(single / "config.json"), default_config().to_dict())
    wd = runs.inspect_workdir(str(single))
    assert wd.kind == "run" and runs.select_members(wd) == wd.members == runs.select_members(wd, member="all")
    with pytest.raises(runs.MemberChoiceError, match="holds a single training run; --member / --seed / --method"):
        runs.select_members(wd, seed=0)


def test_compare_members_come_from_the_method_sweeps_the_cells_name(tmp_path):
    root = tmp_path / "cmp"
    config = default_config()
    config.compare = {"methods": ("standard", "lcnn"), "seeds": (0, 1)}
    os.makedirs(root)
    lio.write_json_atomic(str(root / "config.json"), config.to_dict())
    old, new = "standard-0123456789-s0_1", "standard-abcdefabcd-s0_1"
    for name in (new, old, "lcnn-aaaaaaaaaa-s0_1"):
        _fake_sweep(str(root / "runs" / name), seeds=(0, 1), coeffs=(0.0,))
    os.makedirs(root / "cells" / "standard")
    lio.write_json_atomic(str(root / "cells" / "standard" / "seed1.json"),
                               {"method": "standard", "seed": 1, "run_dir": os.path.join("runs", old)})
    wd = runs.inspect_workdir(str(root))
    assert wd.kind == "compare" and "2 methods: standard, lcnn" in wd.description
    assert [m.label for m in wd.members] == ["standard, seed 0", "standard, seed 1", "lcnn, seed 0", "lcnn, seed 1"]
    chosen = runs.select_members(wd, method="standard", seed=1)
    assert len(chosen) == 1 and chosen[0].run_dir.endswith(old)  # the sweep its cell file names
    assert chosen[0].out_dir == os.path.join(str(root), "runs", old, "members", "001")
    with pytest.raises(runs.MemberChoiceError, match="named by method and seed"):
        runs.select_members(wd, member="000")
    with pytest.raises(runs.MemberChoiceError, match="--method standard matches 2 of them"):
        runs.select_members(wd, method="standard")


# ----------------------------------------------------------------------------------------------------------
# Tables a terminal can hold


def test_priority_order_takes_all_matches_or_the_first_of_a_group():
    from lcnn_jax.tables import priority_order

    names = ["acc", "pgd_linf_0.1", "pgd_l2_1", "pgd_l2_2", "curv", "time"]
    assert priority_order(names, ("acc", ("pgd_l2_*", "pgd_linf_*"), "curv", "pgd_*")) == [0, 2, 4, 1, 3, 5]
    assert priority_order(names, ("time", "pgd_l2_*")) == [5, 2, 3, 0, 1, 4]


def test_format_table_keeps_the_priority_columns_that_fit():
    assert fit_columns([10, 30, 30, 5], fixed=1, width=50) == [0, 1, 3]  # 10+2+30+2+5; the second 30 is left out
    assert fit_columns([10, 30, 30, 5], fixed=1, priority=[2, 1], width=50) == [0, 2, 3]
    assert fit_columns([200, 3], fixed=1, width=120) == [0]  # the label column always stays
    text, hidden = format_table(["name", "a", "bbbbbb"], [["x", "1", "2"], ["yy", "10", "20"]], width=12)
    assert text.splitlines() == ["name   a", "x      1", "yy    10"] and hidden == [2]


def _aggregate(cols, methods):
    rng = np.random.default_rng(0)
    return {m: {c["name"]: {"mean": float(rng.uniform(0.2, 0.9)), "std": 0.01, "n": 2} for c in cols}
            for m in methods}


def test_compare_prints_at_most_120_characters_and_names_the_rest():
    mcfg = report.measure_defaults()
    cols = compare.columns(mcfg)
    assert len(cols) >= 17
    methods = ["standard", "weight_decay", "lcnn", "datagrad", "spectreg", "derivative", "clip"]
    agg = _aggregate(cols, methods)
    best = compare.best_methods(agg, cols)
    text, hidden = compare.format_compact(agg, cols, best)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120 and len(lines) == 1 + len(methods)
    header = lines[0]
    # accuracy, one L2 robust accuracy and the input smoothness come first; the rest where there is room
    assert header.startswith("method  ") and "test acc % ↑" in header and re.search(r"PGD-L2 \S+ % ↑", header)
    assert "curvature ↓" in header and "Jacobian norm ↓" in header
    assert "train acc" not in header and "train acc" in hidden
    shown = [c for c in cols if c["label"] not in hidden]
    assert len(shown) + len(hidden) == len(cols) and len(shown) >= 6
    best_test = best["test_accuracy"][0]
    row = next(line for line in lines if line.startswith(best_test + " "))
    assert f"{100 * agg[best_test]['test_accuracy']['mean']:.1f} ± 1.0*" in row


def test_sweep_summary_and_member_table_fit_120_characters():
    members = training.sweep_members((0, 1), {"datagrad.coeff": (0.0, 0.001), "clip.coeff": (0.1, 0.2)})
    results = [{"index": m.index, "id": m.id, "seed": m.seed, "grid": m.values, "diverged": m.index == 3,
                "diverged_at": 7 if m.index == 3 else None, "dead": False, "test_accuracy": 0.5 + 0.01 * m.index,
                "train_accuracy": 0.6, "test_loss": 1.25, "train_loss": 1.0} for m in members]
    summary = {"members": results, "seeds": [0, 1], "grid": {"datagrad.coeff": [0.0, 0.001], "clip.coeff": [0.1, 0.2]},
               "aggregate": sweep.aggregate_members(results), "diverged": ["003"]}
    text = sweep.format_summary(summary, "runs/sw")
    assert max(len(line) for line in text.splitlines()) <= 120
    assert re.search(r"^003\s+0\s+0\.001\s+0\.2\s+53\.00\s+60\.00\s+1\.2500\s+diverged at step 7$", text, re.M)
    assert re.search(r"^datagrad.coeff=0.001, clip.coeff=0.2\s+1 \(1 diverged\)\s+57\.00 ± 0\.00", text, re.M)
    assert "WARNING: member(s) 003 diverged" in text

    item = {"mean": 0.5, "std": 0.1, "n": 8}
    rep = {"test": {k: dict(item) for k in ("jacobian_frobenius", "curvature", "hessian_norm", "grad_norm",
                                            "gradient_stability", "local_lipschitz", "accuracy", "pgd_linf_0.1",
                                            "pgd_l2_1", "pgd_l2_2", "noise_1")},
           "parameter_space": {"hessian_trace": dict(item), "hessian_top_eigenvalue": dict(item)}}
    labelled = [(runs.RunMember(f"member {m.id} (seed {m.seed})", "", m.index, m.id, m.seed, {}, None, ""), rep)
                for m in members]
    text, hidden = report.format_members(labelled)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120 and lines[0].startswith("means over the measured test examples")
    assert lines[1].split()[:5] == ["network", "accuracy", "pgd_l2_1", "curvature", "jacobian_frobenius"]
    assert "hessian_top_eigenvalue" in hidden
    assert lines[2].startswith("000 (seed 0)")


# ----------------------------------------------------------------------------------------------------------
# End to end (slow)


@pytest.mark.slow
def test_sweep_command_then_measure_every_member_of_a_batch_norm_dropout_model(registry, tmp_path, capsys):
    """``lcnn-jax sweep`` of a model with batch statistics and dropout: member 1 equals the single ``fit`` of its
    config (same dropout masks, same running statistics), and ``measure --member all --seed 1`` measures the two
    members of seed 1, each with its own weights (the others get no measures.json)."""
    from lcnn_jax import data as data_lib

    here = MODELS_FILE  # named by its import path: a fresh process could measure it
    cfg_file = tiny_config_file(tmp_path, here + ":BNDropNet")
    workdir = str(tmp_path / "sw")
    assert cli.main(["sweep", "--config", cfg_file, "--workdir", workdir, "--config.sweep.seeds=(0,1)",
                     "--config.sweep.grid.spectreg.coeff=(0.0,0.01)"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^001\s+0\s+0\.01\s+\d+\.\d\d\s+\d+\.\d\d", out, re.M) and "mean ± std over seeds" in out
    summary = json.load(open(os.path.join(workdir, "sweep_results.json")))
    single = training.fit(training.member_config(
        tiny_config(tmp_path, f"{here}:BNDropNet"), training.sweep_members((0, 1), {"spectreg.coeff": (0.0, 0.01)})[1]),
        str(tmp_path / "single"))
    for key in ("test_accuracy", "train_loss"):
        assert summary["members"][1][key] == pytest.approx(single[key], rel=1e-4, abs=1e-5)

    assert cli.main(["measure", "--workdir", workdir, "--member", "all", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "a sweep of 4 members (seeds 0, 1 x spectreg.coeff 0, 0.01); measuring 2 networks: 002, 003" in out
    # one table row per measured member (a row: the label, then its numbers; warnings under the table also start
    # with the label)
    assert re.findall(r"^(00\d) \(seed 1, spectreg.coeff=0(?:\.01)?\) +\d", out, re.M) == ["002", "003"]
    _, model, stacked, members = sweep.load_sweep(workdir)
    test = data_lib.load_split("mnist5k", "test")
    assert not os.path.exists(os.path.join(workdir, "members", "000", "measures.json"))
    for m in members[2:]:
        rep = json.load(open(os.path.join(workdir, "members", m.id, "measures.json")))
        assert rep["member"]["id"] == m.id and rep["checkpoint_step"] == 6
        want = accuracy(model, training.member_state(stacked, m.index), test.images[:8], test.labels[:8])
        assert rep["test"]["accuracy"]["mean"] == pytest.approx(want, abs=1e-6)


@pytest.mark.slow
def test_compare_trains_and_measures_a_registered_model(registry, tmp_path, capsys):
    register_model("bn_drop", BNDropNet)
    config = tiny_config(tmp_path, "bn_drop")
    config.compare = dict(
        methods=("plain", "spectreg"), seeds=(0,), sharpness="auto", progress=False,
        method_specs={"plain": {"regularizers": {}}, "spectreg": {"regularizers": {"spectreg": {"coeff": 0.01}}}},
        measure=config.measure.to_dict())
    workdir = str(tmp_path / "cmp")
    res = compare.run_compare(config, workdir)
    assert res["methods"] == ["plain", "spectreg"]
    for method in res["methods"]:
        agg = res["aggregate"][method]
        assert agg["test_accuracy"]["n"] == 1 and np.isfinite(agg["curvature"]["mean"])
        assert np.isnan(agg["minimum_sharpness"]["mean"])  # not a built-in piecewise-linear model: n/a
    assert cli.main(["measure", "--workdir", workdir, "--method", "spectreg", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "a compare run with 2 trained networks (2 methods: plain, spectreg); measuring spectreg, seed 0" in out
    (path,) = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(workdir, "runs")) for f in fs
               if f == "measures.json"]
    assert os.sep + "spectreg-" in path and path.endswith(os.path.join("members", "000", "measures.json"))
