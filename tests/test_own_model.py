"""Bring your own model (issue 15): a Flax module the library does not define, named by ``register_model`` or by an
import path, trains and is measured like a built-in one, with or without a ``train`` argument and ``batch_stats``.

The models are defined in tests/_own_models.py. The fast tests check resolution, the train/eval switch and one
compiled step; the ``slow`` ones run the README's example and the train / measure commands end to end
(tests/test_cli_runs.py covers sweeps and compare runs of such a model).
"""
import json
import os
import re
import textwrap

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from _own_models import (MODELS_FILE, BNDropNet, DeterministicNet, NoEvalModeNet, PlainNet, WrongWidthNet, accuracy,
                         one_paragraph_error, registry, tiny_config, tiny_config_file)  # noqa: F401 (fixture)

from lcnn_jax import cli
from lcnn_jax import train as training
from lcnn_jax import errors
from lcnn_jax.configs import default_config, validate_config
from lcnn_jax.nn import models as nn_models
from lcnn_jax.nn import make_model, mode_kwargs, model_keywords, register_model, registered_models, resolve_model

# Out of the default run (it must stay under 3 minutes on 2 cores): a researcher's model through training, measuring and the bounds.
# CI runs it with -m slow.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------------
# Resolving a model


def test_register_model_accepts_classes_functions_and_instances(registry, caplog):
    assert register_model("plain", PlainNet) is PlainNet
    net = make_model("plain", 3, width=5)
    assert isinstance(net, PlainNet) and (net.num_classes, net.width) == (3, 5)

    @register_model("bn_drop")
    class Decorated(BNDropNet):
        pass

    assert isinstance(make_model("bn_drop", 4), Decorated) and make_model("bn_drop", 4).num_classes == 4

    def builder(num_classes, widths=(8,)):  # a factory function; a config read back from JSON gives lists
        assert isinstance(widths, tuple)
        return PlainNet(num_classes=num_classes, width=widths[0])

    register_model("built", builder)
    assert make_model("built", 6, widths=[12]).width == 12
    register_model("fixed", lambda: WrongWidthNet())  # takes no num_classes: the model decides
    assert isinstance(make_model("fixed", 10), WrongWidthNet)
    instance = PlainNet(num_classes=2)
    register_model("instance", instance)
    assert make_model("instance", 10) is instance
    assert registered_models()[-5:] == ("plain", "bn_drop", "built", "fixed", "instance")
    assert model_keywords("plain") == ("width",) and model_keywords("built") == ("widths",)
    assert model_keywords("instance") == () and "width_mult" in model_keywords("small_cnn")

    with pytest.raises(ValueError, match=r"does not accept \['widht'\]; valid keywords: \['width'\]"):
        make_model("plain", 10, widht=3)
    with pytest.raises(ValueError, match="module instance, which takes no model.kwargs"):
        make_model("instance", 10, width=3)
    register_model("needs", lambda num_classes, depth: PlainNet(num_classes))
    with pytest.raises(ValueError, match=r"cannot be built with num_classes=10 .* missing 1 required positional "
                                         r"argument: 'depth'"):
        make_model("needs", 10)
    with pytest.raises(ValueError, match="built-in model"):
        register_model("mlp", PlainNet)
    with pytest.raises(ValueError, match="without ':'"):
        register_model("a:b", PlainNet)
    with pytest.raises(TypeError, match="must be a flax.linen.Module class"):
        register_model("number", 3)
    register_model("plain", PlainNet)  # the same factory again (a re-run cell): silent
    assert "now names" not in caplog.text
    register_model("plain", BNDropNet)
    assert "'plain' now names" in caplog.text and isinstance(make_model("plain", 10), BNDropNet)


def test_import_paths_resolve_files_and_modules(registry, tmp_path, monkeypatch):
    here = MODELS_FILE
    cls = resolve_model(f"{here}:PlainNet")
    assert cls.__name__ == "PlainNet" and issubclass(cls, nn.Module)
    assert resolve_model(f"{here}:PlainNet") is cls  # a file is executed once per process
    assert make_model(f"{here}:BNDropNet", 5, width=2).width == 2

    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        import flax.linen as nn

        class Net(nn.Module):
            num_classes: int = 10

            @nn.compact
            def __call__(self, x):
                return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))
    """))
    (tmp_path / "broken.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.chdir(tmp_path)  # found in the current directory, as `python -m` would (the console script would not)
    assert make_model("my_nets:Net", 4).num_classes == 4

    for spec, needle in [
        ("nowhere_at_all:Net", "cannot import 'nowhere_at_all'"),
        ("my_nets:Nett", "has no attribute 'Nett'. It defines ['Net', 'nn']"),
        ("missing.py:Net", "missing.py does not exist"),
        ("broken:Net", "raised RuntimeError: no GPU here"),
        ("broken.py:Net", "raised RuntimeError: no GPU here"),
        ("tiny_cnn", "register your own with lcnn_jax.nn.register_model('tiny_cnn', MyModule)"),
    ]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            resolve_model(spec)


def test_mode_kwargs_follow_the_call_signature():
    assert mode_kwargs(BNDropNet(10), train=True) == {"train": True}
    assert mode_kwargs(BNDropNet(10), train=False) == {"train": False}
    assert mode_kwargs(DeterministicNet(), train=True) == {"deterministic": False}
    assert mode_kwargs(DeterministicNet(), train=False) == {"deterministic": True}
    assert mode_kwargs(PlainNet(), train=True) == {} == mode_kwargs(PlainNet(), train=False)
    assert mode_kwargs(make_model("small_cnn", 10), train=True) == {"train": True}


def test_config_problems_name_the_model_and_the_fix(registry):
    register_model("plain", PlainNet)
    config = default_config()
    config.model.name, config.model.kwargs = "plain", {"widht": 4}
    with pytest.raises(errors.ConfigError, match=r"model.kwargs.widht is not a setting of 'plain' \(did you mean "
                                                   r"model.kwargs.width\?\)"):
        validate_config(config)
    config.model.name, config.model.kwargs = "tiny_cnn", {}
    with pytest.raises(errors.ConfigError) as e:
        validate_config(config)
    assert "unknown model 'tiny_cnn'" in str(e.value) and "import path" in str(e.value)


def test_model_output_and_eval_mode_are_checked_by_tracing(registry):
    from lcnn_jax.data import dataset_info

    info = dataset_info("mnist5k")
    images = np.zeros((4, 28, 28, 1), np.float32)
    cfg = default_config().model
    cfg.name = "wrong"
    with pytest.raises(errors.ConfigError, match=r"returns shape \(4, 7\) float32 for a batch of 4 mnist5k images; "
                                                   r"the library needs logits of shape \(4, 10\)"):
        training.check_model_fits_data(WrongWidthNet(), cfg, images, info, "mnist5k")
    with pytest.raises(errors.ConfigError, match="needs a `train` argument"):
        training.check_model_fits_data(NoEvalModeNet(), cfg, images, info, "mnist5k")
    params = training.check_model_fits_data(BNDropNet(10), cfg, images, info, "mnist5k")
    assert params["Dense_0"]["kernel"].shape == (14 * 14 * 4, 10)


# ----------------------------------------------------------------------------------------------------------
# One compiled step


def _tiny_state(model, images):
    tx = optax.sgd(0.1)
    return training.create_train_state(model, tx, (), jax.random.PRNGKey(0), {"image": images,
                                                                              "label": np.zeros(4, np.int32)})


def test_train_step_runs_batch_norm_and_dropout_in_training_mode_only():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(4, 8, 8, 1)).astype(np.float32)
    batch = {"image": images, "label": np.arange(4, dtype=np.int32)}
    model = BNDropNet(num_classes=10)
    state = _tiny_state(model, images)
    assert list(state.model_state) == ["batch_stats"]
    step = jax.jit(training.make_train_step(model, ()))
    new, m0 = step(state, batch)
    # training mode updates the running statistics (momentum 0.99 towards the batch mean)
    conv = jax.jit(nn.Conv(4, (3, 3), strides=(2, 2)).apply)({"params": state.params["Conv_0"]}, images)
    np.testing.assert_allclose(new.model_state["batch_stats"]["BatchNorm_0"]["mean"],
                               0.01 * np.asarray(conv).mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-7)
    # dropout draws a new mask each step (the step counter keys it); the same step draws the same one
    _, m5 = step(state.replace(step=5), batch)
    _, m0_again = step(state, batch)
    assert float(m0["ce"]) == float(m0_again["ce"]) and abs(float(m0["ce"]) - float(m5["ce"])) > 1e-4
    # evaluation uses the running statistics and no dropout: the eval step's loss is that of a plain apply
    ev = jax.jit(training.make_eval_step(model))(new, {**batch, "mask": np.ones(4, np.float32)})
    logits = jax.jit(model.apply)({"params": new.params, **new.model_state}, images)  # train=False: the default
    want = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).sum()
    np.testing.assert_allclose(float(ev["loss_sum"]), float(want), rtol=1e-5)


def test_model_without_train_argument_trains_and_evaluates():
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(4, 8, 8, 1)).astype(np.float32)
    batch = {"image": images, "label": np.arange(4, dtype=np.int32)}
    model = PlainNet(num_classes=10, width=8)
    state = _tiny_state(model, images)
    assert state.model_state == {}
    new, metrics = jax.jit(training.make_train_step(model, ()))(state, batch)

    def loss(p):  # the model called as its author wrote it: no train argument
        logits = model.apply({"params": p}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    ce, grads = jax.jit(jax.value_and_grad(loss))(state.params)
    np.testing.assert_allclose(float(metrics["ce"]), float(ce), rtol=1e-5)
    np.testing.assert_allclose(new.params["Dense_1"]["bias"], state.params["Dense_1"]["bias"]
                               - 0.1 * grads["Dense_1"]["bias"], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# End to end (slow)


def _readme_example() -> str:
    """The example of the guide's "Your own model" page (it was the README's until the docs moved to docs/)."""
    text = open(os.path.join(REPO, "docs", "guide", "own_model.md"), encoding="utf-8").read()
    match = re.search(r"<!-- own-model example.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/guide/own_model.md lost its own-model example"
    return match.group(1)


@pytest.mark.slow
def test_readme_own_model_example_runs(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "readme_example"}
    exec(compile(_readme_example(), "<docs own-model example>", "exec"), ns)  # noqa: S102
    results, rep = ns["results"], ns["rep"]
    assert 0.0 <= results["test_accuracy"] <= 1.0 and rep["checkpoint_step"] == results["steps"]
    assert os.path.exists(tmp_path / "runs" / "tiny_cnn" / "measures.json")
    # what was trained is the user's module, with its batch statistics, rebuilt from the run directory
    config, model, state, _ = training.load_trained(str(tmp_path / "runs" / "tiny_cnn"))
    assert type(model).__name__ == "TinyCNN" and list(state.model_state) == ["batch_stats"]


@pytest.mark.slow
def test_cli_trains_and_measures_a_model_named_by_import_path(registry, tmp_path, monkeypatch, capsys):
    from lcnn_jax import data as data_lib

    cfg_file = tiny_config_file(tmp_path, MODELS_FILE + ":PlainNet")
    workdir = str(tmp_path / "run")
    assert cli.main(["train", "--config", cfg_file, "--workdir", workdir]) == 0
    monkeypatch.setattr(nn_models, "_IMPORTED", {})  # as a fresh process: the path is resolved again
    assert cli.main(["measure", "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    assert "measures: " + os.path.join(workdir, "measures.json") in out
    rep = json.load(open(os.path.join(workdir, "measures.json")))
    _, model, state, _ = training.load_trained(workdir)
    test = data_lib.load_split("mnist5k", "test")
    assert type(model).__name__ == "PlainNet" and state.model_state == {}
    assert rep["test"]["accuracy"]["mean"] == pytest.approx(accuracy(model, state, test.images[:8],
                                                                      test.labels[:8]), abs=1e-6)

    # a name registered in another process is not known here: exit 2 with the fix, before anything is measured
    register_model("plain_registered", PlainNet)
    reg_dir = str(tmp_path / "registered")
    training.fit(tiny_config(tmp_path, "plain_registered"), reg_dir)
    monkeypatch.setattr(nn_models, "_USER_MODELS", {})
    assert cli.main(["measure", "--workdir", reg_dir]) == 2
    msg = one_paragraph_error(capsys.readouterr().err)
    assert "unknown model 'plain_registered'" in msg and "import path" in msg
    assert not os.path.exists(os.path.join(reg_dir, "measures.json"))
