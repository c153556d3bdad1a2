"""Small-data study: gradient regularizers (SPEC 1.2) and the derivative penalty (SPEC 1.4) on 2000 MNIST images.

    python experiments/smalldata_study.py --mnist_test_dir /work/shared/data/mnist \
        [--epochs 15] [--seeds 0,1,2,3,4] [--units mlp/baseline,mlp/datagrad,...] [--out experiments/results/smalldata]
        [--workdir runs/smalldata] [--pgd_n 500] [--jac_n 200]

Units (``UNITS``), each a ``<model>/<regularizer>`` pair of ``experiments/configs/smalldata_mnist5k.py``:

* table 1, the regularizer study: ``mlp/{baseline, datagrad, spectreg, jacreg, confidence_penalty, derivative_a,
  derivative_b, derivative_b_softmax}``; each gridded regularizer trains its ``seeds x grid`` members as ONE vmapped
  program (:func:`lcnn_jax.train.fit_sweep`). ``derivative_a``/``derivative_b`` are the two readings of SPEC 1.4
  (secant vs tangent; the logits' secant driven to the target's derivative, 0), ``_softmax`` reading B on the
  softmax outputs.
* table 2, both readings against the baseline on a smooth MLP (``mlp_softplus``), a small CNN (``lenet``) and a
  high-capacity CNN (``small_cnn``, 3.3M parameters). On XLA:CPU a vmapped convolution (batched kernels) ran ~4x
  slower per member than one member alone (``experiments/bench_regularizers.py``), so conv units train one seed per
  ``fit_sweep`` program (``SEQUENTIAL_MODELS``); on an accelerator pass ``--vectorize_all``.
* ``claims.md``: every claim of the paper's abstract (lower input-Jacobian norm at training and at test points,
  higher accuracy, more PGD robustness) per model and reading, marked supported / not supported / contradicted
  (:data:`CLAIMS`).

Per-model defaults (:data:`MODEL_DEFAULTS`): 15 epochs, seeds 0-4, PGD on 500 images; the small CNN 5 epochs,
seeds 0-2, 200 PGD images (CPU time). ``--epochs``/``--seeds``/``--pgd_n`` override them for every unit.

Protocol. Data: 2000 stratified mnist5k training images (``data.train_size``); ``VAL_SIZE = 1000`` of the other 2000
training-pool images are the validation split (:func:`pool_splits`). For every member the script measures the
validation accuracy, and per regularizer the grid point with the highest mean validation accuracy over seeds is
selected (:func:`select_by_validation`): the test sets are never looked at for the choice. The selected point's
seeds are then evaluated in full (model in eval mode):

=====================  ==================================================================================
column                 meaning
=====================  ==================================================================================
``val_acc``            accuracy on the 1000 validation images (what selected the coefficient)
``test_acc``           accuracy on the 1000 mnist5k test images
``official_acc``       accuracy on the ``--mnist_test_dir`` test set (the official 10000 MNIST test images)
``jac_train``          mean exact ``||J(x)||_F`` (logits w.r.t. the [0, 1] input) over the first ``--jac_n``
                       training images (points it was trained on)
``jac_test``           the same over the first ``--jac_n`` mnist5k test images
``jac_official``       the same over the first ``--jac_n`` official test images
``pgd_linf``           accuracy under PGD-Linf (eps 0.1, step 0.025, 10 steps, random start) on the first
                       ``--pgd_n`` mnist5k test images; ``official_pgd_linf`` on the official test set
``pgd_l2``             accuracy under PGD-L2 (eps 1.0, step 0.25, 10 steps, random start), same images
``deriv_*``            the derivative penalty of SPEC 1.4 (our reconstruction, weight 1) at the first ``--jac_n``
                       training / mnist5k test / official test images, eval mode, the same directions for every
                       model: how far the derivative is from its definition at the data's resolution
=====================  ==================================================================================

every one as mean and sample std (ddof=1) over seeds. The grid table (``grid.md``) lists the validation and
mnist5k test accuracy of every grid point, so the choice can be checked.

Files in ``--out``: ``units/<model>__<regularizer>.json`` per unit (per-member validation/test accuracy, per-seed
evaluation of the selected point, aggregates, timings). A unit whose file exists with the same settings is skipped,
so the study is resumable per regularizer; training also resumes from the sweep checkpoints in ``--workdir``.
``table1.{json,csv,md}``, ``table2.{json,csv,md}``, ``claims.{json,md}`` and ``grid.md`` are rewritten from the
unit files after every unit. The skeleton (skip a finished unit, aggregate, write the tables) is
``experiments/table_runner.py``, shared with ``lcnn_table.py`` and ``clip_table.py``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Mapping, Sequence

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable like under pytest
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from experiments import table_runner
from lcnn_jax import attacks, data as data_lib, io
from lcnn_jax.train import sweep
from lcnn_jax import train as training
from lcnn_jax.batching import map_chunks
from lcnn_jax.configs import load_config, load_config_module
from lcnn_jax.measures.jacobian import jacobian_frobenius
from lcnn_jax.regularizers.derivative import derivative_penalty

CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "smalldata_mnist5k.py")
CFG = load_config_module(CONFIG_PATH)
TABLE1 = tuple(f"mlp/{r}" for r in CFG.REGULARIZERS)
TABLE2 = tuple(f"{m}/{r}" for m in ("mlp_softplus", "lenet", "small_cnn")
               for r in ("baseline", "derivative_a", "derivative_b"))
UNITS = TABLE1 + TABLE2
SEQUENTIAL_MODELS = ("lenet", "small_cnn")
#: Per-model defaults of ``--epochs``/``--seeds``/``--pgd_n`` (the shipped tables were made with them): the 3.3M-
#: parameter CNN is ~20 min per seed and reading on 2 CPU cores, so it gets 3 seeds, 5 epochs and 200 PGD images.
MODEL_DEFAULTS = {"small_cnn": {"epochs": 5, "seeds": (0, 1, 2), "pgd_n": 200}}
DEFAULTS = {"epochs": 15, "seeds": (0, 1, 2, 3, 4), "pgd_n": 500}
#: The claims of SPEC 1.4 tested per model and reading: (name, columns, direction), "lower" or "higher" than the
#: baseline; a claim is "supported" when every column moves in its direction by more than twice the standard
#: error of the difference of the seed means, "contradicted" when one moves the other way by as much.
CLAIMS = (("lower Jacobian norm at training points", ("jac_train",), "lower"),
          ("lower Jacobian norm at test points", ("jac_test", "jac_official"), "lower"),
          ("higher accuracy", ("test_acc", "official_acc"), "higher"),
          ("more PGD robustness", ("pgd_linf", "pgd_l2", "official_pgd_linf", "official_pgd_l2"), "higher"))
PGD_LINF = dict(norm="linf", eps=0.1, step_size=0.025, num_steps=10)
PGD_L2 = dict(norm="l2", eps=1.0, step_size=0.25, num_steps=10)
METRICS = ("val_acc", "test_acc", "official_acc", "jac_train", "jac_test", "jac_official", "pgd_linf", "pgd_l2",
           "official_pgd_linf", "official_pgd_l2", "deriv_train", "deriv_test", "deriv_official")
EVAL_VERSION = 2  # bumped when evaluation columns change: finished units are re-evaluated (training resumes at its end)
EVAL_CHUNK = 250
RESOLUTION = data_lib.dataset_info("mnist5k").resolution


# ------------------------------------------------------------------------------------------------ data
def pool_splits(train_size: int = CFG.TRAIN_SIZE, val_size: int = CFG.VAL_SIZE, subset_seed: int = CFG.SUBSET_SEED):
    """``(train, val)``: the training subset exactly as ``prepare_run`` draws it (``data.subset`` of the mnist5k
    training pool with ``subset_seed``) and a stratified validation split of ``val_size`` images from the rest of
    the pool, disjoint from it. Index bookkeeping: ``data.subset`` is applied to a split whose "images" are the
    row indices, so the complement is exact."""
    pool = data_lib.load_split("mnist5k", "train")
    idx = data_lib.Split(np.arange(len(pool.labels)), pool.labels)
    chosen = data_lib.subset(idx, int(train_size), seed=int(subset_seed)).images
    rest = np.setdiff1d(np.arange(len(pool.labels)), chosen)
    val_idx = data_lib.subset(data_lib.Split(rest, pool.labels[rest]), int(val_size), seed=int(subset_seed) + 1).images
    take = lambda i: data_lib.Split(pool.images[i], pool.labels[i])  # noqa: E731
    return take(chosen), take(val_idx)


def load_eval_data(mnist_test_dir: str | None) -> dict:
    """``{"train", "val", "test"[, "official"]}`` splits (``official`` only with ``mnist_test_dir``)."""
    train, val = pool_splits()
    out = {"train": train, "val": val, "test": data_lib.load_split("mnist5k", "test")}
    if mnist_test_dir:
        out["official"] = data_lib.load_split("mnist", "test", data_dir=mnist_test_dir)
    return out


# ------------------------------------------------------------------------------------------------ selection / stats
mean_std = io.mean_std


def grid_stats(members: Sequence[dict]) -> list[dict]:
    """Per grid point (in first-seen order): mean/std over seeds of ``val_acc`` and ``test_acc`` of its members
    (diverged members left out)."""
    groups: dict[str, list[dict]] = {}
    for m in members:
        groups.setdefault(json.dumps(m["grid"], sort_keys=True), []).append(m)
    out = []
    for key, ms in groups.items():
        ok = [m for m in ms if not m.get("diverged")]
        out.append({"grid": json.loads(key), "seeds": [m["seed"] for m in ok], "num_diverged": len(ms) - len(ok),
                    **table_runner.aggregate(ok, ("val_acc", "test_acc"))})
    return out


def select_by_validation(stats: Sequence[dict]) -> dict:
    """The grid point with the highest mean VALIDATION accuracy (first one on ties). Test accuracy is not read."""
    usable = [s for s in stats if s.get("val_acc_mean") is not None]
    if not usable:
        raise ValueError("no grid point has a validation accuracy (every member diverged?); nothing to select.")
    return max(usable, key=lambda s: s["val_acc_mean"])  # max keeps the first of equal keys


def aggregate(per_seed: Sequence[dict], metrics: Sequence[str] = METRICS) -> dict:
    """``{<metric>_mean, <metric>_std}`` over seeds for every metric (None where no seed has it)."""
    return table_runner.aggregate(per_seed, metrics)


# ------------------------------------------------------------------------------------------------ evaluation
@functools.lru_cache(maxsize=None)
def _eval_fns(model):
    """Jitted ``(variables, x, y, key) -> (B,) bool`` (clean, PGD-Linf, PGD-L2) and ``(variables, x) -> (B,)``
    Jacobian norms; variables are arguments, so every member of one model shares one compilation."""
    def logits(variables):
        return lambda xs: model.apply(variables, xs, train=False)

    def clean(variables, x, y, key):
        del key
        return jnp.argmax(logits(variables)(x), -1) == y

    def attacked(cfg):
        def fn(variables, x, y, key):
            f = logits(variables)
            return jnp.argmax(f(attacks.pgd(f, x, y, key=key, **cfg)), -1) == y
        return jax.jit(fn)

    def jac(variables, x):
        f = lambda xi: model.apply(variables, xi[None], train=False)[0]  # noqa: E731
        return jacobian_frobenius(f, x)

    def deriv(variables, x, key):
        apply_fn = lambda v, xs: model.apply(v, xs, train=False)  # noqa: E731
        return derivative_penalty(variables, {"image": x}, key, apply_fn, RESOLUTION)

    return {"clean": jax.jit(clean), "pgd_linf": attacked(PGD_LINF), "pgd_l2": attacked(PGD_L2), "jac": jax.jit(jac),
            "deriv": jax.jit(deriv)}


def accuracy_of(fn, variables, split, *, key, limit: int | None = None, chunk: int = EVAL_CHUNK) -> float:
    hits = map_chunks(lambda x, y, k: fn(variables, x, y, k), split.images[:limit], split.labels[:limit],
                      key=key, chunk_size=chunk)
    return float(np.mean(hits))


def mean_jacobian_norm(fn, variables, split, *, limit: int) -> float:
    norms = np.asarray(fn(variables, jnp.asarray(split.images[:limit])), np.float64)
    return float(norms.mean())


def clean_accuracy(model, variables, split) -> float:
    return accuracy_of(_eval_fns(model)["clean"], variables, split, key=jax.random.PRNGKey(0), chunk=1000)


def evaluate_member(model, variables, data: Mapping, *, key, pgd_n: int, jac_n: int) -> dict:
    """Every per-seed column (see the module docstring) for one trained member."""
    fns = _eval_fns(model)
    k = jax.random.split(key, 4)
    dkey = jax.random.PRNGKey(77)  # the same directions for every model, so the column compares models
    out = {"val_acc": clean_accuracy(model, variables, data["val"]),
           "test_acc": clean_accuracy(model, variables, data["test"]),
           "jac_train": mean_jacobian_norm(fns["jac"], variables, data["train"], limit=jac_n),
           "jac_test": mean_jacobian_norm(fns["jac"], variables, data["test"], limit=jac_n),
           "pgd_linf": accuracy_of(fns["pgd_linf"], variables, data["test"], key=k[0], limit=pgd_n),
           "pgd_l2": accuracy_of(fns["pgd_l2"], variables, data["test"], key=k[1], limit=pgd_n),
           "deriv_train": float(fns["deriv"](variables, jnp.asarray(data["train"].images[:jac_n]), dkey)),
           "deriv_test": float(fns["deriv"](variables, jnp.asarray(data["test"].images[:jac_n]), dkey))}
    if "official" in data:
        out["official_acc"] = clean_accuracy(model, variables, data["official"])
        out["jac_official"] = mean_jacobian_norm(fns["jac"], variables, data["official"], limit=jac_n)
        out["official_pgd_linf"] = accuracy_of(fns["pgd_linf"], variables, data["official"], key=k[2], limit=pgd_n)
        out["official_pgd_l2"] = accuracy_of(fns["pgd_l2"], variables, data["official"], key=k[3], limit=pgd_n)
        out["deriv_official"] = float(fns["deriv"](variables, jnp.asarray(data["official"].images[:jac_n]), dkey))
    return out


# ------------------------------------------------------------------------------------------------ training
def unit_config(unit: str, *, epochs: int, seed: int = 0):
    model, reg = unit.split("/")
    config = load_config(f"{CONFIG_PATH}:{reg}+{model}")
    config.train.num_epochs = int(epochs)
    config.seed = int(seed)
    return config


def unit_grid(unit: str) -> dict | None:
    reg = unit.split("/")[1]
    return {f"{reg}.coeff": CFG.GRIDS[reg]} if reg in CFG.GRIDS else None


def _groups(seeds: Sequence[int], workdir: str, vectorize: bool) -> list:
    return [(tuple(seeds), workdir)] if vectorize else [((s,), os.path.join(workdir, f"seed{s}")) for s in seeds]


def load_trained_unit(workdir: str, *, seeds: Sequence[int], vectorize: bool):
    """``(model, [(member record, TrainState)])`` from the finished sweep(s) of a unit in ``workdir``."""
    out, model = [], None
    for _, wd in _groups(seeds, workdir, vectorize):
        with open(os.path.join(wd, "sweep_results.json")) as fh:
            summary = json.load(fh)
        _, model, stacked, members = sweep.load_sweep(wd)
        for m, rec in zip(members, summary["members"]):
            out.append(({"seed": m.seed, "grid": dict(m.values), "diverged": bool(rec["diverged"]),
                         "train_acc": rec["train_accuracy"], "sweep_test_acc": rec["test_accuracy"]},
                        training.member_state(stacked, m.index)))
    return model, out


def train_unit(unit: str, *, epochs: int, seeds: Sequence[int], workdir: str, vectorize: bool):
    """Train a unit; returns ``(model, [(member record, TrainState)], programs)``. ``vectorize``: one fit_sweep
    over ``seeds x grid``; else one fit_sweep (over the grid only) per seed."""
    config = unit_config(unit, epochs=epochs, seed=seeds[0])
    groups = _groups(seeds, workdir, vectorize)
    for group_seeds, wd in groups:
        sweep.fit_sweep(config, wd, seeds=group_seeds, grid=unit_grid(unit))
    model, out = load_trained_unit(workdir, seeds=seeds, vectorize=vectorize)
    return model, out, len(groups)


def unit_path(out_dir: str, unit: str) -> str:
    return os.path.join(out_dir, "units", unit.replace("/", "__") + ".json")


def unit_settings(unit: str, *, epochs: int, seeds: Sequence[int], data: Mapping, pgd_n: int, jac_n: int) -> dict:
    grid = unit_grid(unit)
    return {"epochs": int(epochs), "seeds": [int(s) for s in seeds], "grid": {k: list(v) for k, v in (grid or {}).items()},
            "official_test": "official" in data, "pgd_n": int(pgd_n), "jac_n": int(jac_n),
            "pgd_linf": PGD_LINF, "pgd_l2": PGD_L2, "train_size": CFG.TRAIN_SIZE, "val_size": CFG.VAL_SIZE,
            "eval_version": EVAL_VERSION}


def _add_columns(older: dict, model, trained, data: Mapping, *, jac_n: int) -> dict:
    """Eval-version 1 -> 2: the ``deriv_*`` columns for the already selected seeds; everything else is kept (the
    selection, made on validation accuracy, does not change)."""
    t0 = time.time()
    states = {(rec["seed"], json.dumps(rec["grid"], sort_keys=True)): st for rec, st in trained}
    fn = _eval_fns(model)["deriv"]
    dkey = jax.random.PRNGKey(77)  # as in evaluate_member
    per_seed = []
    for rec in older["per_seed"]:
        st = states[(rec["seed"], json.dumps(rec["grid"], sort_keys=True))]
        variables = {"params": st.params, **st.model_state}
        extra = {f"deriv_{name}": float(fn(variables, jnp.asarray(data[split].images[:jac_n]), dkey))
                 for name, split in (("train", "train"), ("test", "test"), ("official", "official")) if split in data}
        per_seed.append({**rec, **extra})
    result = {**older, "per_seed": per_seed, "aggregate": aggregate(per_seed),
              "eval_wall_s": older["eval_wall_s"] + time.time() - t0}
    print(f"[smalldata] {older['unit']}: columns added ({time.time() - t0:.0f} s)", flush=True)
    return result


def run_unit(unit: str, *, epochs: int, seeds: Sequence[int], out_dir: str, workdir: str, data: Mapping,
             pgd_n: int, jac_n: int, vectorize_all: bool = False, force: bool = False, train_fn=None) -> dict:
    """Train, select on validation and evaluate one unit, or return its saved result (same settings).
    ``train_fn`` (tests) replaces :func:`train_unit`."""
    path = unit_path(out_dir, unit)
    settings = unit_settings(unit, epochs=epochs, seeds=seeds, data=data, pgd_n=pgd_n, jac_n=jac_n)
    model_name = unit.split("/")[0]
    vectorize = vectorize_all or model_name not in SEQUENTIAL_MODELS
    wd = os.path.join(workdir, f"e{epochs}", unit.replace("/", "__"))

    def compute():
        older = None if force or train_fn else io.load_if_matches(path, settings, ignore=("eval_version",))
        if older is not None and older.get("vectorized") == vectorize:  # trained already: only the evaluation changed
            print(f"[smalldata] {unit}: trained already, adding the new columns (eval_version {EVAL_VERSION})",
                  flush=True)
            model, trained = load_trained_unit(wd, seeds=seeds, vectorize=vectorize)
            return _add_columns(older, model, trained, data, jac_n=jac_n)
        t0 = time.time()
        model, trained, programs = (train_fn or train_unit)(unit, epochs=epochs, seeds=seeds, workdir=wd,
                                                            vectorize=vectorize)
        train_s = time.time() - t0
        t0 = time.time()
        members = []
        for rec, st in trained:
            variables = {"params": st.params, **st.model_state}
            members.append({**rec, "val_acc": clean_accuracy(model, variables, data["val"]),
                            "test_acc": clean_accuracy(model, variables, data["test"])})
        stats = grid_stats(members)
        chosen = select_by_validation(stats)
        per_seed = []
        for (rec, st), m in zip(trained, members):
            if m["grid"] != chosen["grid"] or m.get("diverged"):
                continue
            variables = {"params": st.params, **st.model_state}
            res = evaluate_member(model, variables, data, key=jax.random.PRNGKey(1000 + int(m["seed"])),
                                  pgd_n=pgd_n, jac_n=jac_n)
            per_seed.append({"seed": m["seed"], "grid": m["grid"], **res})
        a = aggregate(per_seed)
        eval_s = time.time() - t0
        print(f"[smalldata] {unit}: selected {chosen['grid']} val {a['val_acc_mean']:.4f} test "
              f"{a['test_acc_mean']:.4f} (train {train_s:.0f} s, eval {eval_s:.0f} s)", flush=True)
        return {"unit": unit, "model": model_name, "regularizer": unit.split("/")[1], "members": members,
                "grid_stats": stats, "selected": chosen["grid"], "per_seed": per_seed, "aggregate": a,
                "trained_with": "fit_sweep", "programs": programs, "vectorized": vectorize, "train_wall_s": train_s,
                "eval_wall_s": eval_s, "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}

    return table_runner.cached_row(path, settings, compute, force=force, tag="smalldata", name=unit)


# ------------------------------------------------------------------------------------------------ tables
COLUMNS = ("val_acc", "test_acc", "official_acc", "jac_train", "jac_test", "jac_official", "pgd_linf",
           "official_pgd_linf", "pgd_l2", "official_pgd_l2", "deriv_train", "deriv_test", "deriv_official")


def _fmt(mean, std, pct: bool) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if pct else f"{mean:.3g} ± {std:.2g}"


def table_rows(results: Sequence[dict]) -> list[dict]:
    rows = []
    for r in results:
        sel = ", ".join(f"{k.split('.')[0]} {v:g}" for k, v in r["selected"].items()) or "-"
        rows.append({"model": r["model"], "regularizer": r["regularizer"], "selected": sel,
                     "num_seeds": len(r["per_seed"]), "epochs": r["settings"]["epochs"], **r["aggregate"]})
    return rows


def write_table(results: Sequence[dict], out_dir: str, name: str, title: str) -> None:
    if not results:
        return
    rows = table_rows(results)
    fields = ["model", "regularizer", "selected", "num_seeds", "epochs"] + [
        f"{c}_{s}" for c in COLUMNS for s in ("mean", "std")]
    pct = {c: not c.startswith(("jac", "deriv")) for c in COLUMNS}
    head = ["model", "regularizer", "selected (on val)", "seeds", "epochs"] + list(COLUMNS)
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["regularizer"], r["selected"], str(r["num_seeds"]), str(r["epochs"])] + [
            _fmt(r.get(f"{c}_mean"), r.get(f"{c}_std"), pct[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    s0 = results[0]["settings"]
    by_model = {r["model"]: r["settings"]["pgd_n"] for r in results}
    pgd_n = (str(s0["pgd_n"]) if len(set(by_model.values())) == 1
             else "/".join(f"{n} ({m})" for m, n in by_model.items()))
    lines += ["", f"Accuracies in %, mean ± std (ddof=1) over seeds; jac_* = mean exact ||J(x)||_F of the logits "
              f"w.r.t. the [0, 1] input over the first {s0['jac_n']} images; deriv_* = the derivative penalty of SPEC 1.4 "
              f"(our reconstruction: secant vs tangent slope at 1/255, in [0, 2], 0 = derivative agrees with its "
              f"definition) over the same images, eval mode, one fixed direction per image. PGD on the first {pgd_n} images: "
              f"Linf eps {PGD_LINF['eps']} step {PGD_LINF['step_size']} x {PGD_LINF['num_steps']}, L2 eps "
              f"{PGD_L2['eps']} step {PGD_L2['step_size']} x {PGD_L2['num_steps']}, random start. "
              f"{s0['train_size']} training images; coefficient chosen on "
              f"{s0['val_size']} held-out validation images; test_* = 1000 mnist5k test images, official_* = "
              f"official MNIST test set (10000). Hardware: {results[0]['devices']}."]
    table_runner.write_table(out_dir, name, obj={"rows": rows, "pgd_linf": PGD_LINF, "pgd_l2": PGD_L2},
                             columns=fields, rows=rows, markdown="\n".join(lines) + "\n")


def write_grid(results: Sequence[dict], out_dir: str) -> None:
    lines = ["# Every grid point: validation and mnist5k test accuracy (%)", "",
             "| unit | grid | seeds | val_acc | test_acc | selected |", "|---|---|---|---|---|---|"]
    for r in results:
        for g in r["grid_stats"]:
            grid = ", ".join(f"{k} {v:g}" for k, v in g["grid"].items()) or "-"
            lines.append(f"| {r['unit']} | {grid} | {len(g['seeds'])} | "
                         f"{_fmt(g['val_acc_mean'], g['val_acc_std'], True)} | "
                         f"{_fmt(g['test_acc_mean'], g['test_acc_std'], True)} | "
                         f"{'yes' if g['grid'] == r['selected'] else ''} |")
    io.write_text_atomic(os.path.join(out_dir, "grid.md"), "\n".join(lines) + "\n")


def write_all(out_dir: str) -> None:
    """Rebuild every table from the unit files present (finished units only)."""
    results = {}
    for unit in UNITS:
        p = unit_path(out_dir, unit)
        if os.path.exists(p):
            with open(p) as fh:
                results[unit] = json.load(fh)
    t1 = [results[u] for u in TABLE1 if u in results]
    t2 = [results[u] for u in TABLE2 if u in results]
    write_table(t1, out_dir, "table1", "Gradient regularizers on 2000 MNIST images (MLP 784-256-256-10)")
    write_table(t2, out_dir, "table2", "Derivative penalty (readings A and B) vs baseline: a softplus MLP, LeNet-5 "
                "and the 3.3M-parameter small CNN")
    write_grid(t1 + t2, out_dir)
    write_claims(results, out_dir)


def claim_verdict(base: Sequence[dict], reg: Sequence[dict], columns: Sequence[str], direction: str) -> dict:
    """Compare per-seed values of ``reg`` with the baseline's on ``columns`` (see :data:`CLAIMS`)."""
    sign = -1.0 if direction == "lower" else 1.0
    moves, verdicts = [], []
    for c in columns:
        a = [r[c] for r in base if r.get(c) is not None]
        b = [r[c] for r in reg if r.get(c) is not None]
        if not a or not b:
            continue
        diff, se, move = table_runner.mean_difference(a, b)
        moves.append({"column": c, "baseline": float(np.mean(a)), "regularized": float(np.mean(b)), "diff": diff,
                      "se": se})
        claimed, opposite = ("up", "down") if sign > 0 else ("down", "up")
        verdicts.append("for" if move == claimed else ("against" if move == opposite else "none"))
    if not verdicts:
        verdict = "not measured"
    elif all(v == "for" for v in verdicts):
        verdict = "supported"
    elif any(v == "against" for v in verdicts):
        verdict = "contradicted"
    else:
        verdict = "not supported"
    return {"verdict": verdict, "moves": moves}


def write_claims(results: Mapping[str, dict], out_dir: str) -> None:
    """``claims.md``/``claims.json``: each SPEC 1.4 claim per model and reading, supported or not (see CLAIMS)."""
    rows = []
    for model in ("mlp", "mlp_softplus", "lenet", "small_cnn"):
        base = results.get(f"{model}/baseline")
        if base is None:
            continue
        for reg in ("derivative_a", "derivative_b", "derivative_b_softmax"):
            r = results.get(f"{model}/{reg}")
            if r is None:
                continue
            for name, columns, direction in CLAIMS:
                v = claim_verdict(base["per_seed"], r["per_seed"], columns, direction)
                rows.append({"model": model, "regularizer": reg, "claim": name, "seeds": len(r["per_seed"]), **v})
    if not rows:
        return
    io.write_json_atomic(os.path.join(out_dir, "claims.json"), {"rows": rows, "claims": CLAIMS})
    pct = lambda c: not c.startswith(("jac", "deriv"))  # noqa: E731
    lines = ["# SPEC 1.4: each claim of the abstract, per model and reading, against the unregularized baseline", "",
             "| model | reading | claim | baseline -> regularized (per column) | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        cells = "; ".join(
            f"{m['column']} {100 * m['baseline'] if pct(m['column']) else m['baseline']:.3g} -> "
            f"{100 * m['regularized'] if pct(m['column']) else m['regularized']:.3g} "
            f"(±{2 * (100 if pct(m['column']) else 1) * m['se']:.2g})" for m in r["moves"])
        lines.append(f"| {r['model']} | {r['regularizer']} | {r['claim']} | {cells} | **{r['verdict']}** |")
    lines += ["", "Accuracies in %; ± = twice the standard error of the difference of the seed means. A claim is "
              "*supported* when every listed column moves in the claimed direction by more than that, "
              "*contradicted* when one moves the other way by as much, *not supported* otherwise. Readings: "
              "derivative_a = secant vs tangent (SPEC 1.4 A), derivative_b = the logits' secant at 1/255 driven to 0 "
              "(B), derivative_b_softmax = B on the softmax outputs. Seeds and sizes as in table1.md / table2.md."]
    io.write_text_atomic(os.path.join(out_dir, "claims.md"), "\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=None, help="default: 15 (small_cnn: 5)")
    p.add_argument("--seeds", default=None, help="default: 0,1,2,3,4 (small_cnn: 0,1,2)")
    p.add_argument("--units", default=",".join(UNITS))
    p.add_argument("--mnist_test_dir", default=None)
    p.add_argument("--out", default="experiments/results/smalldata")
    p.add_argument("--workdir", default="runs/smalldata")
    p.add_argument("--pgd_n", type=int, default=None, help="default: 500 (small_cnn: 200)")
    p.add_argument("--jac_n", type=int, default=200)
    p.add_argument("--vectorize_all", action="store_true")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    units = [u for u in args.units.split(",") if u]
    bad = sorted(set(units) - set(UNITS))
    if bad:
        p.error(f"unknown unit(s) {bad}; choose among {list(UNITS)}")
    data = load_eval_data(args.mnist_test_dir)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    for unit in units:
        d = {**DEFAULTS, **MODEL_DEFAULTS.get(unit.split("/")[0], {})}
        epochs = d["epochs"] if args.epochs is None else args.epochs
        seeds = list(d["seeds"]) if args.seeds is None else [int(s) for s in args.seeds.split(",")]
        pgd_n = d["pgd_n"] if args.pgd_n is None else args.pgd_n
        run_unit(unit, epochs=epochs, seeds=seeds, out_dir=args.out, workdir=args.workdir, data=data,
                 pgd_n=pgd_n, jac_n=args.jac_n, vectorize_all=args.vectorize_all, force=args.force)
        write_all(args.out)
    print(f"[smalldata] done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
