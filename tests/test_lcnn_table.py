"""Fast checks of experiments/lcnn_table.py (the LCNN table on mnist5k) on fabricated rows.

Oracles: numpy means and standard deviations (sample std over seeds, population std over examples), step times
constructed by hand, and ratios recomputed from the fabricated per-seed step times; no training.
"""
import csv
import json
import os
import sys
import types

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import lcnn_table as table  # noqa: E402


def fake_seed(rng, step_ms):
    rec = {m: float(rng.uniform(0.1, 10.0)) for m in table.PER_SEED}
    rec["step_ms"] = float(step_ms)
    return rec


def fake_result(row, per_seed, epochs=3):
    return {"row": row, "per_seed": per_seed, "aggregate": table.aggregate_row(row, per_seed, epochs)}


# ------------------------------------------------------------------------------------------------ aggregation
def test_aggregate_row_equals_numpy_mean_and_sample_std():
    rng = np.random.default_rng(0)
    per_seed = [fake_seed(rng, 100 + 10 * i) for i in range(3)]
    per_seed[1]["curvature_bound"] = None  # a missing value is left out, not counted as 0
    agg = table.aggregate_row("lcnn", per_seed, epochs=3)
    for m in table.PER_SEED:
        vals = np.array([s[m] for s in per_seed if s[m] is not None], np.float64)
        assert agg[f"{m}_mean"] == pytest.approx(np.mean(vals), rel=1e-12)
        assert agg[f"{m}_std"] == pytest.approx(np.std(vals, ddof=1), rel=1e-12)
    assert agg["num_seeds"] == 3 and agg["epochs"] == 3
    assert table.mean_std([None, None]) == (None, None)
    assert table.mean_std([2.5]) == (2.5, 0.0)


def test_summarize_split_equals_numpy_over_examples():
    rng = np.random.default_rng(1)
    n = 37
    clean = {"correct": rng.uniform(size=200) < 0.9}
    measured = {k: rng.lognormal(size=n) for k in ("curvature", "hessian_norm", "grad_norm")}
    measured["stability"] = rng.uniform(-1, 1, size=n)
    pgd = {"pgd1": rng.uniform(size=n) < 0.5, "pgd2": rng.uniform(size=n) < 0.2}
    out = table.summarize_split(clean, measured, pgd)
    assert out["acc"] == pytest.approx(clean["correct"].sum() / 200)
    for item, key in (("curv", "curvature"), ("hess", "hessian_norm"), ("grad", "grad_norm")):
        assert out[f"{item}_mean"] == pytest.approx(np.mean(measured[key]), rel=1e-12)
        assert out[f"{item}_std"] == pytest.approx(np.std(measured[key], ddof=0), rel=1e-12)
    assert out["stab_mean"] == pytest.approx(np.mean(measured["stability"]), rel=1e-12)
    assert out["pgd1"] == pytest.approx(pgd["pgd1"].sum() / n) and out["pgd2"] == pytest.approx(pgd["pgd2"].sum() / n)
    assert set(out) == set(table.ITEMS)


def test_chunked_matches_unchunked_and_drops_padding():
    xs = np.arange(23 * 2, dtype=np.float32).reshape(23, 2)
    ys = np.arange(23) % 3
    seen = []

    def fn(variables, x, y, key):
        seen.append(x.shape[0])
        return {"s": x.sum(1) * variables + y}

    out = table.chunked(fn, 2.0, xs, ys, key=jax.random.PRNGKey(0), chunk=10)
    np.testing.assert_array_equal(out["s"], xs.sum(1) * 2.0 + ys)
    assert seen == [10, 10, 10]  # the last chunk is padded to one compiled shape


def test_step_time_from_log_skips_the_compile_interval():
    # step 25 includes compilation (30 s); then 0.2 s/step, with one slow interval (checkpoint) that the median ignores
    recs = [{"step": 25, "wall_time_s": 30.0, "loss": 1.0}]
    t = 30.0
    for step, per in ((50, 0.2), (75, 0.2), (100, 0.9), (125, 0.2), (150, 0.2)):
        t += 25 * per
        recs.append({"step": step, "wall_time_s": t})
    recs.append({"step": 150, "kind": "eval", "test_accuracy": [0.9]})  # eval records are not train records
    res = table.step_time_from_log(list(reversed(recs)))
    assert res["step_s"] == pytest.approx(0.2) and res["intervals"] == 5
    assert table.step_time_from_log([{"step": 25, "wall_time_s": 1.0}])["step_s"] is None


# ------------------------------------------------------------------------------------------------ resume
def make_splits():
    rng = np.random.default_rng(2)
    return {"test": (rng.uniform(size=(8, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 8))}


def test_run_row_resumes_finished_rows_and_recomputes_changed_settings(tmp_path):
    calls = {"train": 0, "eval": 0}

    def trainer(config, workdir, seeds):
        calls["train"] += 1
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as fh:  # 0.5 s/step after the compile interval
            for step, t in ((10, 20.0), (20, 25.0), (30, 30.0)):
                fh.write(json.dumps({"step": step, "wall_time_s": t}) + "\n")
        state = types.SimpleNamespace(params={"w": np.zeros(2)}, model_state={})
        return "model", [state] * len(seeds), "fit_sweep", "", 1.0

    def evaluator(model, variables, splits, *, key, measure_limit, pgd_limit, pgd_steps, measure_splits, bound):
        assert not bound  # the curvature bound is for the LCNN rows only
        assert measure_splits == ["test"] and pgd_limit == measure_limit == 4
        calls["eval"] += 1
        return {f"test_{i}": 0.5 for i in table.ITEMS}

    kw = dict(seeds=[0, 1, 2], out_dir=str(tmp_path / "out"), workdir=str(tmp_path / "wd"), splits=make_splits(),
              measure_limit=4, trainer=trainer, evaluator=evaluator)
    first = table.run_row("standard", epochs=1, **kw)
    assert calls == {"train": 1, "eval": 3}
    assert os.path.exists(tmp_path / "out" / "rows" / "standard.json")
    assert first["aggregate"]["step_ms_mean"] == pytest.approx(500.0)

    again = table.run_row("standard", epochs=1, **kw)  # finished: read back, neither trained nor evaluated
    assert calls == {"train": 1, "eval": 3}
    assert again["aggregate"] == json.loads(json.dumps(first["aggregate"]))

    table.run_row("standard", epochs=2, **kw)  # different settings: recomputed
    assert calls == {"train": 2, "eval": 6}
    table.run_row("standard", epochs=2, force=True, **kw)
    assert calls == {"train": 3, "eval": 9}
    assert not [f for f in os.listdir(tmp_path / "out" / "rows") if ".tmp" in f]  # atomic writes leave no temp


# ------------------------------------------------------------------------------------------------ outputs
def md_table(text, title):
    lines = text.splitlines()
    start = lines.index(title) + 2
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return header, rows


def documented_columns():
    """The markdown columns as the module docstring lists them (``row | acc % | ... | bench step × standard``)."""
    doc = " ".join(table.__doc__.split())
    start = doc.index("``row | acc %")
    listed = doc[start + 2:doc.index("``", start + 2)]
    return [c.strip() for c in listed.split("|")]


def test_outputs_have_the_documented_columns_and_ratio_is_row_time_over_standard_time(tmp_path):
    rng = np.random.default_rng(3)
    step = {"standard": [200.0, 210.0, 190.0], "lcnn": [260.0, 250.0, 270.0], "gradreg": [1100.0, 1000.0, 1200.0]}
    results = [fake_result(r, [fake_seed(rng, t) for t in ts]) for r, ts in step.items()]
    meta = {"epochs": 3, "seeds": [0, 1, 2], "pgd_steps": 20, "measure_limit": 500, "pgd_limit": 250,
            "splits": ["test", "official"], "command": "python experiments/lcnn_table.py", "device": "cpu",
            "wall_s": 60.0, "plot": True}
    bench = {"ratios": {"standard": 1.0, "lcnn": 1.18}}
    paths = table.write_outputs(results, meta, str(tmp_path), bench)
    assert os.path.getsize(paths["png"]) > 1000

    md = open(paths["md"]).read()
    ref = np.mean(step["standard"])
    for title in ("**mnist5k test split (1000 images)**",
                  "**official MNIST test set (10,000 images; measures on a subset, see above)**"):
        header, rows = md_table(md, title)
        assert header == documented_columns()
        assert [r[0] for r in rows] == list(step)
        col = header.index("step × standard")
        for r in rows:
            assert float(r[col]) == pytest.approx(np.mean(step[r[0]]) / ref, abs=0.006)
        assert [r[header.index("bench step × standard")] for r in rows] == ["1.00", "1.18", "-"]
    assert "Targets (test; lcnn vs standard)" in md

    with open(paths["csv"]) as fh:
        recs = list(csv.DictReader(fh))
    assert list(recs[0]) == list(table.CSV_COLUMNS)
    for rec in recs:
        assert float(rec["step_ratio_mean"]) == pytest.approx(np.mean(step[rec["row"]]) / ref, rel=1e-9)
    saved = json.load(open(paths["json"]))
    assert [r["row"] for r in saved["rows"]] == list(step)


def test_targets_compare_lcnn_with_standard():
    def agg(row, curv, acc, ratio, bench):
        return {"row": row, "test_curv_mean_mean": curv, "test_acc_mean": acc, "step_ratio_mean": ratio,
                "bench_ratio": bench}

    t = table.targets([agg("standard", 10.0, 0.95, 1.0, 1.0), agg("lcnn", 2.5, 0.945, 1.6, 1.2)], "test")
    assert t["curvature_factor"]["value"] == pytest.approx(4.0) and not t["curvature_factor"]["met"]
    assert t["acc_points"]["value"] == pytest.approx(-0.5) and t["acc_points"]["met"]
    assert not t["step_ratio_log"]["met"] and t["step_ratio_bench"]["met"]
    t = table.targets([agg("standard", 10.0, 0.95, 1.0, None), agg("lcnn", 1.0, 0.93, 1.0, None)], "test")
    assert t["curvature_factor"]["met"] and not t["acc_points"]["met"] and "step_ratio_bench" not in t
    assert table.targets([agg("lcnn", 1.0, 0.9, 1.0, None)], "test") == {}
    t = table.targets([agg("standard", None, 0.95, 1.0, None), agg("lcnn", None, 0.96, 1.0, None)], "test")
    assert "curvature_factor" not in t and t["acc_points"]["value"] == pytest.approx(1.0)  # accuracy-only set


def test_rows_with_other_seed_counts_are_marked_and_get_no_log_ratio():
    rng = np.random.default_rng(4)
    results = [fake_result("standard", [fake_seed(rng, 200.0) for _ in range(3)]),
               fake_result("gradreg", [fake_seed(rng, 300.0)])]  # one seed: a 1-member program, not comparable
    aggs = table.attach_ratios([r["aggregate"] for r in results], {"ratios": {"gradreg": 2.9}})
    assert aggs[0]["step_ratio_mean"] == pytest.approx(1.0) and aggs[1]["step_ratio_mean"] is None
    lines = table.split_table(aggs, "test", num_seeds=3)
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[0] == "gradreg (1 seed)" and cells[-2:] == ["-", "2.90"]
