"""Vectorized sweeps: one member of the vmapped run equals the single ``fit`` of its config, coefficients matter,
coefficient 0 equals no regularizer, resume equals uninterrupted, a diverging member is frozen and reported while
the others finish, epoch_end hooks run per member, and member / batch sharding on 4 devices equals 1 device.

The oracle throughout is :func:`lcnn_jax.train.fit` run on the member's own config (independent of the
vmapped code path)."""
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
from lcnn_jax import io as lio
from lcnn_jax.train import setup as train_setup, sweep
from lcnn_jax import loops
from lcnn_jax.configs import ConfigError, apply_overrides, default_config
from lcnn_jax.regularizers.base import Regularizer

# Out of the default run (it must stay under 3 minutes on 2 cores): sweeps train whole (small) runs.
# CI runs it with -m slow.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COEFFS = (0.0, 0.05)
SEEDS = (0, 1)


def tiny_config(**overrides):
    """An MLP on 320 mnist5k images, 10 steps per epoch, 12 steps (one epoch boundary): a second per run."""
    c = default_config()
    c.model.name = "mlp"
    c.model.kwargs = {"widths": (16,)}
    c.data.train_size = 320
    c.train.batch_size = 32
    c.train.num_steps = 12
    c.train.log_every = 3
    c.train.checkpoint_every = 4
    c.train.progress = False
    c.optim.learning_rate = 0.1
    c.regularizers = {"spectreg": {"coeff": 0.0}}
    apply_overrides(c, [f"{k}={v!r}" for k, v in overrides.items()])
    return c


def epoch_acc_recorder():
    """Adds nothing to the loss; its epoch_end hook stores the epoch's training accuracy and the epoch, so the
    test can see that hooks ran per member with that member's own accuracy."""
    def init(key, params, batch):
        return {"acc": jnp.full((), -1.0, jnp.float32), "epoch": jnp.full((), -1, jnp.int32)}

    def loss(params, state, batch, key, apply_fn):
        return jnp.zeros(()), state, {}

    def epoch_end(state, acc, epoch):
        return {"acc": jnp.asarray(acc, jnp.float32), "epoch": jnp.asarray(epoch, jnp.int32)}

    return Regularizer("recorder", init, loss, epoch_end)


@pytest.fixture
def with_recorder(monkeypatch):
    real = training.build_regularizers
    monkeypatch.setattr(train_setup, "build_regularizers", lambda cfg, info, **kw: real(cfg, info, **kw) + [epoch_acc_recorder()])


def _leaves_maxdiff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory):
    """The reference sweep (2 seeds x 2 spectreg coefficients), launched through the config convention."""
    mp = pytest.MonkeyPatch()
    real = training.build_regularizers
    mp.setattr(train_setup, "build_regularizers", lambda cfg, info, **kw: real(cfg, info, **kw) + [epoch_acc_recorder()])
    try:
        cfg = tiny_config()
        apply_overrides(cfg, [f"sweep.seeds={SEEDS!r}", f"sweep.grid.spectreg.coeff={COEFFS!r}"])
        workdir = str(tmp_path_factory.mktemp("full"))
        results = sweep.fit_sweep_from_config(cfg, workdir)
    finally:
        mp.undo()
    return workdir, results


def _member(results, seed, coeff):
    (m,) = [m for m in results["members"] if m["seed"] == seed and m["grid"] == {"spectreg.coeff": coeff}]
    return m


def test_members_are_seeds_times_grid_and_files_are_written(full_sweep):
    workdir, results = full_sweep
    got = [(m["seed"], m["grid"]["spectreg.coeff"]) for m in results["members"]]
    assert sorted(got) == sorted((s, c) for s in SEEDS for c in COEFFS)
    summary = json.load(open(os.path.join(workdir, "sweep_results.json")))
    assert summary["num_members"] == 4 and len(summary["members"]) == 4
    for m in summary["members"]:
        r = json.load(open(os.path.join(workdir, "members", m["id"], "results.json")))
        assert r["seed"] == m["seed"] and r["grid"] == m["grid"] and r["diverged"] is False
        assert r["steps"] == 12 and 0.0 <= r["test_accuracy"] <= 1.0 and np.isfinite(r["test_loss"])
        cfg = json.load(open(os.path.join(workdir, "members", m["id"], "config.json")))
        assert cfg["seed"] == m["seed"] and cfg["regularizers"]["spectreg"]["coeff"] == m["grid"]["spectreg.coeff"]


def test_regularized_member_equals_single_fit(full_sweep, tmp_path, with_recorder):
    workdir, results = full_sweep
    member = _member(results, seed=1, coeff=0.05)
    single = training.fit(tiny_config(seed=1, **{"regularizers.spectreg.coeff": 0.05}), str(tmp_path))
    for k in ("test_loss", "train_loss", "test_accuracy", "train_accuracy"):
        assert member[k] == pytest.approx(single[k], abs=1e-5), k

    _, _, ref_state, _ = training.load_trained(str(tmp_path))
    config, model, stacked, members = sweep.load_sweep(workdir)
    got = training.member_state(stacked, member["index"])
    assert _leaves_maxdiff(got.params, ref_state.params) < 1e-5
    # The epoch_end hook ran once (epoch 0, at step 10) on this member with this member's own accuracy.
    rec = got.reg_state[1]
    assert int(rec["epoch"]) == 0
    assert float(rec["acc"]) == pytest.approx(float(ref_state.reg_state[1]["acc"]), abs=1e-6)
    accs = {float(training.member_state(stacked, m.index).reg_state[1]["acc"]) for m in members}
    assert len(accs) > 1, "every member got the same epoch accuracy: hooks did not see per-member values"


def test_coefficients_matter_and_zero_equals_unregularized(full_sweep, tmp_path, with_recorder):
    workdir, results = full_sweep
    _, _, stacked, _ = sweep.load_sweep(workdir)
    params = {c: training.member_state(stacked, _member(results, 0, c)["index"]).params for c in COEFFS}
    assert _leaves_maxdiff(params[0.0], params[0.05]) > 1e-3
    assert _member(results, 0, 0.0)["test_loss"] != _member(results, 0, 0.05)["test_loss"]

    cfg = tiny_config(seed=0)
    cfg.regularizers = {}
    plain = training.fit(cfg, str(tmp_path))
    _, _, ref_state, _ = training.load_trained(str(tmp_path))
    assert _leaves_maxdiff(params[0.0], ref_state.params) < 1e-5
    assert _member(results, 0, 0.0)["test_loss"] == pytest.approx(plain["test_loss"], abs=1e-5)


def test_interrupted_then_resumed_sweep_equals_uninterrupted(tmp_path, monkeypatch, with_recorder):
    # weight_l2 compiles fast; the recorder's epoch_end hook (step 10) runs after the resume point.
    cfg = tiny_config(regularizers={"weight_l2": {"coeff": 0.0}})
    grid = {"weight_l2.coeff": (0.0, 1e-3)}
    full = sweep.fit_sweep(cfg, str(tmp_path / "full"), seeds=SEEDS, grid=grid)

    real_write = lio.MetricsLog.write

    def write_then_die(self, rec):
        real_write(self, rec)
        if rec.get("step") == 6:  # after the checkpoint at step 4, before the epoch boundary at step 10
            raise KeyboardInterrupt

    monkeypatch.setattr(lio.MetricsLog, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        sweep.fit_sweep(cfg, str(tmp_path / "resumed"), seeds=SEEDS, grid=grid)
    assert not os.path.exists(tmp_path / "resumed" / "sweep_results.json")
    monkeypatch.setattr(lio.MetricsLog, "write", real_write)
    resumed = sweep.fit_sweep(cfg, str(tmp_path / "resumed"), seeds=SEEDS, grid={"weight_l2": {"coeff": (0.0, 1e-3)}})

    for a, b in zip(resumed["members"], full["members"]):
        assert (a["seed"], a["grid"]) == (b["seed"], b["grid"])
        for k in ("test_loss", "train_loss", "test_accuracy", "steps"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k
    log = [r for r in lio.read_metrics_log(str(tmp_path / "resumed")) if r.get("kind") != "eval"]
    ref = [r for r in lio.read_metrics_log(str(tmp_path / "full")) if r.get("kind") != "eval"]
    assert [r["step"] for r in log] == [r["step"] for r in ref] == [3, 6, 9, 12]
    np.testing.assert_allclose([r["loss"] for r in log], [r["loss"] for r in ref], rtol=1e-6)
    _, _, s_full, _ = sweep.load_sweep(str(tmp_path / "full"))
    _, _, s_res, _ = sweep.load_sweep(str(tmp_path / "resumed"))
    assert _leaves_maxdiff(s_full, s_res) < 1e-6

    # A different sweep in the same workdir is refused instead of silently mixing checkpoints.
    with pytest.raises(ConfigError, match="different sweep"):
        sweep.fit_sweep(cfg, str(tmp_path / "resumed"), seeds=(0, 5), grid=grid)


def _nan_when_coeff_above_one(after):
    """NaN loss from call ``after`` on, but only for members whose coefficient exceeds 1."""
    def init(key, params, batch):
        return {"coeff": jnp.zeros((), jnp.float32), "calls": jnp.zeros((), jnp.int32)}

    def loss(params, state, batch, key, apply_fn):
        bad = (state["coeff"] > 1.0) & (state["calls"] >= after)
        return jnp.where(bad, jnp.nan, 0.0), {**state, "calls": state["calls"] + 1}, {}

    return Regularizer("nan_if", init, loss)


def test_diverging_member_is_frozen_and_reported_others_finish(tmp_path, monkeypatch):
    monkeypatch.setattr(train_setup, "build_regularizers", lambda cfg, info, **kw: [_nan_when_coeff_above_one(4)])
    cfg = tiny_config(**{"train.keep_checkpoints": 5})
    res = sweep.fit_sweep(cfg, str(tmp_path), seeds=(0,), grid={"nan_if.coeff": (0.0, 2.0)})
    bad = [m for m in res["members"] if m["grid"]["nan_if.coeff"] == 2.0][0]
    ok = [m for m in res["members"] if m["grid"]["nan_if.coeff"] == 0.0][0]
    assert bad["diverged"] is True and bad["diverged_at"] == 4
    assert ok["diverged"] is False and ok["diverged_at"] is None
    assert all(np.isfinite(ok[k]) for k in ("test_loss", "train_loss")) and ok["steps"] == 12
    summary = json.load(open(tmp_path / "sweep_results.json"))
    assert summary["diverged"] == [bad["id"]]
    assert [row["num_diverged"] for row in summary["aggregate"]] == [0, 1]
    on_disk = json.load(open(tmp_path / "members" / bad["id"] / "results.json"))
    assert on_disk["diverged"] is True and on_disk["diverged_at"] == 4

    # Until step 4 both members trained identically (the penalty is 0 for both); the diverged one must have kept
    # exactly those parameters, while the healthy one moved on.
    _, _, stacked, _ = sweep.load_sweep(str(tmp_path))
    frozen = training.member_state(stacked, bad["index"])
    assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(frozen.params))
    ckpt = training.Checkpointer(str(tmp_path))
    at4 = ckpt.restore(stacked, 4)
    ckpt.close()
    assert _leaves_maxdiff(frozen.params, training.member_state(at4, ok["index"]).params) == 0.0
    assert _leaves_maxdiff(training.member_state(stacked, ok["index"]).params, frozen.params) > 1e-4


def test_shared_data_order_reproduces_the_base_seed_only(tmp_path):
    cfg = tiny_config(seed=1, regularizers={"weight_l2": {"coeff": 1e-3}})
    res = sweep.fit_sweep(cfg, str(tmp_path / "shared"), seeds=(0, 1), data_order="shared")
    single = training.fit(cfg, str(tmp_path / "single"))  # seed 1 = the base config's seed
    _, _, stacked, members = sweep.load_sweep(str(tmp_path / "shared"))
    _, _, ref, _ = training.load_trained(str(tmp_path / "single"))
    by_seed = {m.seed: m.index for m in members}
    assert _leaves_maxdiff(training.member_state(stacked, by_seed[1]).params, ref.params) < 1e-5
    assert res["members"][by_seed[1]]["test_loss"] == pytest.approx(single["test_loss"], abs=1e-5)
    assert res["data_order"] == "shared"


def test_bad_grid_and_seeds_raise_config_error(tmp_path):
    cfg = tiny_config()
    with pytest.raises(ConfigError, match="spectreg.coeff"):
        sweep.fit_sweep(cfg, str(tmp_path), seeds=(0,), grid={"spectreg.cof": (0.1,)})
    with pytest.raises(ConfigError, match="datagrad"):
        sweep.fit_sweep(cfg, str(tmp_path), seeds=(0,), grid={"datagrad.coeff": (0.1,)})
    with pytest.raises(ConfigError, match="seeds"):
        sweep.fit_sweep(cfg, str(tmp_path), seeds=(), grid=None)
    with pytest.raises(ConfigError, match="seeds"):
        sweep.fit_sweep(cfg, str(tmp_path), seeds=(0, 0), grid=None)
    with pytest.raises(ConfigError, match="finite"):
        sweep.fit_sweep(cfg, str(tmp_path), seeds=(0,), grid={"spectreg.coeff": (float("nan"),)})


def test_member_list_order_and_member_config():
    members = training.sweep_members((3, 4), {"a.coeff": (0.1, 0.2), "b": {"coeff": (1.0,)}})
    assert [(m.seed, m.values) for m in members] == [
        (3, {"a.coeff": 0.1, "b.coeff": 1.0}), (3, {"a.coeff": 0.2, "b.coeff": 1.0}),
        (4, {"a.coeff": 0.1, "b.coeff": 1.0}), (4, {"a.coeff": 0.2, "b.coeff": 1.0})]
    assert len({m.id for m in members}) == 4
    cfg = training.member_config(tiny_config(), members[1])
    assert cfg.seed == 3 and cfg.regularizers.spectreg.coeff == 0.0 and cfg.regularizers.a.coeff == 0.2


SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    from lcnn_jax import train as training
    from lcnn_jax import io as lio
    from lcnn_jax.train import setup as train_setup, sweep
    from lcnn_jax import loops
    from lcnn_jax.configs import default_config
    from lcnn_jax.nn import make_model
    from lcnn_jax.regularizers import make_regularizer
    assert len(jax.devices()) == 4
    rng = np.random.default_rng(0)
    model = make_model("mlp", 10, widths=(8,))
    regs = [make_regularizer("weight_l2", coeff=0.1)]  # cheap to compile; the coefficient is still a state leaf
    tx = training.make_optimizer(default_config().optim, 10, None)[0]
    step_fn = training.make_train_step(model, regs)
    # members x data mesh: 4 members -> 4 x 1, 3 -> 1 x 4 (batch split), 2 -> 2 x 2, 6 -> 2 x 2 (3 per group)
    expected = {4: ("member", 4, 1), 3: ("batch", 1, 4), 2: ("members x data", 2, 2), 6: ("members x data", 2, 2)}
    for k in (4, 3, 2, 6):
        batch = {"image": rng.random((k, 16, 8, 8, 1), dtype=np.float32),
                 "label": rng.integers(0, 10, (k, 16)).astype(np.int32)}
        one = {key: v[0] for key, v in batch.items()}
        states = [training.create_train_state(model, tx, regs, jax.random.PRNGKey(i), one) for i in range(k)]
        out = []
        for devices in (jax.devices()[:1], jax.devices()):
            mesh = training.data_mesh(devices)
            layout = training.sweep_layout(mesh, k)
            state = training.place_state(training.stack_states(states), layout)
            step = training.jit_sweep_step(step_fn, layout)
            for _ in range(2):
                state, metrics = step(state, training.place_batch(batch, layout))
            shards = {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(state.params)}
            out.append((jax.device_get(state.params), np.asarray(metrics["loss"]),
                        (layout.axis, layout.member_shards, layout.data_shards), shards))
        (p1, l1, a1, _), (p4, l4, a4, s4) = out
        assert a4 == expected[k] and s4 == {4}, (k, a4, s4)
        assert dict(layout.mesh.shape) == {"members": a4[1], "data": a4[2]}
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)))
        print("MAXDIFF", k, diff, np.max(np.abs(l1 - l4)))
        assert diff < 1e-5 and np.max(np.abs(l1 - l4)) < 1e-5 and l1.shape == (k,)
""")


@pytest.mark.slow
def test_four_device_members_x_data_mesh_equals_one_device():
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("MAXDIFF") == 4


def test_train_seeds_returns_states_in_asked_order_and_fallback_matches(tmp_path, monkeypatch):
    """train_seeds: the vmapped route returns one state per seed in the order asked (not the sweep's member
    order); when fit_sweep raises, the per-seed fallback trains the same networks (to float error) and says why."""
    cfg = tiny_config()
    run = sweep.train_seeds(cfg, str(tmp_path / "vmapped"), (1, 0))
    assert run.trained_with == "fit_sweep" and run.note == "" and len(run.states) == 2
    _, _, stacked, members = sweep.load_sweep(str(tmp_path / "vmapped"))
    by_seed = {m.seed: training.member_state(stacked, m.index) for m in members}
    assert _leaves_maxdiff(run.states[0].params, by_seed[1].params) == 0.0
    assert _leaves_maxdiff(run.states[0].params, run.states[1].params) > 1e-3  # different seeds differ

    def broken(*a, **k):
        raise MemoryError("simulated: the vmapped program does not fit")

    monkeypatch.setattr(sweep, "fit_sweep", broken)
    alone = sweep.train_seeds(cfg, str(tmp_path / "alone"), (1, 0))
    assert alone.trained_with == "fit" and "MemoryError" in alone.note
    for a, b in zip(alone.states, run.states):
        assert _leaves_maxdiff(a.params, b.params) < 1e-5


def test_member_loop_unroll_equals_vmap_for_a_conv_net_and_auto_picks_it_on_cpu(tmp_path):
    """The unrolled member loop (what ``auto`` picks for a convolutional net on CPU) trains the same members as
    the vmapped one, to float error, and the summary says which loop ran; MLPs stay vmapped."""
    cfg = tiny_config(**{"model.name": "small_cnn", "train.num_steps": 6, "train.batch_size": 16})
    cfg.model.kwargs = {"width_mult": 0.125, "act": "relu"}
    grid = {"spectreg.coeff": (0.0, 0.05)}
    runs = {loop: sweep.fit_sweep(cfg, str(tmp_path / loop), seeds=(0, 1), grid=grid, member_loop=loop)
            for loop in ("auto", "vmap")}
    assert runs["auto"]["member_loop"] == "unroll" and runs["vmap"]["member_loop"] == "vmap"
    states = {loop: sweep.load_sweep(str(tmp_path / loop))[2] for loop in runs}
    assert _leaves_maxdiff(states["auto"].params, states["vmap"].params) < 1e-5
    assert _leaves_maxdiff(states["auto"].params, jax.tree.map(lambda a: a[::-1], states["auto"].params)) > 1e-3
    for a, b in zip(runs["auto"]["members"], runs["vmap"]["members"]):
        assert abs(a["test_loss"] - b["test_loss"]) < 1e-5 and a["test_accuracy"] == b["test_accuracy"]
    with pytest.raises(ConfigError, match="member_loop"):
        sweep.fit_sweep(cfg, str(tmp_path / "bad"), seeds=(0,), member_loop="pmap")


def test_uses_convolution_sees_nested_bodies_and_auto_rule():
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    k = jnp.ones((3, 3, 1, 2))
    conv = lambda x: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    assert loops.uses_convolution(conv, x)
    assert loops.uses_convolution(lambda x: jax.lax.scan(lambda c, _: (conv(c).sum(-1, keepdims=True), None), x,
                                                         None, length=2)[0], x)
    assert loops.uses_convolution(jax.grad(lambda x: jax.jit(conv)(x).sum()), x)
    assert not loops.uses_convolution(lambda x: jnp.tanh(x.reshape(2, -1) @ jnp.ones((64, 3))), x)
    mesh = training.data_mesh(jax.devices()[:1])
    assert training.resolve_member_loop("auto", training.sweep_layout(mesh, 3), True) == "unroll"
    assert training.resolve_member_loop("auto", training.sweep_layout(mesh, 3), False) == "vmap"
    assert training.resolve_member_loop("auto", training.sweep_layout(mesh, loops.MAX_UNROLLED_MEMBERS + 1), True) == "vmap"
    assert training.resolve_member_loop("vmap", training.sweep_layout(mesh, 3), True) == "vmap"
    f = lambda a, b: {"s": a * 2 + b, "t": a.sum()}  # noqa: E731
    a, b = jnp.arange(6.0).reshape(3, 2), jnp.ones(2)
    v, u = training.map_members(f, (0, None), "vmap")(a, b), training.map_members(f, (0, None), "unroll")(a, b)
    assert all(np.array_equal(v[key], u[key]) and v[key].shape[0] == 3 for key in v)
