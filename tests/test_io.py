"""lcnn_jax.io: atomic writers (whole file or the previous file, never half of one), the one "skip if done" rule,
mean/std."""
import csv
import json
import os

import numpy as np
import pytest

from lcnn_jax import io as lio


def test_text_json_and_csv_writers_produce_the_plain_files(tmp_path):
    p = str(tmp_path / "a.md")
    lio.write_text_atomic(p, "| a |\n|---|\n")
    assert open(p, newline="").read() == "| a |\n|---|\n"  # newlines written as given
    lio.write_json_atomic(str(tmp_path / "a.json"), {"b": np.float32(1.5), "a": [1, 2]})
    assert json.load(open(tmp_path / "a.json")) == {"a": [1, 2], "b": 1.5}
    rows = [{"x": 1, "y": "u"}, {"x": 2}]
    lio.write_csv_atomic(str(tmp_path / "a.csv"), ["x", "y"], rows)
    with open(tmp_path / "a.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == [{"x": "1", "y": "u"}, {"x": "2", "y": ""}]
    with pytest.raises(ValueError):  # a key outside the header is an error unless asked to drop it
        lio.write_csv_atomic(str(tmp_path / "b.csv"), ["x"], rows)
    lio.write_csv_atomic(str(tmp_path / "b.csv"), ["x"], rows, extrasaction="ignore")
    assert open(tmp_path / "b.csv").read().split() == ["x", "1", "2"]
    assert sorted(os.listdir(tmp_path)) == ["a.csv", "a.json", "a.md", "b.csv"]  # no temporary left behind


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    p = str(tmp_path / "r.json")
    lio.write_json_atomic(p, {"v": 1})

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("simulated crash while serialising")

    with pytest.raises(RuntimeError):
        lio.write_json_atomic(p, {"v": Unserialisable()})
    assert json.load(open(p)) == {"v": 1}


def test_load_if_matches_is_the_one_skip_if_done_rule(tmp_path):
    p = str(tmp_path / "row.json")
    settings = {"epochs": 3, "seeds": (0, 1), "limit": np.int64(5)}
    assert lio.load_if_matches(p, settings) is None  # no file yet
    lio.write_json_atomic(p, {"settings": settings, "acc": 0.9})
    assert lio.load_if_matches(p, settings)["acc"] == 0.9  # tuples and numpy scalars read back as saved
    assert lio.load_if_matches(p, {**settings, "epochs": 4}) is None
    assert lio.load_if_matches(p, {**settings, "extra": 1}) is None  # a key the file lacks is a difference
    assert lio.load_if_matches(p, {**settings, "extra": 1}, ignore=("extra",))["acc"] == 0.9
    assert lio.load_if_matches(p, {"epochs": 3, "other": 2}, keys=("epochs",))["acc"] == 0.9
    assert lio.load_if_matches(p, {"epochs": 3}, field="protocol") is None
    lio.write_json_atomic(p, {"fingerprint": "abc", "v": 1})  # a plain value as the identity
    assert lio.load_if_matches(p, "abc", field="fingerprint") == {"fingerprint": "abc", "v": 1}
    assert lio.load_if_matches(p, "abd", field="fingerprint") is None
    with open(p, "w") as fh:
        fh.write('{"settings": {"epochs"')  # half a file, or a list: not finished work
    assert lio.load_if_matches(p, settings) is None
    with open(p, "w") as fh:
        fh.write("[1, 2]")
    assert lio.load_if_matches(p, settings) is None


def test_mean_std_against_numpy():
    vals = [0.25, 0.5, None, 1.0]
    mean, std = lio.mean_std(vals)
    assert mean == pytest.approx(np.mean([0.25, 0.5, 1.0]))
    assert std == pytest.approx(np.std([0.25, 0.5, 1.0], ddof=1))
    assert lio.mean_std([2.0]) == (2.0, 0.0)
    assert lio.mean_std([None]) == (None, None)


def test_save_figure_atomic_leaves_only_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = lio.save_figure_atomic(fig, str(tmp_path / "f.png"), dpi=50)
    assert os.listdir(tmp_path) == ["f.png"] and open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)  # closed


def test_old_import_paths_are_aliases_of_the_new_modules():
    from lcnn_jax import errors, training

    assert training.write_json_atomic is lio.write_json_atomic and training.MetricsLog is lio.MetricsLog
    assert training.ConfigError is errors.ConfigError and training.NoSpaceLeft is errors.NoSpaceLeft
