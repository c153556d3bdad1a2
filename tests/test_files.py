"""The atomic result writers of lcnn_jax.training: whole file or the previous file, never half of one."""
import csv
import json
import os

import numpy as np
import pytest

from lcnn_jax import training


def test_text_json_and_csv_writers_produce_the_plain_files(tmp_path):
    p = str(tmp_path / "a.md")
    training.write_text_atomic(p, "| a |\n|---|\n")
    assert open(p, newline="").read() == "| a |\n|---|\n"  # newlines written as given
    training.write_json_atomic(str(tmp_path / "a.json"), {"b": np.float32(1.5), "a": [1, 2]})
    assert json.load(open(tmp_path / "a.json")) == {"a": [1, 2], "b": 1.5}
    rows = [{"x": 1, "y": "u"}, {"x": 2}]
    training.write_csv_atomic(str(tmp_path / "a.csv"), ["x", "y"], rows)
    with open(tmp_path / "a.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == [{"x": "1", "y": "u"}, {"x": "2", "y": ""}]
    with pytest.raises(ValueError):  # a key outside the header is an error unless asked to drop it
        training.write_csv_atomic(str(tmp_path / "b.csv"), ["x"], rows)
    training.write_csv_atomic(str(tmp_path / "b.csv"), ["x"], rows, extrasaction="ignore")
    assert open(tmp_path / "b.csv").read().split() == ["x", "1", "2"]
    assert sorted(os.listdir(tmp_path)) == ["a.csv", "a.json", "a.md", "b.csv"]  # no temporary left behind


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    p = str(tmp_path / "r.json")
    training.write_json_atomic(p, {"v": 1})

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("simulated crash while serialising")

    with pytest.raises(RuntimeError):
        training.write_json_atomic(p, {"v": Unserialisable()})
    assert json.load(open(p)) == {"v": 1}
