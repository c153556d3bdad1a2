"""``lcnn-jax certify``: argument errors exit 2 before anything is loaded; a model the bounds cannot handle exits 2
naming the operation before any data is read; an end-to-end run writes the JSON of the issue (slow)."""
import json
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lcnn_jax import cli, runs
from lcnn_jax import data as data_lib


def _run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("radii,needle", [("0.5,0", "> 0"), ("-1", "> 0"), ("0.5,abc", "not a number"),
                                          ("nan", "> 0"), (",", "at least one")])
def test_bad_radii_exit_2_before_the_workdir_is_read(tmp_path, capsys, radii, needle):
    rc, _, err = _run(["certify", "--workdir", str(tmp_path / "missing"), f"--radii={radii}"], capsys)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_unknown_attack_exits_2(tmp_path, capsys):
    rc, _, err = _run(["certify", "--workdir", str(tmp_path / "missing"), "--radii", "0.5", "--attack", "pgd99"],
                      capsys)
    assert rc == 2 and "pgd99" in err and "apgd" in err


def test_missing_workdir_exits_2(tmp_path, capsys):
    rc, _, err = _run(["certify", "--workdir", str(tmp_path / "missing"), "--radii", "0.5"], capsys)
    assert rc == 2 and "missing" in err


class _Square(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dense(4, name="dense")(x.reshape((x.shape[0], -1)))
        return nn.Dense(3, name="head")(h * h)  # a product of two input-dependent values: no bound rule


def test_a_model_without_bound_rule_exits_2_naming_the_operation_before_data(monkeypatch, tmp_path, capsys):
    model = _Square()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))
    member = runs.RunMember(label="the run", run_dir=str(tmp_path), index=None, id=None, seed=0, values={},
                            method=None, out_dir=str(tmp_path))
    state = types.SimpleNamespace(params=variables["params"], model_state={}, step=jnp.asarray(1))
    info = data_lib.DatasetInfo((4, 4, 1), 3, 1 / 255)
    config = types.SimpleNamespace(data={"name": "mnist5k"})
    monkeypatch.setattr(runs, "inspect_workdir",
                        lambda w: runs.Workdir("run", w, [member], "a training run"))
    monkeypatch.setattr(runs, "select_members", lambda wd, **kw: [member])
    monkeypatch.setattr(runs, "load_members", lambda ms: iter([(member, config, model, state, info)]))

    def no_data(*a, **k):
        raise AssertionError("data loaded before the bound was checked")

    monkeypatch.setattr(data_lib, "load_split", no_data)
    rc, _, err = _run(["certify", "--workdir", str(tmp_path), "--radii", "0.5"], capsys)
    assert rc == 2 and "`mul`" in err and "input-dependent" in err and "Traceback" not in err


@pytest.mark.slow
def test_train_then_certify_with_apgd_writes_the_report(tmp_path, capsys):
    wd = str(tmp_path / "run")
    rc = cli.main(["train", "--config", "experiments/configs/certified_mnist5k.py:gloro_mlp", "--workdir", wd,
                   "--config.train.num_steps=40", "--config.model.kwargs.widths=(32, 32)",
                   "--config.train.progress=False"])
    assert rc == 0
    assert json.load(open(os.path.join(wd, "results.json")))["num_train"] == 5000  # data.train_split=train+test
    assert "a training figure" in capsys.readouterr().out
    out = str(tmp_path / "cert.json")
    rc, text, err = _run(["certify", "--workdir", wd, "--radii", "0.1,0.5", "--num_examples", "40",
                          "--attack", "apgd", "--out", out], capsys)
    assert rc == 0, err
    rep = json.load(open(out))
    assert rep["n"] == 40 and 0 <= rep["clean_accuracy"] <= 1
    assert set(rep["radii"]) == {"0.1", "0.5"}
    for e in rep["radii"].values():
        assert e["certified"] <= e["robust_apgd"] + 1e-12  # certified examples are robust
        assert e["certified_but_broken"] == 0
    assert "0.1" in text and "CERTIFIED BUT BROKEN" not in err
