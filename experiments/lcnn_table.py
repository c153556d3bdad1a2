"""The LCNN paper's table (SPEC 1.1) with the small CNN on the offline mnist5k data, 3 seeds per row.

    python experiments/lcnn_table.py [--epochs 15] [--seeds 0,1,2] [--mnist_test_dir /path/to/mnist-idx]
                                     [--rows standard,lcnn,...] [--measure_limit 1000] [--pgd_limit N] [--pgd_steps 20]
                                     [--bench experiments/results/lcnn/bench.json]
                                     [--out experiments/results/lcnn] [--workdir runs/lcnn_table]

Rows (``experiments/configs/lcnn_mnist5k.py``): ``standard`` (softplus beta 1000 ~ ReLU, batch norm), ``lcnn``
(centred softplus, true-operator-norm spectral convs, Lipschitz BN, beta/gamma penalty), ``gradreg`` (standard +
gradient-norm penalty), ``lcnn_gradreg`` and ``softplus10``. Every row trains the small CNN (avg pooling) on the
4000 mnist5k training images (batch 64, SGD momentum 0.9, lr 0.05, lr x0.1 at 75 % / 87.5 %); ``--epochs``
overrides the config's 15 for every row alike. The seeds of one row train as ONE vmapped program
(:func:`lcnn_jax.train.fit_sweep`, through :func:`lcnn_jax.train.train_seeds`, which falls back to one
``fit`` per seed and records it should the sweep fail).

Evaluation of every seed, model in eval mode, on two test sets: ``test`` = the mnist5k test split (1000 images) and,
with ``--mnist_test_dir``, ``official`` = the official MNIST test set (10,000 images). Clean accuracy uses the whole
set; the per-example measures use its first ``--measure_limit`` images (default 1000; the sets are stored
shuffled), PGD its first ``--pgd_limit`` (default: the same); ``--measure_splits official`` restricts the measures
and PGD to the named sets (the others get clean accuracy only). Measures (the defaults of :func:`lcnn_jax.report.measure_defaults`):

=========================  =========================================================================================
column                     meaning
=========================  =========================================================================================
``acc``                    clean accuracy (whole set)
``curv_mean``/``curv_std`` mean / std over examples of the curvature ``|lam| / (||g|| + 1e-6)``: ``g = grad_x CE``
                           at the true label, ``lam`` the Rayleigh quotient after 10 power iterations on the input
                           Hessian from a random start (:func:`lcnn_jax.measures.input_curvature`)
``hess_mean``              mean over examples of ``|lam|`` (input-Hessian spectral-norm estimate)
``grad_mean``              mean over examples of ``||g||``
``stab_mean``              mean cosine similarity of ``g(x)`` and ``g(x + n)``, ``n ~ N(0, 0.01^2 I)``
                           (:func:`lcnn_jax.measures.gradient_stability`)
``pgd1``/``pgd2``          accuracy under PGD-L2, eps 1.0 / 2.0, ``--pgd_steps`` steps (default 20) of size
                           2.5 eps / steps, random start, inputs kept in [0, 1]
=========================  =========================================================================================

plus, per seed of the LCNN rows, ``curvature_bound``: the data-independent bound :func:`lcnn_jax.measures.curvature_bound` (max over
logits of the bound on the logit's input-Hessian spectral norm; a bound on logits, not on the CE ratio above), and
``step_ms``: the training step time of the row's vmapped 3-seed program, median of the per-step wall-time increments
between the training log's records (``log_every`` steps apart; the first record, which includes compilation, is left
out). ``step_ratio`` = the row's ``step_ms`` / the ``standard`` row's. Rows run one after another on a shared machine,
so this ratio carries the load of its moment; ``--bench`` adds the controlled round-robin ratio of
``experiments/bench_lcnn.py`` (same batch, same process) as ``bench_ratio``.

``table.md`` has one table per test set with the columns ``row | acc % | curvature mean | curvature std (examples) |
Hessian norm | grad norm | grad stability | PGD-L2 ε=1 % | PGD-L2 ε=2 % | curvature bound | step ms | step × standard
| bench step × standard`` (mean ± std over seeds; ``step × standard`` = ``step_ratio``, ``bench step × standard`` =
``bench_ratio``), followed by the targets of the issue for that set.

Every per-seed value is aggregated over seeds as mean and sample std (ddof=1): ``<split>_<item>_mean`` /
``<split>_<item>_std`` in the CSV. Files in ``--out``: ``rows/<row>.json`` (per-seed values, aggregate, timings; a
row whose file exists with the same settings is skipped, so the script is resumable; training also resumes from
the sweep checkpoints in ``--workdir``), ``table.json``, ``table.csv``, ``table.md`` (with the targets of the issue:
LCNN mean curvature >= 5x lower than standard, accuracy within 1 point, step <= 1.5x) and ``curvature_accuracy.png``.
The skeleton (skip a finished row, train and evaluate the seeds, aggregate, write the table) is
``experiments/table_runner.py``, shared with ``clip_table.py`` and ``smalldata_study.py``.
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
import optax

from experiments import table_runner
from lcnn_jax import attacks, data as data_lib, io
from lcnn_jax import io as lio
from lcnn_jax.train import sweep
from lcnn_jax.batching import map_chunks
from lcnn_jax.configs import load_config
from lcnn_jax.measures import curvature_bound, gradient_stability, input_curvature
from lcnn_jax.report import measure_defaults


CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "lcnn_mnist5k.py")
ROWS = ("standard", "lcnn", "gradreg", "lcnn_gradreg", "softplus10")
LCNN_ROWS = ("lcnn", "lcnn_gradreg")
SPLITS = ("test", "official")
ITEMS = ("acc", "curv_mean", "curv_std", "hess_mean", "hess_std", "grad_mean", "grad_std", "stab_mean", "pgd1",
         "pgd2")
PER_SEED = tuple(f"{s}_{i}" for s in SPLITS for i in ITEMS) + ("curvature_bound", "step_ms")
METRICS = PER_SEED + ("step_ratio",)
CSV_COLUMNS = ("row", "num_seeds", "epochs", "bench_ratio") + tuple(f"{m}_{s}" for m in METRICS
                                                                      for s in ("mean", "std"))
#: Markdown columns of each split's table: (header, item, kind); kinds: pct, num, fixed4, ratio.
MD_COLUMNS = (("acc %", "acc", "pct"), ("curvature mean", "curv_mean", "num"),
              ("curvature std (examples)", "curv_std", "num"), ("Hessian norm", "hess_mean", "num"),
              ("grad norm", "grad_mean", "num"), ("grad stability", "stab_mean", "fixed4"),
              ("PGD-L2 ε=1 %", "pgd1", "pct"), ("PGD-L2 ε=2 %", "pgd2", "pct"))
MD_TAIL = ("curvature bound", "step ms", "step × standard", "bench step × standard")
TARGETS = {"curvature_factor": 5.0, "acc_points": 1.0, "step_ratio": 1.5}

_DEFAULTS = measure_defaults()
CURVATURE_ITERS = int(_DEFAULTS.curvature_iters)
STABILITY_NOISE = float(_DEFAULTS.stability_noise)
PGD_EPS = tuple(float(e) for e in _DEFAULTS.pgd_l2_eps)
PGD_STEPS = int(_DEFAULTS.pgd_steps)
PGD_STEP_FACTOR = float(_DEFAULTS.pgd_step_factor)
EVAL_CHUNK = 250


# ------------------------------------------------------------------------------------------------ evaluation
def chunked(fn, variables, xs: np.ndarray, ys: np.ndarray, *, key, chunk: int = EVAL_CHUNK) -> dict:
    """Concatenate ``fn(variables, x, y, key) -> {name: (B,)}`` over padded chunks
    (:func:`lcnn_jax.batching.map_chunks`: chunk ``c`` uses ``fold_in(key, c)``, one compilation)."""
    return map_chunks(lambda x, y, k: fn(variables, x, y, k), xs, ys, key=key, chunk_size=chunk)


@functools.lru_cache(maxsize=None)
def eval_fns(model, pgd_steps: int) -> dict:
    """Jitted ``(variables, xs, ys, key) -> {name: (B,)}`` for the clean check, the per-example measures and PGD
    (the variables are an argument: every seed of a row shares one compilation)."""
    def logits(variables, xs):
        return model.apply(variables, xs, train=False)

    def loss_fn(variables):
        return lambda x, y: optax.softmax_cross_entropy_with_integer_labels(logits(variables, x[None])[0], y)

    def clean(variables, xs, ys, key):
        del key
        return {"correct": jnp.argmax(logits(variables, xs), -1) == ys}

    def measures(variables, xs, ys, key):
        k1, k2 = jax.random.split(key)
        curv = input_curvature(loss_fn(variables), xs, ys, key=k1, num_iters=CURVATURE_ITERS)
        stab = gradient_stability(loss_fn(variables), xs, ys, key=k2, noise_std=STABILITY_NOISE)
        return {"curvature": curv["curvature"], "hessian_norm": curv["hessian_norm"],
                "grad_norm": curv["grad_norm"], "stability": stab}

    def pgd(variables, xs, ys, key):
        f = functools.partial(logits, variables)
        out = {}
        for i, eps in enumerate(PGD_EPS):
            x_adv = attacks.pgd(f, xs, ys, norm="l2", eps=eps, step_size=PGD_STEP_FACTOR * eps / pgd_steps,
                                num_steps=pgd_steps, key=jax.random.fold_in(key, i), unroll=True)
            out[f"pgd{i + 1}"] = jnp.argmax(f(x_adv), -1) == ys
        return out

    return {"clean": jax.jit(clean), "measures": jax.jit(measures), "pgd": jax.jit(pgd)}


def summarize_split(clean: Mapping, measured: Mapping, pgd: Mapping) -> dict:
    """Per-seed items of one split from the per-example arrays: accuracies and means / stds over examples
    (population std, ddof=0, as :mod:`lcnn_jax.report`)."""
    m = {k: np.asarray(v, np.float64) for k, v in measured.items()}
    out = {"acc": float(np.mean(clean["correct"])),
           "curv_mean": float(m["curvature"].mean()), "curv_std": float(m["curvature"].std()),
           "hess_mean": float(m["hessian_norm"].mean()), "hess_std": float(m["hessian_norm"].std()),
           "grad_mean": float(m["grad_norm"].mean()), "grad_std": float(m["grad_norm"].std()),
           "stab_mean": float(m["stability"].mean())}
    for k in ("pgd1", "pgd2"):
        out[k] = float(np.mean(pgd[k]))
    return out


def evaluate_member(model, variables, splits: Mapping[str, tuple], *, key, measure_limit: int,
                    pgd_limit: int | None = None, pgd_steps: int = PGD_STEPS, measure_splits: Sequence[str] | None = None,
                    bound: bool = True, image_shape=(28, 28, 1)) -> dict:
    """Every per-seed column for one trained member. ``splits``: ``{"test": (xs, ys), "official": ...}``; clean
    accuracy on all of each set, the measures on its first ``measure_limit`` images, PGD on its first ``pgd_limit``
    (None: ``measure_limit``); the sets not in ``measure_splits`` (None: all) get clean accuracy only. ``bound``:
    also the data-independent curvature bound (max over logits)."""
    fns = eval_fns(model, int(pgd_steps))
    out = {}
    for i, (name, (xs, ys)) in enumerate(splits.items()):
        k = jax.random.fold_in(key, i)
        clean = chunked(fns["clean"], variables, xs, ys, key=k, chunk=1000)
        if measure_splits is not None and name not in measure_splits:
            out[f"{name}_acc"] = float(np.mean(clean["correct"]))
            continue
        sub = (xs[:measure_limit], ys[:measure_limit])
        measured = chunked(fns["measures"], variables, *sub, key=jax.random.fold_in(k, 1))
        n_pgd = measure_limit if pgd_limit is None else pgd_limit
        pgd = chunked(fns["pgd"], variables, xs[:n_pgd], ys[:n_pgd], key=jax.random.fold_in(k, 2))
        out.update({f"{name}_{item}": v for item, v in summarize_split(clean, measured, pgd).items()})
    if not bound:
        out["curvature_bound"] = None
        return out
    try:
        res = curvature_bound(model, variables, image_shape, key=jax.random.fold_in(key, 99))
        out["curvature_bound"] = float(jnp.max(res.curvature))
    except Exception as e:  # noqa: BLE001 -- a model the walker does not know: recorded, not fatal
        out["curvature_bound"] = None
        out["curvature_bound_error"] = f"{type(e).__name__}: {e}"
    return out


# ------------------------------------------------------------------------------------------------ timing
def step_time_from_log(records: Sequence[dict]) -> dict:
    """Median seconds per step from a training log: the increments of ``wall_time_s`` between consecutive
    training records divided by their step gaps; the first record (which includes compilation) is left out."""
    recs = sorted((r for r in records if r.get("kind", "train") == "train" and "wall_time_s" in r),
                  key=lambda r: r["step"])
    per_step = [(b["wall_time_s"] - a["wall_time_s"]) / (b["step"] - a["step"])
                for a, b in zip(recs, recs[1:]) if b["step"] > a["step"]]
    if not per_step:
        return {"step_s": None, "intervals": 0}
    return {"step_s": float(np.median(per_step)), "intervals": len(per_step),
            "q25_s": float(np.percentile(per_step, 25)), "q75_s": float(np.percentile(per_step, 75))}


# ------------------------------------------------------------------------------------------------ aggregation
mean_std = io.mean_std


def aggregate_row(row: str, per_seed: Sequence[dict], epochs: int) -> dict:
    """One CSV record: identity columns plus ``<metric>_mean`` / ``<metric>_std`` over seeds."""
    return {"row": row, "num_seeds": len(per_seed), "epochs": int(epochs), "bench_ratio": None,
            **table_runner.aggregate(per_seed, PER_SEED), "step_ratio_mean": None, "step_ratio_std": None}


def attach_ratios(aggregates: Sequence[dict], bench: Mapping | None = None) -> list[dict]:
    """Copies of the aggregates with ``step_ratio_mean`` = row ``step_ms_mean`` / standard ``step_ms_mean``
    (None without a standard row) and ``bench_ratio`` from the bench's ``{"ratios": {row: r}}``."""
    std_row = next((a for a in aggregates if a["row"] == "standard"), None)
    ref = None if std_row is None else std_row["step_ms_mean"]
    out = []
    for a in aggregates:
        a = dict(a)
        # a vmapped program of K seeds costs about K single steps: compare only programs of as many seeds
        ok = (ref is not None and a["step_ms_mean"] is not None and ref > 0
              and a["num_seeds"] == std_row["num_seeds"])
        a["step_ratio_mean"] = a["step_ms_mean"] / ref if ok else None
        a["step_ratio_std"] = None
        a["bench_ratio"] = (bench or {}).get("ratios", {}).get(a["row"])
        out.append(a)
    return out


def targets(aggregates: Sequence[dict], split: str) -> dict:
    """The issue's targets for the ``lcnn`` row against ``standard`` on ``split``: curvature reduction factor,
    accuracy difference in points, step ratio (training log and bench); each with ``met``."""
    rows = {a["row"]: a for a in aggregates}
    if "standard" not in rows or "lcnn" not in rows or rows["lcnn"].get(f"{split}_acc_mean") is None:
        return {}
    s, l = rows["standard"], rows["lcnn"]
    out = {}
    if l.get(f"{split}_curv_mean_mean") is not None and s.get(f"{split}_curv_mean_mean") is not None:
        factor = s[f"{split}_curv_mean_mean"] / l[f"{split}_curv_mean_mean"]
        out["curvature_factor"] = {"value": factor, "target": f">= {TARGETS['curvature_factor']:g}",
                                   "met": factor >= TARGETS["curvature_factor"]}
    diff = 100 * (l[f"{split}_acc_mean"] - s[f"{split}_acc_mean"])
    out["acc_points"] = {"value": diff, "target": f">= -{TARGETS['acc_points']:g}",
                         "met": diff >= -TARGETS["acc_points"]}
    for name, key in (("step_ratio_log", "step_ratio_mean"), ("step_ratio_bench", "bench_ratio")):
        if l.get(key) is not None:
            out[name] = {"value": l[key], "target": f"<= {TARGETS['step_ratio']:g}",
                         "met": l[key] <= TARGETS["step_ratio"]}
    return out


# ------------------------------------------------------------------------------------------------ rows
def row_config(row: str, *, epochs: int, seed: int = 0):
    """The config of one row (``lcnn_mnist5k.py:<row>``) with ``epochs`` epochs."""
    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; choose from {ROWS}.")
    config = load_config(f"{CONFIG_PATH}:{row}")
    config.train.num_epochs = int(epochs)
    config.train.progress = False
    config.seed = int(seed)
    return config


def row_settings(*, epochs: int, seeds: Sequence[int], splits: Mapping[str, tuple], measure_limit: int,
                 pgd_steps: int, pgd_limit: int | None = None, measure_splits: Sequence[str] | None = None) -> dict:
    return {"epochs": int(epochs), "seeds": [int(s) for s in seeds], "measure_limit": int(measure_limit),
            "pgd_steps": int(pgd_steps), "pgd_limit": int(measure_limit if pgd_limit is None else pgd_limit),
            "measure_splits": sorted(splits) if measure_splits is None else sorted(measure_splits), "sizes": {k: len(v[0]) for k, v in splits.items()}}


def run_row(row: str, *, epochs: int, seeds: Sequence[int], out_dir: str, workdir: str, splits: Mapping,
            measure_limit: int, pgd_steps: int = PGD_STEPS, pgd_limit: int | None = None,
            measure_splits: Sequence[str] | None = None, force: bool = False, trainer=sweep.train_seeds,
            evaluator=evaluate_member) -> dict:
    """Train and evaluate one row, or return ``out_dir/rows/<row>.json`` when it exists with the same settings.
    ``trainer(config, workdir, seeds) -> (model, states, trained_with, note, wall_s)`` and ``evaluator`` are
    parameters so tests can substitute cheap ones."""
    path = os.path.join(out_dir, "rows", f"{row}.json")
    settings = row_settings(epochs=epochs, seeds=seeds, splits=splits, measure_limit=measure_limit,
                            pgd_steps=pgd_steps, pgd_limit=pgd_limit, measure_splits=measure_splits)

    def evaluate(model, state, seed):
        return evaluator(model, {"params": state.params, **state.model_state}, splits,
                         key=jax.random.PRNGKey(1000 + seed), measure_limit=measure_limit,
                         pgd_limit=settings["pgd_limit"], pgd_steps=pgd_steps,
                         measure_splits=settings["measure_splits"], bound=row in LCNN_ROWS)

    def compute():
        wd = os.path.join(workdir, f"e{epochs}", row)
        res = table_runner.train_and_evaluate(trainer, row_config(row, epochs=epochs, seed=seeds[0]), wd, seeds,
                                              evaluate)
        try:
            timing = step_time_from_log(lio.read_metrics_log(wd))
        except FileNotFoundError:
            timing = {"step_s": None, "intervals": 0}
        for rec in res["per_seed"]:
            rec["step_ms"] = None if timing["step_s"] is None else 1000 * timing["step_s"]
        a = aggregate_row(row, res["per_seed"], epochs)
        print(f"[lcnn_table] {row}: test acc {a['test_acc_mean']:.4f} official acc {a['official_acc_mean']} "
              f"official curv {a['official_curv_mean_mean']} step {a['step_ms_mean']} ms ({res['trained_with']}, "
              f"train {res['train_wall_s']:.0f} s, eval {res['eval_wall_s']:.0f} s)", flush=True)
        return {**res, "row": row, "aggregate": a, "timing": timing}

    return table_runner.cached_row(path, settings, compute, force=force, tag="lcnn_table", name=row)


# ------------------------------------------------------------------------------------------------ output
def _cell(a: Mapping, metric: str, kind: str) -> str:
    mean, std = a.get(f"{metric}_mean"), a.get(f"{metric}_std")
    if mean is None:
        return "-"
    if kind == "pct":
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    if kind == "ratio":
        return f"{mean:.2f}"
    if kind == "fixed4":
        return f"{mean:.4f} ± {std:.4f}"
    return f"{mean:.3g} ± {std:.2g}"


def split_table(aggregates: Sequence[dict], split: str, num_seeds: int | None = None) -> list[str]:
    """Markdown lines of one split's table: ``row``, :data:`MD_COLUMNS`, then :data:`MD_TAIL`; a row with other
    than ``num_seeds`` seeds says how many it has."""
    cols = ["row"] + [h for h, _, _ in MD_COLUMNS] + list(MD_TAIL)  # documented in the module docstring
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for a in aggregates:
        name = a["row"]
        if num_seeds is not None and a["num_seeds"] != num_seeds:
            name += f" ({a['num_seeds']} seed{'s' if a['num_seeds'] != 1 else ''})"
        cells = [name] + [_cell(a, f"{split}_{item}", kind) for _, item, kind in MD_COLUMNS]
        cells += [_cell(a, "curvature_bound", "num"), "-" if a.get("step_ms_mean") is None else f"{a['step_ms_mean']:.0f}",
                  _cell(a, "step_ratio", "ratio"), "-" if a.get("bench_ratio") is None else f"{a['bench_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_table(aggregates: Sequence[dict], meta: dict) -> str:
    names = {"test": "mnist5k test split (1000 images)",
             "official": "official MNIST test set (10,000 images; measures on a subset, see above)"}
    lim = meta["measure_limit"]
    head = [
        "### LCNN table (SPEC 1.1) on mnist5k, small CNN",
        "",
        f"Small CNN (conv32-conv64-fc1024, average pooling) trained on the **4000 mnist5k training images**, "
        f"**{meta['epochs']} epochs**" + ("" if meta["epochs"] == 15 else
                                          " for every row (the config's 15 were not run: CPU budget)")
        + f", batch 64, seeds {meta['seeds']} (one vmapped program per row); mean ± std over seeds. "
        f"Clean accuracy on the whole set; curvature, Hessian norm, gradient norm and gradient stability on "
        f"the first {lim} images of {', '.join(meta.get('measure_splits', meta['splits']))}, PGD on the first "
        f"{meta.get('pgd_limit', lim)} (other sets: accuracy only). Curvature = |λ| / (‖∇ₓCE‖ + 1e-6), λ the Rayleigh quotient of the "
        f"input Hessian after {CURVATURE_ITERS} power iterations; its 'std (examples)' is the std over examples "
        f"(averaged over seeds). Gradient stability: cosine of ∇ₓCE at x and x + N(0, {STABILITY_NOISE:g}²). "
        f"PGD-L2: {meta['pgd_steps']} steps of 2.5 ε / {meta['pgd_steps']}, random start, inputs in [0, 1]. "
        f"Curvature bound: data-independent bound on max_k ‖∇²ₓ logit_k‖ (lcnn_jax.measures.curvature_bound; a "
        f"bound on logits, not on the CE ratio). Step: median ms per step of the row's 3-seed vmapped training "
        f"(from its log; rows ran one after another on a shared 2-core CPU), × standard = ratio to the standard "
        f"row; bench = experiments/bench_lcnn.py (one seed, round-robin in one process)."
        f" Command: `{meta['command']}`; {meta['device']}; wall time of the rows (training + evaluation, summed over "
        f"resumed invocations) {sum(meta.get('rows_wall_s', {}).values()) / 60:.1f} min.",
        "",
    ]
    lines = list(head)
    for split in meta["splits"]:
        lines += [f"**{names.get(split, split)}**", ""] + split_table(aggregates, split, len(meta["seeds"])) + [""]
        t = targets(aggregates, split)
        if t:
            lines.append(f"Targets ({split}; lcnn vs standard): " + "; ".join(
                f"{k} = {v['value']:.3g} (target {v['target']}: {'met' if v['met'] else 'NOT met'})"
                for k, v in t.items()))
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[dict], split: str, path: str) -> None:
    """Mean curvature (log scale) against clean accuracy, one marker per seed, one colour per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in results:
        xs = [100 * s[f"{split}_acc"] for s in r["per_seed"] if s.get(f"{split}_acc") is not None]
        ys = [s[f"{split}_curv_mean"] for s in r["per_seed"] if s.get(f"{split}_acc") is not None]
        if xs:
            ax.scatter(xs, ys, label=r["row"], s=40)
    ax.set_yscale("log")
    ax.set_xlabel(f"clean accuracy % ({split})")
    ax.set_ylabel("mean curvature |λ| / ‖g‖ (log)")
    ax.set_title("mnist5k small CNN: curvature vs accuracy (one point per seed)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    io.save_figure_atomic(fig, path, dpi=120)


def write_outputs(results: Sequence[dict], meta: dict, out_dir: str, bench: Mapping | None = None) -> dict:
    """``table.json`` (meta, aggregates, targets, details), ``table.csv`` (:data:`CSV_COLUMNS`), ``table.md`` and
    ``curvature_accuracy.png``; every file written through a temporary file."""
    aggs = attach_ratios([r["aggregate"] for r in results], bench)
    paths = table_runner.write_table(
        out_dir, "table", obj={"meta": meta, "columns": list(CSV_COLUMNS), "rows": aggs,
                               "targets": {s: targets(aggs, s) for s in meta["splits"]}, "bench": bench,
                               "details": results},
        columns=CSV_COLUMNS, rows=aggs, markdown=markdown_table(aggs, meta))
    if meta.get("plot", True):
        paths["png"] = os.path.join(out_dir, "curvature_accuracy.png")
        plot(results, meta["splits"][-1], paths["png"])
    return paths


def load_splits(mnist_test_dir: str | None) -> dict:
    test = data_lib.load_split("mnist5k", "test")
    splits = {"test": (test.images, test.labels)}
    if mnist_test_dir:
        official = data_lib.load_split("mnist", "test", data_dir=mnist_test_dir)
        splits["official"] = (official.images, official.labels)
    return splits


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 for the table)")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--mnist_test_dir", default=None, help="folder of MNIST IDX files with the official test set")
    p.add_argument("--measure_limit", type=int, default=1000, help="images per set for the measures and PGD")
    p.add_argument("--pgd_steps", type=int, default=PGD_STEPS)
    p.add_argument("--pgd_limit", type=int, default=None, help="images per set for PGD (default: measure_limit)")
    p.add_argument("--measure_splits", default=None,
                   help="comma-separated sets that get the measures and PGD (default: all; others: accuracy only)")
    p.add_argument("--bench", default=None, help="bench.json of experiments/bench_lcnn.py (adds bench ratios)")
    p.add_argument("--out", default=os.path.join("experiments", "results", "lcnn"))
    p.add_argument("--workdir", default=os.path.join("runs", "lcnn_table"))
    p.add_argument("--force", action="store_true", help="recompute rows whose results exist")
    p.add_argument("--table_only", action="store_true",
                   help="no training: the table from the rows/<row>.json that exist, whatever their settings "
                        "(rows with other seeds are marked; their log step ratio is left out)")
    args = p.parse_args(argv)

    t0 = time.time()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r not in ROWS:
            p.error(f"unknown row {r!r}; choose from {ROWS}")
    splits = load_splits(args.mnist_test_dir)
    measure_splits = None if not args.measure_splits else [s.strip() for s in args.measure_splits.split(",")]
    if measure_splits and not set(measure_splits) <= set(splits):
        p.error(f"--measure_splits {measure_splits} must be among the loaded sets {list(splits)}")
    if args.table_only:
        results = [json.load(open(path)) for path in (os.path.join(args.out, "rows", f"{r}.json") for r in rows)
                   if os.path.exists(path)]
        if not results:
            p.error(f"--table_only: no rows/<row>.json under {args.out}")
        if len({r["settings"]["epochs"] for r in results}) != 1 or results[0]["settings"]["epochs"] != args.epochs:
            p.error("--table_only: the saved rows were trained for different epochs (or not --epochs)")
    else:
        results = [run_row(r, epochs=args.epochs, seeds=seeds, out_dir=args.out, workdir=args.workdir,
                           splits=splits, measure_limit=args.measure_limit, pgd_steps=args.pgd_steps,
                           pgd_limit=args.pgd_limit, measure_splits=measure_splits, force=args.force)
                   for r in rows]
    bench = None
    if args.bench and os.path.exists(args.bench):
        with open(args.bench) as fh:
            bench = json.load(fh)
    cmd = "python experiments/lcnn_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"epochs": args.epochs, "seeds": seeds, "pgd_steps": args.pgd_steps, "measure_limit": args.measure_limit,
            "pgd_limit": args.measure_limit if args.pgd_limit is None else args.pgd_limit,
            "measure_splits": measure_splits or list(splits),
            "splits": list(splits), "command": cmd.strip(),
            "device": table_runner.device_description(),
            "wall_s": time.time() - t0,
            "rows_wall_s": {r["row"]: r["train_wall_s"] + r["eval_wall_s"] for r in results}}
    paths = write_outputs(results, meta, args.out, bench)
    print(open(paths["md"]).read())
    return {"meta": meta, "results": results, "paths": paths}


if __name__ == "__main__":
    main()
