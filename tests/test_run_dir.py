"""A run directory survives damage and misuse (issue 14): each test provokes one fault for real (damaged files, a
writer failing with ENOSPC, SIGINT, a config that does not match the run, bad settings, NaN pixels) and checks the
exit code, the message, that no traceback reaches the user, which files are kept, and, where the run is resumed,
that it ends with the metrics of the uninterrupted reference run.

One tiny reference run (MLP 784-32-10, 640 mnist5k images, 24 steps, checkpoints at 8/16/24 of which 16 and 24
are kept) is trained once per module; the fault tests work on copies of it.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lcnn_jax import cli, compare, report
from lcnn_jax import train as training
from lcnn_jax import errors
from lcnn_jax import io as lio
from lcnn_jax.configs import apply_overrides, default_config, load_config, validate_config
from lcnn_jax.data import DatasetError

# Out of the default run (it must stay under 3 minutes on 2 cores): every test trains and damages a run directory.
# CI runs it with -m slow.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "experiments", "configs", "quickstart.py")

TINY = textwrap.dedent("""
    from lcnn_jax.configs import default_config

    def get_config():
        c = default_config()
        c.model.name = "mlp"
        c.model.kwargs = {"widths": (32,)}
        c.data.train_size = 640
        c.train.batch_size = 64
        c.train.num_steps = 24
        c.train.log_every = 4
        c.train.checkpoint_every = 8
        c.train.progress = False
        c.optim.learning_rate = 0.1
        return c
""")
RESULT_KEYS = ("test_accuracy", "test_loss", "train_accuracy", "train_loss", "steps")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.py"
    path.write_text(TINY)
    return str(path)


@pytest.fixture(scope="module")
def reference(tiny_file, tmp_path_factory):
    """``(workdir, results)`` of the uninterrupted tiny run."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    return workdir, training.fit(load_config(tiny_file), workdir)


def copy_run(reference, tmp_path) -> str:
    dst = str(tmp_path / "run")
    shutil.copytree(reference[0], dst)
    return dst


def train_log(workdir):
    return [r for r in lio.read_metrics_log(workdir) if r.get("kind") != "eval"]


def assert_same_results(workdir, reference):
    """Final metrics and the training log equal the uninterrupted run's (same compiled programs: float32 equal
    up to the accumulation order of the host-side sums)."""
    res = json.load(open(os.path.join(workdir, "results.json")))
    for k in RESULT_KEYS:
        assert res[k] == pytest.approx(reference[1][k], rel=1e-6, abs=1e-7), k
    got, want = train_log(workdir), train_log(reference[0])
    assert [r["step"] for r in got] == [r["step"] for r in want]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-6)


def one_paragraph_error(err: str) -> str:
    """The CLI's error text: no traceback, a single non-empty message."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lcnn-jax:")]
    assert len(lines) == 1, err
    return lines[0]


def forbid(monkeypatch, module, *names):
    """Make expensive steps (data loading, compilation, training) fail loudly if they are reached."""
    for name in names:
        def boom(*a, _n=name, **k):
            raise AssertionError(f"{_n} must not run for a refused command")
        monkeypatch.setattr(module, name, boom)


def snapshot(workdir):
    return {os.path.relpath(os.path.join(d, f), workdir): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(workdir) for f in files}


# ----------------------------------------------------------------------------------------------------------
# Damaged files


def test_truncated_newest_checkpoint_is_skipped_and_the_run_ends_as_uninterrupted(reference, tiny_file, tmp_path,
                                                                                    caplog):
    workdir = copy_run(reference, tmp_path)
    step24 = os.path.join(workdir, "checkpoints", "24")
    for d, _, files in os.walk(step24):
        for f in files:
            path = os.path.join(d, f)
            os.truncate(path, os.path.getsize(path) // 2)

    assert cli.main(["train", "--config", tiny_file, "--workdir", workdir]) == 0
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and "checkpoint step 24" in warned[0] and "using step 16" in warned[0]
    assert os.path.isdir(os.path.join(workdir, "damaged_checkpoints", "24"))  # kept aside, not deleted
    assert training.checkpoint_steps(workdir) == [16, 24]  # step 24 written again
    assert_same_results(workdir, reference)


def test_measure_uses_the_newest_intact_checkpoint(reference, tmp_path, monkeypatch, caplog):
    workdir = copy_run(reference, tmp_path)
    step24 = os.path.join(workdir, "checkpoints", "24")
    for name in os.listdir(step24):  # emptied: the step folder is there, its files are gone
        shutil.rmtree(os.path.join(step24, name)) if os.path.isdir(os.path.join(step24, name)) else \
            os.remove(os.path.join(step24, name))
    seen = {}

    def measured(model, variables, splits, cfg, *, key, train_for_hessian=None):
        seen["params"] = variables["params"]
        return {"test": {"jacobian_frobenius": {"mean": 1.0, "std": 0.0, "n": 1, "zero_fraction": 0.0}}}

    monkeypatch.setattr(report, "measure_state", measured)
    assert cli.main(["measure", "--workdir", workdir, "--config.measure.progress=False"]) == 0
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and "step 24" in warned[0] and "no files" in warned[0]
    rep = json.load(open(os.path.join(workdir, "measures.json")))
    assert rep["checkpoint_step"] == 16 and rep["dead"] is None
    _, template, _ = training.template_state(training.read_config(workdir))
    ckpt = training.Checkpointer(reference[0], read_only=True)
    step16 = ckpt.restore(template, 16)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(seen["params"]), jax.tree.leaves(step16.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert os.path.isdir(step24)  # measuring never moves or deletes anything


def test_half_line_at_the_end_of_the_metrics_log_is_dropped_and_the_run_resumes(reference, tiny_file, tmp_path,
                                                                                caplog):
    workdir = copy_run(reference, tmp_path)
    # Killed while appending the step-20 record: checkpoint 24 and the results were never written.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "24"))
    os.remove(os.path.join(workdir, "results.json"))
    path = os.path.join(workdir, "metrics.jsonl")
    lines = open(path).read().splitlines(True)
    cut = next(i for i, line in enumerate(lines) if json.loads(line).get("step") == 20)
    with open(path, "w") as fh:
        fh.write("".join(lines[:cut]) + lines[cut][:len(lines[cut]) // 2])

    assert cli.main(["train", "--config", tiny_file, "--workdir", workdir]) == 0
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == 1 and f"line {cut + 1}" in warned[0] and "resuming from step 16" in warned[0]
    assert_same_results(workdir, reference)


# ----------------------------------------------------------------------------------------------------------
# Reruns with another config


def test_rerun_with_an_incompatible_config_is_refused_before_anything_is_written(reference, tiny_file, tmp_path,
                                                                                   monkeypatch, capsys):
    workdir = copy_run(reference, tmp_path)
    before, config_bytes = snapshot(workdir), open(os.path.join(workdir, "config.json"), "rb").read()
    forbid(monkeypatch, training, "prepare_run", "create_train_state", "jit_train_step")
    rc = cli.main(["train", "--config", tiny_file, "--workdir", workdir,
                   "--config.model.kwargs.widths=(64,)"])
    msg = one_paragraph_error(capsys.readouterr().err)
    assert rc == 2
    assert "model.kwargs.widths [32] -> [64]" in msg and "new --workdir" in msg
    assert snapshot(workdir) == before
    assert open(os.path.join(workdir, "config.json"), "rb").read() == config_bytes
    monkeypatch.undo()
    _, _, state, _ = training.load_trained(workdir)  # the finished run can still be measured
    assert int(state.step) == 24


def test_rerun_with_more_steps_needs_extend_and_then_trains_on(reference, tiny_file, tmp_path, capsys):
    workdir = copy_run(reference, tmp_path)
    before = snapshot(workdir)
    args = ["train", "--config", tiny_file, "--workdir", workdir, "--config.train.num_steps=32"]
    assert cli.main(args) == 2
    msg = one_paragraph_error(capsys.readouterr().err)
    assert "train.num_steps 24 -> 32" in msg and "--extend" in msg
    assert snapshot(workdir) == before

    assert cli.main(args + ["--extend"]) == 0
    res = json.load(open(os.path.join(workdir, "results.json")))
    assert res["steps"] == 32 and res["extended_from_step"] == 24
    log = train_log(workdir)
    assert [r["step"] for r in log] == list(range(4, 33, 4))
    sched = training.make_schedule(training.read_config(workdir).optim, 32)  # the new length's schedule
    assert log[-2]["learning_rate"] == pytest.approx(float(sched(27)), rel=1e-6)
    assert training.read_config(workdir).train.num_steps == 32


# ----------------------------------------------------------------------------------------------------------
# Disk full, Ctrl-C


def test_disk_full_exits_with_one_line_keeps_the_last_checkpoint_and_resumes(reference, tiny_file, tmp_path,
                                                                             monkeypatch, capsys, caplog):
    workdir = str(tmp_path / "run")
    args = ["train", "--config", tiny_file, "--workdir", workdir]

    # 1. The metrics log hits the full disk at step 12 (checkpoint 8 is on disk).
    real_write = lio.MetricsLog.write

    def log_write(self, rec):
        if rec["step"] == 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, rec)

    monkeypatch.setattr(lio.MetricsLog, "write", log_write)
    assert cli.main(args) == 4
    msg = one_paragraph_error(capsys.readouterr().err)
    assert f"no space left on {os.path.abspath(workdir)} at step 12" in msg and "(step 8) is kept" in msg
    monkeypatch.undo()

    # 2. The disk fills up while orbax writes checkpoint 16 (into 16.orbax-checkpoint-tmp...).
    real_save = ocp.StandardCheckpointHandler.async_save

    def writer_fails(error):
        async def save(self, directory, *a, **k):
            if "/16." in str(directory):
                raise error
            return await real_save(self, directory, *a, **k)
        return save

    _, _, state, _ = training.load_trained(workdir)
    state = state.replace(step=16)
    ckpt = training.Checkpointer(workdir)
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save",
                        writer_fails(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(errors.NoSpaceLeft, match=r"while saving the checkpoint of step 16\. The last complete "
                                                   r"checkpoint \(step 8\) is kept"):
        ckpt.save(16, state)
    monkeypatch.undo()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["8"]  # no half-written folder left

    # 3. The free-space check refuses a save the disk cannot hold before orbax writes anything.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(errors.NoSpaceLeft, match=r"checkpoint of step 16 needs about 1\.2 MiB, 0\.0 MiB are free"):
        ckpt.save(16, state)
    monkeypatch.undo()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["8"]

    # 4. A save killed half-way (Ctrl-C inside orbax) leaves orbax's temporary folder behind ...
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", writer_fails(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(16, state)
    monkeypatch.undo()
    ckpt.close()
    assert len([n for n in os.listdir(os.path.join(workdir, "checkpoints")) if training.TMP_MARK in n]) == 1

    # 5. ... which the next start removes; with space again, the run ends as the uninterrupted one.
    assert cli.main(args) == 0
    assert any("unfinished checkpoint folder" in r.getMessage() for r in caplog.records)
    assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if training.TMP_MARK in n]
    assert_same_results(workdir, reference)


def test_ctrl_c_prints_the_step_and_exits_130(tiny_file, tmp_path, monkeypatch, capsys):
    """A real SIGINT to this process during training, as Ctrl-C in a terminal sends it."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread")
    real_write = lio.MetricsLog.write

    def write(self, rec):  # Ctrl-C arrives right after the step-12 record (checkpoint 8 is on disk)
        real_write(self, rec)
        if rec.get("step") == 12 and rec.get("kind") != "eval":
            os.kill(os.getpid(), signal.SIGINT)

    workdir = str(tmp_path / "run")
    args = ["train", "--config", tiny_file, "--workdir", workdir]
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        monkeypatch.setattr(lio.MetricsLog, "write", write)
        assert cli.main(args) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
        monkeypatch.undo()
    msg = one_paragraph_error(capsys.readouterr().err)
    assert msg == "lcnn-jax: interrupted at step 12 (the last checkpoint is step 8); rerun the same command to resume."
    assert training.checkpoint_steps(workdir) == [8] and train_log(workdir)[-1]["step"] == 12
    # That a rerun then ends as the uninterrupted run is checked by the subprocess variant below and by
    # tests/test_training.py::test_interrupted_then_resumed_equals_uninterrupted.


SIGINT_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a parent may ignore SIGINT)
    from lcnn_jax import cli
    from lcnn_jax import train as training
    from lcnn_jax import errors
    from lcnn_jax import io as lio

    real_write = lio.MetricsLog.write

    def write(self, rec):  # Ctrl-C arrives right after the step-12 record (checkpoint 8 is on disk)
        real_write(self, rec)
        if rec.get("step") == 12 and rec.get("kind") != "eval":
            os.kill(os.getpid(), signal.SIGINT)

    lio.MetricsLog.write = write
    sys.exit(cli.main(["train", "--config", sys.argv[1], "--workdir", sys.argv[2]]))
""")


@pytest.mark.slow
def test_ctrl_c_in_a_subprocess_exits_130_and_prints_nothing_more_at_shutdown(reference, tiny_file, tmp_path):
    """The same in a process of its own: its exit status is 130, and nothing (e.g. orbax's I/O threads) prints a
    traceback while the interpreter shuts down."""
    workdir = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-c", SIGINT_SCRIPT, tiny_file, workdir], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 130, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr[-3000:]
    assert ("lcnn-jax: interrupted at step 12 (the last checkpoint is step 8); rerun the same command to resume."
            in p.stderr.splitlines())
    assert cli.main(["train", "--config", tiny_file, "--workdir", workdir]) == 0
    assert_same_results(workdir, reference)


# ----------------------------------------------------------------------------------------------------------
# A dead network


def test_dead_network_is_flagged_in_the_log_results_and_measure_table(tmp_path, tiny_file, monkeypatch, caplog,
                                                                      capsys):
    workdir = str(tmp_path / "dead")
    # lr 50 on the ReLU MLP: every hidden unit ends up off, the loss stays finite.
    assert cli.main(["train", "--config", tiny_file, "--workdir", workdir, "--config.optim.learning_rate=50.0"]) == 0
    assert "WARNING: dead network" in capsys.readouterr().out
    res = json.load(open(os.path.join(workdir, "results.json")))
    assert res["dead"] is True and res["logit_spread"] == 0.0 and np.isfinite(res["train_loss"])
    assert res["train_accuracy"] <= 0.11 and "optim.learning_rate (it was 50)" in res["warning"]
    assert any(r.getMessage().startswith("dead network") for r in caplog.records)
    assert lio.read_metrics_log(workdir)[-1] == {**lio.read_metrics_log(workdir)[-1], "dead": True}

    def zeros(model, variables, splits, cfg, *, key, train_for_hessian=None):
        z = {"mean": 0.0, "std": 0.0, "n": 8}
        return {s: {**{k: z for k in report.PER_EXAMPLE_ITEMS},
                    "jacobian_frobenius": {**z, "zero_fraction": 1.0}} for s in splits}

    monkeypatch.setattr(report, "measure_state", zeros)
    assert cli.main(["measure", "--workdir", workdir, "--config.measure.progress=False"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("DEAD NETWORK") and "flagged by training" in table[0]
    rows = {line.split()[0]: line for line in table[1:] if line.strip()}
    assert all(rows[k].endswith("(dead network)") for k in ("jacobian_frobenius", "curvature", "local_lipschitz"))
    assert json.load(open(os.path.join(workdir, "measures.json")))["dead"]["reason"].startswith("flagged")


def test_dead_network_criteria():
    # Constant logits, to float32 rounding of their size: dead; a live network's logits differ by O(1).
    assert training.dead_network(0.0, 3.0) and training.dead_network(1e-4, 1e3)
    assert not training.dead_network(0.5, 3.0, [60, 70, 65, 55, 50, 60, 80, 70, 60, 70])
    # One class for >= 99 % of the images (a few live ReLUs elsewhere): dead; 98 %: not.
    assert training.dead_network(1560.0, 2e4, [0, 1, 0, 0, 0, 0, 0, 0, 639, 0])
    assert not training.dead_network(1560.0, 2e4, [0, 13, 0, 0, 0, 0, 0, 0, 627, 0])
    # measure, without a results.json: input-Jacobian 0 on >= 99 % of the measured examples of every split.
    rep = {"test": {"jacobian_frobenius": {"mean": 0.0, "std": 0.0, "n": 100, "zero_fraction": 1.0}},
           "train": {"jacobian_frobenius": {"mean": 0.1, "std": 0.5, "n": 100, "zero_fraction": 0.99}}}
    assert report.dead_network_mark(rep) is not None
    rep["train"]["jacobian_frobenius"]["zero_fraction"] = 0.5
    assert report.dead_network_mark(rep) is None


# ----------------------------------------------------------------------------------------------------------
# Misuse: exit 2, one message, before any loading or compilation


@pytest.mark.parametrize("extra, needles", [
    (["--config.model.kwargs.widht=2"], ["model.kwargs.widht", "did you mean model.kwargs.width_mult"]),
    (["--config.model.kwargs.width_mult=-0.5"], ["width_mult=-0.5", "positive"]),
    (["--config.optim.clip_grad_norm=-1.0"], ["optim.clip_grad_norm=-1.0", "positive"]),
])
def test_train_misuse_exits_2_before_loading_data(tmp_path, monkeypatch, capsys, extra, needles):
    forbid(monkeypatch, training, "prepare_run", "create_train_state", "jit_train_step")
    rc = cli.main(["train", "--config", QUICKSTART, "--workdir", str(tmp_path / "new")] + extra)
    msg = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in msg and all(n in msg for n in needles), msg
    assert not os.path.exists(tmp_path / "new")


def test_regularizer_for_another_model_exits_2_before_compiling(tmp_path, monkeypatch, capsys):
    forbid(monkeypatch, training, "create_train_state", "jit_train_step")
    rc = cli.main(["train", "--config", QUICKSTART, "--workdir", str(tmp_path / "new"),
                   "--config.regularizers.lcnn.beta_coeff=0.01"])
    msg = one_paragraph_error(capsys.readouterr().err)
    assert rc == 2 and "regularizers.lcnn" in msg and "model.name='small_cnn'" in msg and "log_beta" in msg
    assert not os.path.exists(tmp_path / "new")


def test_workdir_that_is_a_file_exits_2(tmp_path, monkeypatch, capsys):
    path = tmp_path / "results.json"
    path.write_text("{}")
    forbid(monkeypatch, training, "prepare_run")
    for argv in (["train", "--config", QUICKSTART, "--workdir", str(path)], ["measure", "--workdir", str(path)]):
        assert cli.main(argv) == 2
        assert "is a file, not a directory" in one_paragraph_error(capsys.readouterr().err)
    assert path.read_text() == "{}"


@pytest.mark.parametrize("override, needle", [
    ("measure.pgd_linf_eps=(-0.1,)", "measure.pgd_linf_eps=(-0.1,) must be a tuple of positive"),
    ("measure.hessian_examples=-5", "measure.hessian_examples=-5 must be a positive integer"),
    ("measure.noise_std=(float('nan'),)", "measure.noise_std"),
    ("measure.splits=('validation',)", "measure.splits"),
])
def test_measure_misuse_exits_2_before_loading_the_checkpoint(reference, monkeypatch, capsys, override, needle):
    forbid(monkeypatch, training, "load_trained")
    before = snapshot(reference[0])
    assert cli.main(["measure", "--workdir", reference[0], f"--config.{override}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert snapshot(reference[0]) == before  # no measures.json


def test_compare_measure_settings_are_validated_the_same_way():
    config = load_config(os.path.join(REPO, "experiments", "configs", "compare_mnist5k.py"))
    apply_overrides(config, ["compare.measure.pgd_l2_eps=(0.0,)", "compare.measure.lipschitz_iters=0"])
    with pytest.raises(errors.ConfigError) as e:
        compare.run_compare(config, "unused")
    assert "compare.measure.pgd_l2_eps" in str(e.value) and "compare.measure.lipschitz_iters" in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# Gradient clipping, NaN inputs


def test_clip_grad_norm_rescales_large_gradients_only():
    cfg = default_config().optim
    cfg.momentum, cfg.schedule, cfg.learning_rate = 0.0, "constant", 1.0
    params = {"w": jnp.zeros(3)}
    plain = training.make_optimizer(cfg, 10, params)[0]
    cfg.clip_grad_norm = 1.0
    clipped = training.make_optimizer(cfg, 10, params)[0]
    big, small = {"w": jnp.array([3.0, 4.0, 0.0])}, {"w": jnp.array([0.3, 0.4, 0.0])}
    np.testing.assert_allclose(clipped.update(big, clipped.init(params), params)[0]["w"], [-0.6, -0.8, 0.0],
                               rtol=1e-6)
    np.testing.assert_allclose(clipped.update(small, clipped.init(params), params)[0]["w"], [-0.3, -0.4, 0.0],
                               rtol=1e-6)
    # Unset, the optimizer state keeps its structure, so checkpoints of earlier runs still restore.
    unclipped = optax.sgd(training.make_schedule(cfg, 10), momentum=None)
    assert jax.tree.structure(plain.init(params)) == jax.tree.structure(unclipped.init(params))
    validate_config(default_config())  # None is valid


def test_nan_pixels_are_refused_on_the_host_before_anything_is_compiled(monkeypatch, tmp_path, capsys):
    from lcnn_jax.nn import make_model

    forbid(monkeypatch, report, "per_example_fn", "robustness", "parameter_hessian")
    xs = np.random.default_rng(0).random((6, 28, 28, 1), dtype=np.float32)
    xs[4, 3, 3, 0] = np.nan
    model, variables = make_model("mlp", 10, widths=(4,)), None  # never applied: the check comes first
    with pytest.raises(DatasetError, match=r"The test images hold 1 NaN/inf pixel value\(s\), in 1 of 6 images "
                                           r"\(first: index 4\)"):
        report.measure_state(model, variables, {"test": (xs, np.zeros(6, np.int32))}, report.measure_defaults(),
                             key=jax.random.PRNGKey(0))

    # compare checks the images it will measure before training anything.
    from lcnn_jax import data as data_lib

    real_load = data_lib.load_split

    def load_with_nan(name, split, **kw):
        s = real_load(name, split, **kw)
        images = s.images.copy()
        images[0, 0, 0, 0] = np.inf
        return s._replace(images=images)

    monkeypatch.setattr(data_lib, "load_split", load_with_nan)
    forbid(monkeypatch, compare, "train_method")
    rc = cli.main(["compare", "--config", os.path.join(REPO, "experiments", "configs", "compare_mnist5k.py"),
                   "--workdir", str(tmp_path / "cmp"), "--config.compare.methods=('standard',)"])
    msg = one_paragraph_error(capsys.readouterr().err)
    assert rc == 2 and "NaN/inf pixel" in msg and "mnist5k test" in msg
    assert not os.path.exists(tmp_path / "cmp")
