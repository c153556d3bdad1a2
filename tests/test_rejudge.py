"""experiments/rejudge_robustness.py: the significance rule, the attack columns and the row cache.

Oracles: the rule's difference and standard error written out with the statistics module; a linear classifier's
exact L2 distance to its decision boundary (no attack can break a point farther than eps; APGD breaks every point
much closer), so the AutoAttack and worst-case columns are bounded in closed form.
"""
import json
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import rejudge_robustness as rj


def test_verdict_is_the_two_standard_error_rule():
    base, reg = [0.10, 0.20, 0.30], [0.50, 0.62, 0.70]
    diff = statistics.mean(reg) - statistics.mean(base)
    se = (statistics.variance(base) / 3 + statistics.variance(reg) / 3) ** 0.5
    v = rj.verdict(base, reg)
    assert v["diff"] == pytest.approx(diff, rel=1e-12) and v["se"] == pytest.approx(se, rel=1e-12)
    assert v["verdict"] == "supported" and diff > 2 * se
    assert rj.verdict(reg, base)["verdict"] == "contradicted"
    assert rj.verdict([0.1, 0.3, 0.5], [0.2, 0.4, 0.5])["verdict"] == "not supported"  # 0.067 < 2 se = 0.27


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def _linear_case(n=48, seed=0):
    model = _Linear()
    xs = jax.random.uniform(jax.random.PRNGKey(seed), (n, 4, 4, 1))
    variables = model.init(jax.random.PRNGKey(seed + 1), xs)
    logits = model.apply(variables, xs)
    ys = np.array(jnp.argmax(logits, -1), np.int32)
    ys[: n // 8] = (ys[: n // 8] + 1) % 4  # a few misclassified points
    w = np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
    b = np.asarray(variables["params"]["Dense_0"]["bias"], np.float64)
    flat = np.asarray(xs, np.float64).reshape(n, -1)
    z = flat @ w + b
    dist = np.full(n, np.inf)
    for i in range(n):
        for j in range(4):
            if j != ys[i]:
                dw = w[:, ys[i]] - w[:, j]
                dist[i] = min(dist[i], (z[i, ys[i]] - z[i, j]) / np.linalg.norm(dw))
    return model, variables, np.asarray(xs), ys, dist  # dist < 0: misclassified


@pytest.mark.slow  # the whole AutoAttack cascade compiled for one tiny model (~15-20 s): CI runs it with -m slow
def test_attack_columns_on_a_linear_classifier_obey_the_exact_boundary_distances():
    model, variables, xs, ys, dist = _linear_case()
    eps = float(np.quantile(dist[dist > 0], 0.5))
    radius = rj.Radius("l2_x", "l2", eps, dict(norm="l2", step_size=eps / 4, num_steps=10))
    r = rj.evaluate_seed(model, variables, xs, ys, radius, key=jax.random.PRNGKey(3),
                         aa_kwargs=dict(num_steps=20, num_queries=50, n_target_classes=3))
    n = len(ys)
    assert r["clean"] == pytest.approx(np.mean(dist > 0))
    # no attack can break a point farther than eps from the boundary (the box [0, 1] only makes it harder)
    for col in ("pgd", "apgd_ce", "apgd", "aa", "worst"):
        assert r[col] >= np.mean(dist > eps * (1 + 1e-4)) - 1e-9, col
    # APGD-CE breaks every point well inside the ball whose boundary point is inside the box (a linear model)
    assert r["aa"] <= np.mean(dist > 0.8 * eps) + 3 / n
    # the cascade only removes points; the worst case is at most every column it combines
    assert r["clean"] >= r["apgd_ce"] >= r["apgd"] >= r["aa"] >= r["worst"]
    assert r["worst"] <= r["pgd"] + 1e-12
    assert sum(r["broken_by"].values()) == round(n * (r["clean"] - r["aa"]))


def test_run_row_checks_the_network_caches_and_judges(tmp_path):
    model, variables, xs, ys, dist = _linear_case()
    acc = float(np.mean(dist > 0))
    calls = []

    def networks(row, workdir):
        calls.append(row)
        # both rows: the same network; "reg" claims a different saved accuracy for seed 1 (not the same network)
        return model, [(0, variables, acc), (1, variables, acc + (0.1 if row == "reg" else 0.0))], ""

    eps = float(np.quantile(dist[dist > 0], 0.5))
    study = rj.Study("toy", str(tmp_path), ("base", "reg"),
                     [rj.Radius("l2_x", "l2", eps, dict(norm="l2", step_size=eps / 4, num_steps=5))], len(ys),
                     [("reg more robust than base", "base", "reg")], networks)
    kw = dict(xs_all=xs, ys_all=ys, workdir=str(tmp_path), aa_kwargs=dict(num_steps=10, num_queries=20,
                                                                           n_target_classes=3))
    rows = {r: rj.run_row(study, r, **kw) for r in ("base", "reg")}
    assert [s["same_network"] for s in rows["base"]["per_seed"]] == [True, True]
    assert [s["same_network"] for s in rows["reg"]["per_seed"]] == [True, False]
    again = rj.run_row(study, "base", **kw)
    assert calls == ["base", "reg"] and again["per_seed"] == rows["base"]["per_seed"]  # read back, not recomputed
    verdicts = rj.judge(study, rows)
    assert [v["claim"] for v in verdicts] == ["reg more robust than base"]
    assert all(verdicts[0][c]["verdict"] == "not supported" for c in ("pgd", "aa", "worst"))  # same networks
    # a radius one row was not attacked at gets no verdict and no table line for that row
    study.radii = list(study.radii) + [rj.Radius("l2_y", "l2", 2 * eps, {})]
    rows["base"]["per_seed"] = [{**s, "l2_y": s["l2_x"]} for s in rows["base"]["per_seed"]]
    assert [v["radius"] for v in rj.judge(study, rows)] == ["l2_x"]
    assert rj.markdown(study, rows, [], "cmd", 1.0).count("| reg | 48 | 2 |") == 1
    text = rj.markdown(study, rows, verdicts, "cmd", 1.0)
    assert "| reg | 48 | 2 |" in text and "NO: official accuracy off by up to 10.00 points |" in text


def test_cli_rejects_bad_rows_and_counts_before_any_work(capsys):
    with pytest.raises(SystemExit) as e:
        rj.main(["clip", "--mnist_test_dir", "/nonexistent", "--rows", "clip90,nope"])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        rj.main(["lcnn", "--mnist_test_dir", "/nonexistent", "--num_examples", "0"])
    assert e.value.code == 2 and "--num_examples" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        rj.main(["lcnn", "--mnist_test_dir", "/nonexistent", "--radii", "l2_2,l2_7"])
    assert e.value.code == 2 and "l2_7" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        rj.main(["lcnn", "--mnist_test_dir", "/nonexistent"])
    assert e.value.code == 2 and "/nonexistent" in capsys.readouterr().err


def test_an_interrupted_row_resumes_from_its_finished_seeds(tmp_path, monkeypatch):
    """Each (seed, radius) is saved when done; a rerun attacks only what is missing, and a network that changed
    (another official accuracy) is attacked again. The parts go once the row is written."""
    # the shapes and settings of test_run_row_checks_the_network_caches_and_judges: its compiled programs serve
    model, variables, xs, ys, dist = _linear_case()
    eps = float(np.quantile(dist[dist > 0], 0.5))
    study = rj.Study("toy", str(tmp_path), ("base",),
                     [rj.Radius("l2_x", "l2", eps, dict(norm="l2", step_size=eps / 4, num_steps=5))], len(ys), [],
                     lambda row, wd: (model, [(0, variables, None), (1, variables, None)], ""))
    kw = dict(xs_all=xs, ys_all=ys, workdir=str(tmp_path), aa_kwargs=dict(num_steps=10, num_queries=20,
                                                                           n_target_classes=3))
    real, seen = rj.evaluate_seed, []

    def dies_on_the_second(*a, **k):
        seen.append(k["key"])
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rj, "evaluate_seed", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        rj.run_row(study, "base", **kw)
    parts = tmp_path / "autoattack_rows" / "parts" / "base"
    assert sorted(p.name for p in parts.iterdir()) == ["seed0__l2_x.json"]
    seen.clear()
    monkeypatch.setattr(rj, "evaluate_seed", lambda *a, **k: seen.append(k["key"]) or real(*a, **k))
    # a part made on another network (its official accuracy differs) is not reused
    other = parts / "seed1__l2_x.json"
    saved = json.loads((parts / "seed0__l2_x.json").read_text())
    other.write_text(json.dumps({**saved, "settings": {**saved["settings"], "seed": 1, "official_acc": 0.5}}))
    row = rj.run_row(study, "base", **kw)
    assert len(seen) == 1 and [s["seed"] for s in row["per_seed"]] == [0, 1]  # only seed 1 was attacked
    assert "settings" not in row["per_seed"][0]["l2_x"] and row["per_seed"][0]["l2_x"]["clean"] == saved["clean"]
    assert not parts.exists()
