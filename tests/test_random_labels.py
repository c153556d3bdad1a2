"""Fast checks of the random-label study script (experiments/random_labels.py).

Oracles: a pair-counting Kendall tau (no ties: (concordant - discordant) / C(n, 2)) and its closed forms for monotone
and reversed orderings; numpy argmax accuracies; label counts; and the file system (a finished run file must not be
rewritten, a run with another protocol must be).
"""
import itertools
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import random_labels as rl  # noqa: E402
from experiments import random_labels_report as rlr  # noqa: E402
from experiments import random_labels_train as rlt  # noqa: E402

# Out of the default run (it must stay under 3 minutes on 2 cores): the study script end to end.
# CI runs it with -m slow.
pytestmark = pytest.mark.slow


def pair_count_tau(x, y):
    """Kendall tau-a from all pairs; equals tau-b when there are no ties."""
    s = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        s += np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
    return s / (len(x) * (len(x) - 1) / 2)


# ------------------------------------------------------------------------------------------------ Kendall tau
def test_kendall_tau_matches_pair_counting_on_random_data():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(17), rng.standard_normal(17)
    y = y + 0.8 * x  # some correlation, no ties
    got = rlr.kendall_tau(x, y)
    assert got["n"] == 17
    assert got["tau"] == pytest.approx(pair_count_tau(x, y), abs=1e-12)
    assert 0 < got["pvalue"] < 1


def test_kendall_tau_closed_forms_for_monotone_maps_and_nan_dropping():
    x = np.linspace(0.1, 3.0, 9)
    assert rlr.kendall_tau(x, np.exp(3 * x))["tau"] == pytest.approx(1.0)  # any increasing map: tau = 1
    assert rlr.kendall_tau(x, -x ** 3)["tau"] == pytest.approx(-1.0)  # decreasing: -1
    # one swapped adjacent pair out of C(9, 2) = 36 pairs: tau = (35 - 1) / 36
    y = x.copy()
    y[[3, 4]] = y[[4, 3]]
    assert rlr.kendall_tau(x, y)["tau"] == pytest.approx(34 / 36)
    # a non-finite measure is left out with its pair partner, not propagated
    y_nan = np.exp(x)
    y_nan[2] = np.nan
    res = rlr.kendall_tau(x, y_nan)
    assert res["n"] == 8 and res["tau"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ gap
def test_generalization_gap_matches_numpy_oracle():
    rng = np.random.default_rng(1)
    tr_logits, te_logits = rng.standard_normal((50, 10)), rng.standard_normal((30, 10))
    tr_labels, te_labels = rng.integers(0, 10, 50), rng.integers(0, 10, 30)
    tr_labels[:20] = tr_logits[:20].argmax(1)  # make train accuracy differ from chance
    got = rl.generalization_gap(tr_logits, tr_labels, te_logits, te_labels)
    tr_acc = sum(int(np.argmax(row) == lab) for row, lab in zip(tr_logits, tr_labels)) / 50
    te_acc = sum(int(np.argmax(row) == lab) for row, lab in zip(te_logits, te_labels)) / 30
    assert got["train_acc"] == pytest.approx(tr_acc)
    assert got["test_acc"] == pytest.approx(te_acc)
    assert got["gap"] == pytest.approx(tr_acc - te_acc)
    with pytest.raises(ValueError, match="logits"):
        rl.accuracy(tr_logits[:, 0], tr_labels)


def test_mean_cross_entropy_matches_a_direct_softmax_and_survives_large_logits():
    rng = np.random.default_rng(2)
    logits, labels = rng.standard_normal((40, 10)), rng.integers(0, 10, 40)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert rl.mean_cross_entropy(logits, labels) == pytest.approx(-np.mean(np.log(p[np.arange(40), labels])),
                                                                  rel=1e-12)
    # shifting every row by a constant leaves the loss unchanged (no overflow at 1e4)
    assert rl.mean_cross_entropy(logits + 1e4, labels) == pytest.approx(rl.mean_cross_entropy(logits, labels),
                                                                        rel=1e-9)


# ------------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_trial_labels_shuffle_exactly_round_r_n_positions(ratio):
    n = 400
    labels = np.repeat(np.arange(10), n // 10)
    got = rl.trial_labels(labels, ratio, trials=[0, 1, 2])
    assert got.shape == (3, n)
    m = int(round(ratio * n))
    for row in got:
        # a permutation among the m chosen positions: class counts unchanged, at most m labels differ
        np.testing.assert_array_equal(np.bincount(row, minlength=10), np.bincount(labels, minlength=10))
        changed = int(np.sum(row != labels))
        assert changed <= m
        # about (1 - 1/K) of the chosen ones change: a loose binomial band, not an implementation constant
        assert changed >= 0.9 * m - 4 * np.sqrt(m) - 1
    if ratio == 0.0:
        np.testing.assert_array_equal(got, np.broadcast_to(labels, got.shape))
    else:
        assert not np.array_equal(got[0], got[1])  # trials shuffle differently


def test_batch_indices_visit_every_example_once_per_epoch_per_member():
    idx = rlt.batch_indices(n=50, batch_size=10, seeds=[3, 4], start=0, steps=10)  # two epochs of 5 batches
    assert idx.shape == (10, 2, 10)
    for member in range(2):
        for epoch in range(2):
            seen = idx[5 * epoch:5 * (epoch + 1), member].ravel()
            np.testing.assert_array_equal(np.sort(seen), np.arange(50))
    assert not np.array_equal(idx[:, 0], idx[:, 1])
    # resuming at a later step reproduces the same batches
    np.testing.assert_array_equal(rlt.batch_indices(50, 10, [3, 4], start=7, steps=3), idx[7:10])


# ------------------------------------------------------------------------------------------------ resume
def _cfg(tmp_path, **kw):
    cfg = rl.parse_args(["--out", str(tmp_path), "--models", "ms_mlp", "--ratios", "0.5", "--trials", "2"])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _fake_run(cfg, model, ratio, trial, gap, ms):
    rec = {"model": model, "ratio": ratio, "trial": trial, "protocol": rl.protocol_of(cfg), "gap": gap,
           "train_acc": 1.0, "test_acc": 1.0 - gap, "minimum_sharpness": ms, "normalized_sharpness": 2 * ms,
           "hessian_trace": 3 * ms, "top_eigenvalue": -ms}
    path = rl.run_path(cfg.out, model, ratio, trial)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(rec, fh)
    return path


def test_finished_runs_are_not_recomputed_and_other_protocols_are(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    paths = [_fake_run(cfg, "ms_mlp", 0.5, t, gap=0.1 * (t + 1), ms=float(t + 1)) for t in range(2)]
    before = [os.stat(p).st_mtime_ns for p in paths]
    monkeypatch.setattr(rl, "load_data", lambda cfg: None)

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(rl, "run_group", must_not_train)
    table = rl.run_study(cfg)
    assert [os.stat(p).st_mtime_ns for p in paths] == before
    # the summary is built from the files: MS increases with the gap, top eigenvalue decreases
    assert table["ms_mlp"]["minimum_sharpness"]["tau"] == pytest.approx(1.0)
    assert table["ms_mlp"]["top_eigenvalue"]["tau"] == pytest.approx(-1.0)
    assert os.path.isfile(os.path.join(tmp_path, "kendall_tau.md"))

    # a changed protocol (more steps) makes both runs pending again, and only the missing trial is trained
    other = _cfg(tmp_path, max_steps=cfg.max_steps + 1)
    assert rl.pending_trials(other.out, "ms_mlp", 0.5, [0, 1], rl.protocol_of(other)) == [0, 1]
    os.remove(paths[1])
    assert rl.pending_trials(cfg.out, "ms_mlp", 0.5, [0, 1], rl.protocol_of(cfg)) == [1]
    called = []
    monkeypatch.setattr(rl, "run_group", lambda model, ratio, trials, data, cfg: called.append((model, ratio,
                                                                                                list(trials))))
    rl.run_study(cfg)
    assert called == [("ms_mlp", 0.5, [1])]


def test_a_truncated_run_file_counts_as_unfinished(tmp_path):
    cfg = _cfg(tmp_path)
    path = rl.run_path(cfg.out, "ms_mlp", 0.5, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write('{"model": "ms_mlp", "prot')
    assert not rl.run_is_done(path, rl.protocol_of(cfg))


def test_a_reference_run_with_another_budget_is_not_finished(tmp_path):
    """Every field of the reference protocol counts (steps, weight decay, lr decay), not only our protocol's."""
    cfg = rl.model_cfg(rl.parse_args(["--protocol", "reference", "--models", "ms_mlp", "--out", str(tmp_path)]),
                       "ms_mlp")
    _fake_run(cfg, "ms_mlp", 0.5, 0, gap=0.1, ms=1.0)
    assert rl.pending_trials(cfg.out, "ms_mlp", 0.5, [0, 1], rl.protocol_of(cfg)) == [1]
    for k, v in (("steps", cfg.steps + 1), ("weight_decay", 0.0), ("lr_decay", 2 * cfg.lr_decay)):
        other = rl.argparse.Namespace(**{**vars(cfg), k: v})
        assert rl.pending_trials(cfg.out, "ms_mlp", 0.5, [0], rl.protocol_of(other)) == [0], k


# ------------------------------------------------------------------------------------------------ training program
def test_chunk_trainer_freezes_finished_members_and_unroll_matches_vmap():
    import jax
    import jax.numpy as jnp
    import optax

    from lcnn_jax import sweep
    from lcnn_jax.nn import make_model

    model = make_model("mlp", 10, widths=(16,))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(24, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, (2, 24)), jnp.int32)
    state = rlt.init_members(model, optax.sgd(0.1, momentum=0.9), [0, 1], images[:1])
    for i, s in enumerate((0, 1)):  # member i is the network initialised from its own seed
        want = model.init(jax.random.PRNGKey(s), images[:1])["params"]
        for a, b in zip(jax.tree.leaves(sweep.member_state(state, i).params), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    idx = jnp.asarray(rlt.batch_indices(24, 8, [0, 1], start=0, steps=4))
    done = jnp.asarray([True, False])
    out = {loop: rl.make_chunk_trainer(model, loop)(state, done, images, labels, idx) for loop in ("vmap", "unroll")}
    np.testing.assert_array_equal(np.asarray(out["vmap"].step), [0, 4])  # the finished member took no step
    for a, b, p0 in zip(jax.tree.leaves(out["vmap"].params), jax.tree.leaves(out["unroll"].params),
                        jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(p0[0]))  # finished member untouched
        assert not np.array_equal(np.asarray(a[1]), np.asarray(p0[1]))  # the other one trained
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # the per-member loss went down on its own labels (4 SGD steps on 24 examples)
    ce = lambda p, y: float(optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        model.apply({"params": p}, images), y).mean())
    member = lambda st: sweep.member_state(st, 1).params  # noqa: E731
    assert ce(member(out["vmap"]), labels[1]) < ce(member(state), labels[1])
    # the logits of every member, in chunks with padding, equal one apply per member
    logits = np.asarray(rlt.make_member_logits(model, chunk=10)(out["vmap"], images))
    assert logits.shape == (2, 24, 10)
    np.testing.assert_allclose(logits[1], np.asarray(model.apply({"params": member(out["vmap"])}, images)),
                               rtol=1e-5, atol=1e-5)
    # steps from the host (the CPU's choice for convolutional models) take the same steps as the scanned chunk
    host = rl.make_chunk_trainer(model, "vmap", host_steps=True)(state, done, images, labels, idx)
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(out["vmap"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert rlt.steps_from_host(model) is False
    if jax.default_backend() == "cpu":
        assert rlt.steps_from_host(make_model("lenet", 10)) is True
    # the member loop is the library's rule: convolutional members unrolled on CPU, dense ones vmapped
    assert rlt.member_loop(model, "auto", 2) == "vmap" and rlt.member_loop(model, "unroll", 2) == "unroll"
    if jax.default_backend() == "cpu":
        assert rlt.member_loop(make_model("lenet", 10), "auto", 3) == "unroll"


# ------------------------------------------------------------------------------------------------ reference protocol
def test_epoch_batches_cut_each_permutation_like_torch_split():
    # n = 25, B = 10: three batches per epoch of 10, 10 and 5 real examples (the last padded to 10 at weight 0)
    idx, w = rlt.epoch_batches(n=25, batch_size=10, seeds=[3, 4], start=0, steps=6)
    assert idx.shape == w.shape == (6, 2, 10)
    np.testing.assert_array_equal(w.sum(axis=2), np.tile([10, 10, 5], 2)[:, None].repeat(2, axis=1))
    for member in range(2):
        for epoch in range(2):
            rows = slice(3 * epoch, 3 * epoch + 3)
            seen = idx[rows, member][w[rows, member] > 0]
            np.testing.assert_array_equal(np.sort(seen), np.arange(25))  # every example exactly once per epoch
    assert not np.array_equal(idx[:, 0], idx[:, 1])
    idx2, w2 = rlt.epoch_batches(25, 10, [3, 4], start=4, steps=2)  # resuming mid-epoch gives the same batches
    np.testing.assert_array_equal(idx2, idx[4:6])
    np.testing.assert_array_equal(w2, w[4:6])
    # a batch larger than the data set is the whole data set
    idx, w = rlt.epoch_batches(n=7, batch_size=1024, seeds=[0], start=0, steps=2)
    assert idx.shape == (2, 1, 7) and w.min() == 1.0


def test_reference_optimizer_matches_a_numpy_restatement_of_torch_sgd():
    """torch.optim.SGD(lr, momentum, weight_decay) under LambdaLR(1 / (d t + 1)) stepped per batch, written out."""
    import jax.numpy as jnp

    lr, mom, wd, d = 0.1, 0.9, 1e-2, 0.05
    tx = rl.reference_optimizer(lr, mom, wd, d)
    rng = np.random.default_rng(0)
    theta = rng.standard_normal(5)
    grads = rng.standard_normal((6, 5))
    p, state = jnp.asarray(theta, jnp.float32), tx.init(jnp.asarray(theta, jnp.float32))
    want, buf = theta.copy(), None
    for t, g in enumerate(grads):
        upd, state = tx.update(jnp.asarray(g, jnp.float32), state, p)
        p = p + upd
        g_wd = g + wd * want
        buf = g_wd if buf is None else mom * buf + g_wd  # torch: the first step sets the buffer to the gradient
        want = want - lr / (d * t + 1.0) * buf
    np.testing.assert_allclose(np.asarray(p), want, rtol=1e-5, atol=1e-6)


def test_reference_cfg_defaults_and_the_scaled_schedule_end_at_the_references_lr_factor():
    cfg = rl.parse_args(["--protocol", "reference", "--models", "ms_mlp,lenet", "--steps", "600"])
    assert cfg.out.endswith(os.path.join("random_labels", "reference_protocol"))
    mlp, lenet = rl.model_cfg(cfg, "ms_mlp"), rl.model_cfg(cfg, "lenet")
    assert (mlp.lr, lenet.lr, mlp.batch_size, mlp.weight_decay, mlp.momentum) == (0.1, 0.01, 1024, 1e-5, 0.9)
    assert (mlp.n_train, lenet.n_train) == (2000, 500)
    # the reference: 3000 (MLP) / 1000 (LeNet) epochs of ceil(60000 / 1024) = 59 steps at 1e-4 per step
    assert rl.reference_steps("ms_mlp") == 177_000 and rl.reference_steps("lenet") == 59_000
    for c, model in ((mlp, "ms_mlp"), (lenet, "lenet")):
        ours_end = 1.0 / (c.lr_decay * c.steps + 1.0)
        ref_end = 1.0 / (1e-4 * rl.reference_steps(model) + 1.0)
        assert ours_end == pytest.approx(ref_end, rel=1e-12)
    assert rl.model_cfg(rl.parse_args(["--protocol", "reference", "--lr_decay", "1e-4"]), "ms_mlp").lr_decay == 1e-4
    # the two protocols' options do not mix
    with pytest.raises(SystemExit):
        rl.parse_args(["--protocol", "reference", "--target_loss", "1e-3"])
    with pytest.raises(SystemExit):
        rl.parse_args(["--steps", "10"])
    with pytest.raises(SystemExit):
        rl.parse_args(["--protocol", "reference", "--models", "small_cnn"])


def test_member_groups_keep_ratio_order_and_size():
    pending = [(0.0, 0), (0.0, 1), (1.0, 0), (0.5, 2), (0.2, 0)]
    assert rl.member_groups(pending, 2) == [[(0.0, 0), (0.0, 1), (1.0, 0)], [(0.5, 2), (0.2, 0)]]
    assert rl.member_groups(pending, 10) == [pending]
    with pytest.raises(ValueError):
        rl.member_groups(pending, 0)


class _CheapMeasurer:
    """Stands in for rl.Measurer where the test is about the protocol, not the measures (those compile for ~30 s):
    every measure is a different deterministic function of the trained parameters."""

    def __init__(self, model, cfg):
        pass

    def measure(self, params, xs, ys, key):
        import jax

        leaves = [np.asarray(a, np.float64) for a in jax.tree.leaves(params)]
        sq, ab = float(sum(np.sum(a ** 2) for a in leaves)), float(sum(np.sum(np.abs(a)) for a in leaves))
        return {"minimum_sharpness": sq, "normalized_sharpness": ab, "hessian_trace": sq * ab, "top_eigenvalue": -sq,
                "minimum_sharpness_nobias": sq, "exact_trace": sq * ab}


def _tiny_reference_study(tmp_path, monkeypatch, name, cheap=True):
    """The reference protocol end to end on a small MLP (784-16-10 standing in for ms_mlp), 40 images, 6 steps of
    batch 16 (epochs of 16 + 16 + 8 images), two ratios x two trials in one program."""
    from lcnn_jax.nn import make_model

    monkeypatch.setattr(rl, "make_model", lambda name_, k: make_model("mlp", k, widths=(16,)))
    if cheap:
        monkeypatch.setattr(rl, "Measurer", _CheapMeasurer)
        for fig in ("scatter", "loss_curves"):
            monkeypatch.setattr(rl, fig, lambda runs, models, path: open(path, "wb").write(b"png"))
    out = tmp_path / name
    argv = ["--protocol", "reference", "--models", "ms_mlp", "--ratios", "0,1", "--trials", "2", "--steps", "6",
            "--eval_every", "4", "--n_train", "40", "--n_measure", "20", "--batch_size", "16",
            "--hutchinson_probes", "2", "--lanczos_iters", "3", "--ratios_per_program", "2", "--out", str(out),
            "--save_params", str(out / "params")]
    rl.main(argv)
    return out


def _check_reference_study(tmp_path, monkeypatch, cheap):
    monkeypatch.setattr(rl, "_PROGRAMS", {})  # programs compiled for this test only (not another test's measurer)
    a = _tiny_reference_study(tmp_path, monkeypatch, "a", cheap)
    for f in ("kendall_tau.md", "kendall_tau.json", "scatter.png", "loss_curves.png"):
        assert os.path.getsize(a / f) > 0, f
    names = sorted(os.listdir(a / "runs"))
    assert names == [f"ms_mlp_r{r}_t{t}.json" for r in ("0.0", "1.0") for t in (0, 1)]
    assert sorted(os.listdir(a / "params")) == [n.replace(".json", ".npz") for n in names]
    rec = json.load(open(a / "runs" / "ms_mlp_r1.0_t0.json"))
    assert rec["protocol"]["protocol"] == "reference" and rec["steps"] == 6 and rec["group_size"] == 4
    assert rec["protocol"]["lr"] == 0.1 and rec["protocol"]["weight_decay"] == 1e-5
    assert rec["curve"]["step"] == [0, 4, 6]  # step 0, every eval_every steps, and the last step
    assert rec["train_loss"] == pytest.approx(rec["curve"]["train_loss"][-1], rel=1e-12)
    assert rec["curve"]["train_loss"][-1] < rec["curve"]["train_loss"][0]  # it trained
    saved = np.load(a / "params" / "ms_mlp_r1.0_t0.npz")
    assert set(saved.files) == {f"{l}/{k}" for l in ("dense0", "head") for k in ("kernel", "bias")}
    md = open(a / "kendall_tau.md").read()
    assert "reference protocol" in md and "fixed budget of 6 steps" in md
    # a second run with the same seeds reproduces every number (wall times aside)
    b = _tiny_reference_study(tmp_path, monkeypatch, "b", cheap)
    timing = ("train_seconds_group", "measure_seconds_total", "measure_seconds")
    for n in names:
        ra, rb = (json.load(open(d / "runs" / n)) for d in (a, b))
        for k in timing:
            ra.pop(k, None), rb.pop(k, None)
        assert ra == rb, n
        np.testing.assert_array_equal(np.load(a / "params" / n.replace(".json", ".npz"))["head/kernel"],
                                      np.load(b / "params" / n.replace(".json", ".npz"))["head/kernel"])
    # different trials differ (different init and batch order), and so do ratios (different labels)
    recs = {n: json.load(open(a / "runs" / n)) for n in names}
    assert len({r["train_loss"] for r in recs.values()}) == 4
    # and a rerun over a finished directory trains nothing
    before = {n: os.stat(a / "runs" / n).st_mtime_ns for n in names}
    monkeypatch.setattr(rl, "run_members", lambda *args, **kw: (_ for _ in ()).throw(AssertionError("retrained")))
    _tiny_reference_study(tmp_path, monkeypatch, "a", cheap)
    assert {n: os.stat(a / "runs" / n).st_mtime_ns for n in names} == before


def test_reference_protocol_tiny_budget_writes_the_documented_files_and_is_deterministic(tmp_path, monkeypatch):
    _check_reference_study(tmp_path, monkeypatch, cheap=True)


@pytest.mark.slow
def test_reference_protocol_tiny_budget_end_to_end_with_the_real_measures_and_figures(tmp_path, monkeypatch):
    _check_reference_study(tmp_path, monkeypatch, cheap=False)


def test_pickled_floats_reads_a_flat_dict_without_unpickling():
    import pickle

    blob = pickle.dumps({"0.0": 2.5, "0.1": 43.25, "1.0": 1e-3}, protocol=4)
    assert rlr._pickled_floats(blob) == {"0.0": 2.5, "0.1": 43.25, "1.0": 1e-3}


def test_reference_archive_table_on_a_synthetic_archive(tmp_path):
    """Two trials x three ratios per network in the reference's layout; MS increases with the gap, the loss with r."""
    import pickle

    base = tmp_path / "repo" / "02-sharpness-comparison" / "ARCHIVEs"
    gaps = {"0.0": 0.01, "0.5": 0.4, "1.0": 0.9}
    for mdir in ("MLP", "LeNet"):
        for t in (0, 1):
            ms = {}
            for r, gap in gaps.items():
                d = base / "train" / mdir / str(t) / r
                d.mkdir(parents=True)
                loss = 1e-3 * (1 + float(r)) * (1 + 0.1 * t)
                if mdir == "MLP" and t == 1 and r == "0.5":
                    loss = 2.3011  # a run that never trained: reported apart
                (d / "log.txt").write_text(
                    "x epoch:0/3\nx \ttrain loss: 2.0 accuracy: 0.3\nx \ttest  loss: 1.0 accuracy: 0.8\n"
                    f"x epoch:2/3\nx \ttrain loss: {loss:.7f} accuracy: 1.0000000\n"
                    f"x \ttest  loss: 1.0 accuracy: {1.0 - gap - 0.01 * t:.7f}\n")
                ms[r] = 10.0 * gap + t
            p = base / "proposal" / "last-epoch" / mdir / str(t)
            p.mkdir(parents=True)
            (p / "sharpness.pkl").write_bytes(pickle.dumps(ms))
    res = rl.reference_archive_table(str(tmp_path / "repo"), str(tmp_path / "out"))
    assert res["ms_mlp"]["runs"] == 5 and res["ms_mlp"]["never_trained"] == 1
    assert res["lenet"]["runs"] == 6 and res["lenet"]["never_trained"] == 0
    # oracle: pair counting on the six LeNet runs
    rows = [(10.0 * g + t, 1e-3 * (1 + float(r)) * (1 + 0.1 * t), g + 0.01 * t) for t in (0, 1) for r, g in gaps.items()]
    ms_, loss_, gap_ = (np.array(c) for c in zip(*rows))
    assert res["lenet"]["tau_ms_gap"] == pytest.approx(pair_count_tau(ms_, gap_))
    assert res["lenet"]["tau_loss_gap"] == pytest.approx(rlr.kendall_tau(loss_, gap_)["tau"])
    assert os.path.isfile(tmp_path / "out" / "reference_archive.md")


def test_weighted_trainer_padding_has_no_effect():
    """A batch of 5 real examples padded to 8 (weight 0) takes the same step as the 5 alone (unweighted trainer)."""
    import jax
    import jax.numpy as jnp
    import optax

    from lcnn_jax.nn import make_model

    model = make_model("mlp", 10, widths=(8,))
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.uniform(size=(12, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, (1, 12)), jnp.int32)
    state = rlt.init_members(model, optax.sgd(0.5, momentum=0.9), [0], images[:1])
    real = np.array([3, 7, 1, 10, 4])
    idx_pad = np.concatenate([real, [0, 0, 0]])[None, None]  # (S=1, T=1, B=8)
    w_pad = np.concatenate([np.ones(5), np.zeros(3)])[None, None].astype(np.float32)
    got = rl.make_weighted_chunk_trainer(model)(state, images, labels, jnp.asarray(idx_pad),
                                                 jnp.asarray(w_pad)).params
    want = rl.make_chunk_trainer(model)(state, jnp.asarray([False]), images, labels,
                                        jnp.asarray(real[None, None])).params
    host = rl.make_weighted_chunk_trainer(model, host_steps=True)(state, images, labels, jnp.asarray(idx_pad),
                                                                   jnp.asarray(w_pad)).params
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(got)):  # steps from the host: the same step
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b, p0 in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        assert not np.allclose(np.asarray(a), np.asarray(p0))


def test_reference_sgd_ms_first_steps_by_hand_and_its_limit_is_the_newton_minimum():
    from lcnn_jax.measures import minimum_sharpness_from_traces

    tw, tb = np.array([5.0, 1.5, 0.2]), np.array([0.3, 0.05, 0.01])
    total = tw.sum() + tb.sum()

    def objective(e):  # the reference's objective on traces divided by their sum, written as a product loop
        w, b = tw / total, tb / total
        val, prod = 0.0, 1.0
        for l in range(2):
            a = np.exp(e[l])
            val += w[l] / a ** 2
            prod *= a
            val += b[l] / prod ** 2
        return val + w[2] * prod ** 2 + b[2]

    # one call evaluates before stepping: steps=1 is the objective at scales 1, i.e. the plain sum of the traces
    assert rlr.reference_sgd_ms(tw, tb, steps=1) == pytest.approx(total, rel=1e-14)
    # steps=2: the objective after one gradient step, gradient by central differences
    h = 1e-6
    grad = np.array([(objective(np.eye(2)[j] * h) - objective(-np.eye(2)[j] * h)) / (2 * h) for j in range(2)])
    assert rlr.reference_sgd_ms(tw, tb, lr=0.3, steps=2) == pytest.approx(total * objective(-0.3 * grad), rel=1e-8)
    # above the minimum after the reference's 10,000 small steps, at it when the steps are large enough
    layers = ("a", "b", "c")
    tr = {l: {"kernel": tw[i], "bias": tb[i]} for i, l in enumerate(layers)}
    newton = minimum_sharpness_from_traces(tr, layers=layers, include_bias=True).value
    truncated = rlr.reference_sgd_ms(tw, tb)
    assert truncated > newton * (1 + 1e-3)
    assert rlr.reference_sgd_ms(tw, tb, lr=0.2, steps=20_000, decay=0.0) == pytest.approx(newton, rel=1e-6)
