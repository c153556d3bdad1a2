"""experiments/table_runner.py: the skeleton of the table scripts, with cheap stand-ins for training and evaluation.

Oracles: call counters (a finished row is neither trained nor evaluated again; a changed setting is), the files on
disk (what is saved is what is returned; nothing but the row file is left), numpy means and sample standard
deviations, and the csv module reading the table back.
"""
import csv
import json
import os
import sys
import types

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import table_runner as runner  # noqa: E402


class Counting:
    """A trainer and an evaluator that count their calls; state ``i`` of seed ``s`` scores ``s / 10``."""

    def __init__(self):
        self.train = self.eval = 0

    def trainer(self, config, workdir, seeds):
        self.train += 1
        states = [types.SimpleNamespace(value=int(s) / 10) for s in seeds]
        return "model", states, "fit_sweep", "", 2.5

    def evaluate(self, model, state, seed):
        assert model == "model"
        self.eval += 1
        return {"acc": state.value, "missing": None if seed == 0 else 1.0}


def _row(tmp_path, counts, settings, **kw):
    path = str(tmp_path / "rows" / "r.json")

    def compute():
        res = runner.train_and_evaluate(counts.trainer, None, str(tmp_path / "wd"), settings["seeds"],
                                        counts.evaluate)
        return {**res, "row": "r", "aggregate": runner.aggregate(res["per_seed"], ("acc", "missing"))}

    return path, runner.cached_row(path, settings, compute, tag="test", name="r", **kw)


def test_a_finished_row_is_read_back_and_a_changed_setting_recomputes(tmp_path, capsys):
    counts = Counting()
    settings = {"epochs": 2, "seeds": (0, 1, 2)}
    path, first = _row(tmp_path, counts, settings)
    assert (counts.train, counts.eval) == (1, 3)
    assert os.listdir(tmp_path / "rows") == ["r.json"]  # atomic write: no temporary left
    assert json.load(open(path)) == json.loads(json.dumps(first))  # the file is what was returned
    assert first["settings"] == settings and [s["seed"] for s in first["per_seed"]] == [0, 1, 2]
    assert first["train_wall_s"] == 2.5 and first["trained_with"] == "fit_sweep"

    mtime = os.stat(path).st_mtime_ns
    _, again = _row(tmp_path, counts, {"epochs": 2, "seeds": [0, 1, 2]})  # same settings (a list reads as the tuple)
    assert (counts.train, counts.eval) == (1, 3)  # no work at all
    assert os.stat(path).st_mtime_ns == mtime and again == json.loads(json.dumps(first))
    assert "r: results exist" in capsys.readouterr().out

    _row(tmp_path, counts, {"epochs": 3, "seeds": (0, 1, 2)})  # a changed setting
    assert (counts.train, counts.eval) == (2, 6)
    _row(tmp_path, counts, {"epochs": 3, "seeds": (0, 1, 2), "note": "x"}, ignore=("note",))  # ignored key
    assert (counts.train, counts.eval) == (2, 6)
    _row(tmp_path, counts, {"epochs": 3, "seeds": (0, 1, 2)}, force=True)
    assert (counts.train, counts.eval) == (3, 9)

    with open(path, "w") as fh:  # half a file (a process killed before atomic writes): not finished work
        fh.write('{"settings": {"epochs": 3')
    _row(tmp_path, counts, {"epochs": 3, "seeds": (0, 1, 2)})
    assert (counts.train, counts.eval) == (4, 12)


def test_aggregate_is_numpy_mean_and_sample_std_over_the_seeds_that_have_a_value():
    rng = np.random.default_rng(0)
    per_seed = [{"a": float(v), "b": None if i == 1 else float(2 * v)} for i, v in enumerate(rng.uniform(size=4))]
    agg = runner.aggregate(per_seed, ("a", "b", "c"))
    a = np.array([s["a"] for s in per_seed])
    b = np.array([s["b"] for s in per_seed if s["b"] is not None])
    assert agg["a_mean"] == pytest.approx(a.mean(), rel=1e-12) and agg["a_std"] == pytest.approx(a.std(ddof=1))
    assert agg["b_mean"] == pytest.approx(b.mean(), rel=1e-12) and agg["b_std"] == pytest.approx(b.std(ddof=1))
    assert agg["c_mean"] is None and agg["c_std"] is None


def test_write_table_writes_the_three_files_with_empty_cells_for_missing_values(tmp_path):
    rows = [{"row": "a", "x_mean": 0.5, "x_std": None, "extra": 1}, {"row": "b"}]
    paths = runner.write_table(str(tmp_path / "out"), "table", obj={"rows": rows}, columns=("row", "x_mean", "x_std"),
                               rows=rows, markdown="| a |\n")
    assert sorted(os.listdir(tmp_path / "out")) == ["table.csv", "table.json", "table.md"]
    with open(paths["csv"], newline="") as fh:
        assert list(csv.DictReader(fh)) == [{"row": "a", "x_mean": "0.5", "x_std": ""},
                                            {"row": "b", "x_mean": "", "x_std": ""}]
    assert json.load(open(paths["json"])) == {"rows": rows}
    assert open(paths["md"]).read() == "| a |\n"
