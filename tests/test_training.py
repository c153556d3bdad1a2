"""Training loop: loss falls, sharded step equals single-device step, resume equals uninterrupted, NaN stops
cleanly, determinism, CLI errors."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax import train as training
from lcnn_jax.train import setup as train_setup
from lcnn_jax import errors
from lcnn_jax import io as lio
from lcnn_jax.configs import apply_overrides, default_config
from lcnn_jax.regularizers.base import Regularizer

# Out of the default run (it must stay under 3 minutes on 2 cores): every test trains or runs the CLI end to end.
# CI runs it with -m slow.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """An MLP on 640 mnist5k images: a few seconds per run."""
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
    apply_overrides(c, [f"{k}={v!r}" for k, v in overrides.items()])
    return c


def test_loss_falls_on_mnist5k_subset(tmp_path):
    res = training.fit(tiny_config(), str(tmp_path))
    log = [r for r in lio.read_metrics_log(str(tmp_path)) if r.get("kind") != "eval"]
    first, last = np.mean([r["ce"] for r in log[:2]]), np.mean([r["ce"] for r in log[-2:]])
    assert last < 0.6 * first, (first, last)
    assert res["train_accuracy"] > 0.6 and res["steps"] == 24
    for key in ("test_accuracy", "train_accuracy", "steps", "wall_time_s", "config"):
        assert key in json.load(open(tmp_path / "results.json"))
    for rec in log:
        assert {"step", "loss", "accuracy", "grad_norm", "learning_rate", "wall_time_s"} <= set(rec)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = tiny_config()
    full = training.fit(cfg, str(tmp_path / "full"))

    # Interrupt after step 12 (checkpoint at step 8), as a Ctrl-C would.
    real_write = lio.MetricsLog.write

    def write_then_die(self, rec):
        real_write(self, rec)
        if rec.get("step") == 12:
            raise KeyboardInterrupt

    monkeypatch.setattr(lio.MetricsLog, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        training.fit(cfg, str(tmp_path / "resumed"))
    monkeypatch.setattr(lio.MetricsLog, "write", real_write)
    resumed = training.fit(cfg, str(tmp_path / "resumed"))

    for k in ("test_accuracy", "test_loss", "train_accuracy", "train_loss", "steps"):
        assert resumed[k] == pytest.approx(full[k], rel=1e-6, abs=1e-7), k
    steps = [r["step"] for r in lio.read_metrics_log(str(tmp_path / "resumed")) if r.get("kind") != "eval"]
    assert steps == sorted(set(steps)), "a resumed log must not repeat steps"
    full_log = [r for r in lio.read_metrics_log(str(tmp_path / "full")) if r.get("kind") != "eval"]
    res_log = [r for r in lio.read_metrics_log(str(tmp_path / "resumed")) if r.get("kind") != "eval"]
    np.testing.assert_allclose([r["loss"] for r in res_log], [r["loss"] for r in full_log], rtol=1e-6)


def test_same_seed_same_metrics_and_other_seed_differs(tmp_path):
    a = training.fit(tiny_config(**{"train.num_steps": 8}), str(tmp_path / "a"))
    b = training.fit(tiny_config(**{"train.num_steps": 8}), str(tmp_path / "b"))
    c = training.fit(tiny_config(**{"train.num_steps": 8, "seed": 1}), str(tmp_path / "c"))
    assert a["test_loss"] == b["test_loss"]
    assert a["test_loss"] != c["test_loss"]


def _nan_after(n):
    """A regularizer that returns NaN from its n-th call on (its state counts the calls)."""
    def init(key, params, batch):
        return {"calls": jnp.zeros((), jnp.int32)}

    def loss(params, state, batch, key, apply_fn):
        value = jnp.where(state["calls"] >= n, jnp.nan, 0.0)
        return value, {"calls": state["calls"] + 1}, {}

    return Regularizer("nan_after", init, loss)


def test_nan_loss_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(train_setup, "build_regularizers", lambda cfg, info, **kw: [_nan_after(13)])
    cfg = tiny_config()
    with pytest.raises(errors.TrainingDiverged, match="step 13") as err:
        training.fit(cfg, str(tmp_path))
    assert "optim.clip_grad_norm" in str(err.value)  # the advice names an option that exists
    config, model, state, info = training.load_trained(str(tmp_path))
    assert int(state.step) == 8  # the last checkpoint before the divergence
    assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(state.params))


def test_weight_decay_mask_excludes_named_leaves():
    params = {"Dense_0": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}, "act": {"log_beta": jnp.ones(())}}
    mask = training.weight_decay_mask(params, ("log_beta",))
    assert mask == {"Dense_0": {"kernel": True, "bias": True}, "act": {"log_beta": False}}
    cfg = default_config().optim
    cfg.weight_decay, cfg.momentum, cfg.schedule, cfg.learning_rate = 0.5, 0.0, "constant", 1.0
    tx, _ = training.make_optimizer(cfg, 10, params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(updates["act"]["log_beta"]) == 0.0  # excluded: no decay
    np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.5 * np.ones(2))  # -lr * wd * theta


def test_piecewise_schedule_decays_at_fractions():
    cfg = default_config().optim
    cfg.schedule, cfg.learning_rate = "piecewise", 0.1
    sched = training.make_schedule(cfg, 80)
    np.testing.assert_allclose([sched(59), sched(60), sched(69), sched(70)], [0.1, 0.01, 0.01, 0.001], rtol=1e-6)


SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    from lcnn_jax import train as training
    from lcnn_jax.configs import default_config
    from lcnn_jax.nn import make_model
    from lcnn_jax.regularizers import make_regularizer
    assert len(jax.devices()) == 4
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((16, 28, 28, 1), dtype=np.float32), "label": rng.integers(0, 10, 16).astype(np.int32)}
    model = make_model("mlp", 10, widths=(32,))
    regs = [make_regularizer("spectreg", coeff=0.1)]
    cfg = default_config().optim
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = training.data_mesh(devices)
        state = training.create_train_state(model, training.make_optimizer(cfg, 10, None)[0], regs,
                                            jax.random.PRNGKey(0), batch)
        state = training.replicate(state, mesh)
        step = training.jit_train_step(training.make_train_step(model, regs), mesh)
        for _ in range(2):
            state, metrics = step(state, training.shard_batch(batch, mesh))
        out.append((jax.device_get(state.params), float(metrics["loss"]), len(jax.tree.leaves(state.params)[0].sharding.device_set)))
    (p1, l1, n1), (p4, l4, n4) = out
    assert (n1, n4) == (1, 4), (n1, n4)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)))
    print("MAXDIFF", diff, abs(l1 - l4))
    assert diff < 1e-5 and abs(l1 - l4) < 1e-5
""")


@pytest.mark.slow
def test_four_device_step_equals_one_device_step():
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MAXDIFF" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["--config.data.name=nope"], "data.name"),
    (["--config.optim.lr=0.1"], "optim.lr"),
    (["--config.train.batch_size=-5"], "batch_size"),
    (["--config.optim.learning_rate=fast"], "learning_rate"),
    (["--config.regularizers.nope.coeff=1.0"], "regularizers.nope"),
])
def test_cli_bad_config_exits_2_without_traceback(tmp_path, capsys, args, needle):
    from lcnn_jax.cli import main

    rc = main(["train", "--config", os.path.join(REPO, "experiments/configs/quickstart.py"),
               "--workdir", str(tmp_path)] + args)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


def test_cli_missing_config_file_and_idx_dir_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "lcnn_jax", "train", "--workdir", str(tmp_path)]
    p = subprocess.run(cmd + ["--config", "no/such/file.py"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not found" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(cmd + ["--config", os.path.join(REPO, "experiments/configs/quickstart.py"),
                              "--config.data.name=mnist", f"--config.data.data_dir={tmp_path}"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and str(tmp_path) in p.stderr
