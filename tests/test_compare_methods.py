"""`lcnn-jax compare` with a method of one's own added from the command line: the overrides that define it, the
errors for a malformed one, and the titles, tables and figures that name each method's own model."""
import json
import os

import pytest

from lcnn_jax import cli, compare
from lcnn_jax.configs import load_config
from lcnn_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "configs", "compare_mnist5k.py")
MINE = os.path.join(REPO, "tests", "_own_models.py") + ":PlainNet"
ADD_MINE = [f"compare.method_specs.mine.model.name={MINE}", "compare.method_specs.mine.model.kwargs.width=8",
            "compare.method_specs.mine.regularizers.datagrad.coeff=0.01"]


def test_a_method_of_ones_own_is_added_from_overrides():
    config = compare.apply_compare_overrides(load_config(CONFIG), ADD_MINE)
    quick = compare.check_methods(load_config(CONFIG))
    assert compare.check_methods(config) == quick + ("mine",)  # it joins the run after the config's methods
    mc = compare.method_config(config, "mine")
    assert mc.model.name == MINE and mc.model.kwargs.to_dict() == {"width": 8}  # no small_cnn kwargs inherited
    assert mc.regularizers.to_dict() == {"datagrad": {"coeff": 0.01}}
    assert mc.optim.learning_rate == config.optim.learning_rate  # the shared protocol
    # choosing the methods explicitly wins
    chosen = compare.apply_compare_overrides(load_config(CONFIG), ADD_MINE + ["compare.methods=('mine',)"])
    assert compare.check_methods(chosen) == ("mine",)


def test_a_malformed_method_is_one_config_error_naming_each_key_and_the_fix():
    config = compare.apply_compare_overrides(load_config(CONFIG), [
        "compare.method_specs.mine.modle.name=x.py:Net", "compare.method_specs.mine.optim.learnin_rate=0.1",
        "compare.method_specs.mine.regularizers.datagrad.coef=0.01", "compare.method_specs.mine.model.name=3"])
    with pytest.raises(ConfigError) as err:
        compare.check_methods(config)
    msg = str(err.value)
    for needle in ("compare.method_specs.mine.modle: a method sets only model, regularizers, optim, train, data "
                   "(did you mean model?)", "mine.optim.learnin_rate is not a setting of optim (did you mean "
                   "learning_rate?)", "mine.regularizers.datagrad: Bad arguments", "'coef'",
                   "mine.model.name=3 must be a model name"):
        assert needle in msg, msg
    with pytest.raises(ConfigError, match=r"compare.methods is the tuple of method names .* "
                                          r"--config.compare.method_specs.mine.model.name="):
        compare.apply_compare_overrides(load_config(CONFIG), ["compare.methods.mine.model.name=x.py:Net"])


def test_cli_malformed_method_exits_2_without_traceback(tmp_path, capsys):
    rc = cli.main(["compare", "--config", CONFIG, "--workdir", str(tmp_path / "w"),
                   "--config.compare.method_specs.mine.modle.name=x.py:Net",
                   "--config.compare.method_specs.mine.regularizers.datagrad.coeff=0.01"])
    err = capsys.readouterr().err
    assert rc == 2 and "did you mean model?" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "w" / "runs")  # nothing trained


def test_titles_and_tables_name_each_methods_own_model():
    config = compare.apply_compare_overrides(load_config(CONFIG), ADD_MINE)
    methods = compare.check_methods(config)
    models = compare.method_models(config, methods)
    assert models["mine"] == "_own_models.py:PlainNet" and models["lcnn"] == "lcnn_small_cnn"
    assert {models[m] for m in methods if m not in ("mine", "lcnn")} == {"small_cnn"}
    assert compare.models_title(models) == ("models: small_cnn (8 methods), lcnn_small_cnn (1), "
                                            "_own_models.py:PlainNet (1)")
    assert compare.models_title({"a": "mlp", "b": "mlp"}) == "mlp"
    # the same name with other kwargs is another model
    soft = compare.apply_compare_overrides(load_config(CONFIG), ["compare.method_specs.soft.model.name=small_cnn",
                                                                 "compare.method_specs.soft.model.kwargs.act=softplus"])
    labels = compare.method_models(soft, ("standard", "soft"))
    assert labels["soft"] == "small_cnn {'act': 'softplus'}" and labels["standard"].startswith("small_cnn {")

    cols = [{"name": "test_accuracy", "label": "acc", "direction": "higher"}]
    agg = {"standard": {"test_accuracy": {"mean": 0.9, "std": 0.0, "n": 1}},
           "mine": {"test_accuracy": {"mean": 0.8, "std": 0.0, "n": 1}}}
    two = {"standard": "small_cnn", "mine": "mine.py:Net"}
    md = compare.format_markdown(agg, cols, {"test_accuracy": ["standard"]}, models=two)
    assert "| method | model | acc ↑ |" in md and "| mine | mine.py:Net | 80.0 ± 0.0 |" in md
    assert "model" not in compare.format_markdown(agg, cols, {}, models={"standard": "a", "mine": "a"})
    text, hidden = compare.format_compact(agg, cols, {}, models=two)
    assert text.splitlines()[0].split()[:2] == ["method", "model"] and "mine.py:Net" in text and not hidden
    fig = compare.scatter_figure({m: {**a, "curvature": {"mean": 2.0, "std": 0.1, "n": 1}} for m, a in agg.items()},
                                 cols + [{"name": "curvature", "label": "curv", "direction": "lower"}],
                                 "curvature", "test_accuracy", title="t", models=two)
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"standard (small_cnn)",
                                                                            "mine (mine.py:Net)"}


@pytest.mark.slow
def test_tiny_compare_with_a_method_added_from_overrides(tmp_path):
    """Trains two methods (one seed, 8 steps) and measures them: a method from the command line runs like the
    config's own, and the title, table, results.json and the figures' labels name its model."""
    config = compare.apply_compare_overrides(load_config(CONFIG), [
        "model.name=mlp", "model.kwargs={'widths': (8,), 'act': 'relu'}", "compare.methods=('standard',)",
        "compare.seeds=(0,)", "compare.progress=False", "train.num_steps=8", "train.batch_size=32",
        "train.log_every=4", "train.checkpoint_every=8", "train.progress=False", "train.eval_batch_size=1000",
        "compare.measure.num_examples=8", "compare.measure.batch_size=8", "compare.measure.hessian_examples=8",
        "compare.measure.hessian_probes=2", "compare.measure.hessian_lanczos_iters=2",
        "compare.measure.lipschitz_iters=2", "compare.measure.curvature_iters=2", "compare.measure.pgd_steps=1",
        "compare.measure.robust_attacks=('pgd',)", "compare.measure.pgd_l2_eps=(1.0,)",
        "compare.measure.pgd_linf_eps=()", "compare.measure.certified_l2_eps=()", "compare.sharpness=never",
    ])
    # compare.methods is chosen above, so the new method is named there too
    config = compare.apply_compare_overrides(config, ADD_MINE + ["compare.methods=('standard','mine')"])
    workdir = str(tmp_path / "cmp")
    res = compare.run_compare(config, workdir)
    assert res["methods"] == ["standard", "mine"] and res["models"] == {"standard": "mlp",
                                                                         "mine": "_own_models.py:PlainNet"}
    assert "models: mlp (1 method), _own_models.py:PlainNet (1)" in res["title"]
    with open(os.path.join(workdir, "results.json")) as fh:
        assert json.load(fh)["models"]["mine"] == "_own_models.py:PlainNet"
    with open(os.path.join(workdir, "results.md")) as fh:
        md = fh.read()
    assert "| mine | _own_models.py:PlainNet |" in md and f"{MINE} {{'width': 8}} (mine)" in md
    for m in ("standard", "mine"):
        assert 0.0 <= res["aggregate"][m]["test_accuracy"]["mean"] <= 1.0
    assert len(res["figures"]) == 2
