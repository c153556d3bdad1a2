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
    got = rl.kendall_tau(x, y)
    assert got["n"] == 17
    assert got["tau"] == pytest.approx(pair_count_tau(x, y), abs=1e-12)
    assert 0 < got["pvalue"] < 1


def test_kendall_tau_closed_forms_for_monotone_maps_and_nan_dropping():
    x = np.linspace(0.1, 3.0, 9)
    assert rl.kendall_tau(x, np.exp(3 * x))["tau"] == pytest.approx(1.0)  # any increasing map: tau = 1
    assert rl.kendall_tau(x, -x ** 3)["tau"] == pytest.approx(-1.0)  # decreasing: -1
    # one swapped adjacent pair out of C(9, 2) = 36 pairs: tau = (35 - 1) / 36
    y = x.copy()
    y[[3, 4]] = y[[4, 3]]
    assert rl.kendall_tau(x, y)["tau"] == pytest.approx(34 / 36)
    # a non-finite measure is left out with its pair partner, not propagated
    y_nan = np.exp(x)
    y_nan[2] = np.nan
    res = rl.kendall_tau(x, y_nan)
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
    idx = rl.batch_indices(n=50, batch_size=10, seeds=[3, 4], start=0, steps=10)  # two epochs of 5 batches
    assert idx.shape == (10, 2, 10)
    for member in range(2):
        for epoch in range(2):
            seen = idx[5 * epoch:5 * (epoch + 1), member].ravel()
            np.testing.assert_array_equal(np.sort(seen), np.arange(50))
    assert not np.array_equal(idx[:, 0], idx[:, 1])
    # resuming at a later step reproduces the same batches
    np.testing.assert_array_equal(rl.batch_indices(50, 10, [3, 4], start=7, steps=3), idx[7:10])


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


# ------------------------------------------------------------------------------------------------ training program
def test_chunk_trainer_freezes_finished_members_and_unroll_matches_vmap():
    import jax
    import jax.numpy as jnp
    import optax

    from lcnn_jax.nn import make_model

    model = make_model("mlp", 10, widths=(16,))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(24, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, (2, 24)), jnp.int32)
    inits = [model.init(jax.random.PRNGKey(s), images[:1])["params"] for s in (0, 1)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *inits)
    tx = optax.sgd(0.1, momentum=0.9)
    opt = jax.vmap(tx.init)(params)
    idx = jnp.asarray(rl.batch_indices(24, 8, [0, 1], start=0, steps=4))
    done = jnp.asarray([True, False])
    out = {}
    for unroll in (False, True):
        out[unroll] = rl.make_chunk_trainer(model, tx, unroll)(params, opt, done, images, labels, idx)[0]
    for a, b, p0 in zip(jax.tree.leaves(out[False]), jax.tree.leaves(out[True]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(p0[0]))  # finished member untouched
        assert not np.array_equal(np.asarray(a[1]), np.asarray(p0[1]))  # the other one trained
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # the per-member loss went down on its own labels (4 SGD steps on 24 examples)
    ce = lambda p, y: float(optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        model.apply({"params": p}, images), y).mean())
    member = lambda tree: jax.tree.map(lambda a: a[1], tree)  # noqa: E731
    assert ce(member(out[False]), labels[1]) < ce(member(params), labels[1])
