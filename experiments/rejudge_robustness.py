"""Re-judge the studies' robustness claims with AutoAttack (issue 30): the same networks, the strongest attack.

    python experiments/rejudge_robustness.py clip --mnist_test_dir ../shared/data/mnist
    python experiments/rejudge_robustness.py lcnn --mnist_test_dir ../shared/data/mnist
    python experiments/rejudge_robustness.py smalldata --mnist_test_dir ../shared/data/mnist
        [--rows ...] [--num_examples N] [--workdir runs] [--force]

Three studies claim robustness with fixed-step PGD behind the claim: the CLIP table (``clip_table.py``: CLIP more
robust to PGD than weight regularization), the LCNN table (``lcnn_table.py``: better off-the-shelf robustness) and
the small-data study (``smalldata_study.py``: the derivative penalty gives more PGD robustness). For every row of a
study this script gets the study's own trained networks, by calling the study's own trainer with the study's own
config, seeds and workdir (a finished run is read back from its checkpoints; a missing one is retrained, and the
training is deterministic, so it is the same network: the script checks it, below), and attacks the first
``--num_examples`` official MNIST test images with, at each radius of the study:

* the study's own PGD (same steps, step size and random start as its table), on these images;
* AutoAttack's standard suite (:func:`lcnn_jax.attacks.autoattack`: APGD-CE, APGD-T, FAB-T, Square, each run on
  the points still robust), whose per-stage robust accuracy also gives APGD-CE alone (``apgd_ce``) and
  APGD-CE + APGD-T (``apgd``);
* ``worst``: the per-example worst case over the study's PGD and AutoAttack: an image counts as robust only if
  it is classified correctly and neither broke it. The strongest evaluation we have; it decides the verdict.

Verdicts use the small-data study's significance rule, for every study: a claim is *supported* when the
regularized row's seed mean exceeds the comparison row's by more than twice the standard error of the difference
of the seed means, *contradicted* when it falls below by as much, *not supported* otherwise; given per attack,
so one sees which verdicts flip under the stronger attack.

Same networks: for every seed the script recomputes the clean accuracy on the whole official test set and stores
it beside the value in the study's row file (``same_network``: equal to within one image). A retrained network can
differ from the study's when the library's arithmetic changed since the study ran (another order of floating-point
operations changes the trajectory); the table then says by how much the official accuracy moved.

Files: ``<study results>/autoattack_rows/<row>.json`` per row (cached: a row whose file holds the same settings is
skipped); while a row runs, ``autoattack_rows/parts/<row>/seed<k>__<radius>.json`` for each finished seed and
radius (an interrupted run resumes from them; a network whose official accuracy changed is attacked again; they
are removed once the row is written); ``<study results>/autoattack.{json,md}`` (study results:
``experiments/results/clip``, ``experiments/results/lcnn_e15``, ``experiments/results/smalldata``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable like under pytest
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from experiments import table_runner
from lcnn_jax import attacks, data as data_lib
from lcnn_jax import io as lio
from lcnn_jax.batching import map_chunks

RESULTS = os.path.join("experiments", "results")
COLUMNS = ("clean", "pgd", "apgd_ce", "apgd", "aa", "worst")
COLUMN_NAMES = {"clean": "clean", "pgd": "study's PGD", "apgd_ce": "APGD-CE", "apgd": "APGD-CE+T",
                "aa": "AutoAttack", "worst": "worst case"}
VERSION = 1


@dataclass(frozen=True)
class Radius:
    """One attack setting of a study: ``name`` (column suffix), norm, eps and the study's PGD keyword arguments."""
    name: str
    norm: str
    eps: float
    pgd: dict


@dataclass
class Study:
    """What the script needs of a study: its rows, radii, images, claims and how to get its networks."""
    name: str
    results_dir: str
    rows: Sequence[str]
    radii: Sequence[Radius]
    num_examples: int
    #: ``(claim, comparison row, regularized row)``: the claim is that the regularized row is more robust
    claims: Sequence[tuple]
    #: ``networks(row, workdir) -> (model, [(seed, variables, study's official clean accuracy or None)], note)``
    networks: Callable
    notes: list = field(default_factory=list)
    #: ``row -> images attacked`` where a row's study attacked fewer than ``num_examples`` (None: all rows alike)
    examples_of: Callable | None = None

    def n_examples(self, row: str) -> int:
        return self.num_examples if self.examples_of is None else self.examples_of(row)


# ------------------------------------------------------------------------------------------------ the studies
def clip_study(num_examples: int | None) -> Study:
    from experiments import clip_table as ct

    epochs, seeds = 100, [0, 1, 2]

    def networks(row, workdir):
        config = ct.row_config(row, epochs=epochs, seed=seeds[0])
        wd = os.path.join(workdir, "clip_table", f"e{epochs}", f"{row}-{ct.config_digest(config)}")
        model, states, _, note, _ = ct.train_row(config, wd, seeds)
        saved = _saved_per_seed(os.path.join(RESULTS, "clip", "rows", f"{row}.json"), "official_test_acc")
        return model, [(s, _variables(st), saved.get(s)) for s, st in zip(seeds, states)], note

    pgd = dict(ct.PGD)
    radius = Radius("l2_2", "l2", float(pgd.pop("eps")), {**pgd, "norm": "l2"})
    rows = ct.ROWS
    claims = [(f"{c} more robust than {w}", w, c) for c, w in
              (("clip85", "weightreg85"), ("clip90", "weightreg90"), ("clip95", "weightreg95"),
               ("clip_reference90", "weightreg90"))]
    claims += [(f"{c} more robust than standard", "standard", c) for c in ("clip85", "clip90", "clip95")]
    return Study("clip", os.path.join(RESULTS, "clip"), rows, [radius], num_examples or 1000, claims, networks)


def lcnn_study(num_examples: int | None) -> Study:
    from experiments import lcnn_table as lt
    from lcnn_jax.train import sweep

    epochs, seeds = 15, [0, 1, 2]

    def networks(row, workdir):
        wd = os.path.join(workdir, "lcnn_table", f"e{epochs}", row)
        model, states, _, note, _ = sweep.train_seeds(lt.row_config(row, epochs=epochs, seed=seeds[0]), wd, seeds)
        saved = _saved_per_seed(os.path.join(RESULTS, "lcnn_e15", "rows", f"{row}.json"), "official_acc")
        return model, [(s, _variables(st), saved.get(s)) for s, st in zip(seeds, states)], note

    radii = [Radius(f"l2_{eps:g}", "l2", eps, dict(norm="l2", step_size=lt.PGD_STEP_FACTOR * eps / lt.PGD_STEPS,
                                                   num_steps=lt.PGD_STEPS)) for eps in lt.PGD_EPS]
    claims = [("LCNN more robust than standard", "standard", "lcnn"),
              ("softplus + weight decay more robust than standard", "standard", "softplus10")]
    return Study("lcnn", os.path.join(RESULTS, "lcnn_e15"), ("standard", "lcnn", "softplus10"), radii,
                 num_examples or 200, claims, networks)


def smalldata_study(num_examples: int | None) -> Study:
    from experiments import smalldata_study as sd

    def settings_of(unit):
        d = {**sd.DEFAULTS, **sd.MODEL_DEFAULTS.get(unit.split("/")[0], {})}
        return int(d["epochs"]), [int(s) for s in d["seeds"]], int(d["pgd_n"])

    def networks(row, workdir):
        unit = row.replace("__", "/")
        if sd.unit_grid(unit):
            raise ValueError(f"{unit} has a coefficient grid; only grid-free units are re-judged here.")
        epochs, seeds, _ = settings_of(unit)
        vectorize = unit.split("/")[0] not in sd.SEQUENTIAL_MODELS
        wd = os.path.join(workdir, "smalldata", f"e{epochs}", row)
        model, trained, _ = sd.train_unit(unit, epochs=epochs, seeds=seeds, workdir=wd, vectorize=vectorize)
        saved = _saved_per_seed(os.path.join(RESULTS, "smalldata", "units", f"{row}.json"), "official_acc")
        return model, [(rec["seed"], _variables(st), saved.get(rec["seed"])) for rec, st in trained], ""

    rows, claims = [], []
    for model in ("mlp", "mlp_softplus", "lenet", "small_cnn"):
        rows.append(f"{model}__baseline")
        readings = ("derivative_a", "derivative_b") + (("derivative_b_softmax",) if model == "mlp" else ())
        for reading in readings:
            rows.append(f"{model}__{reading}")
            claims.append((f"{model}: {reading} more robust than baseline", f"{model}__baseline",
                           f"{model}__{reading}"))
    radii = [Radius("linf_0.1", "linf", sd.PGD_LINF["eps"], {k: v for k, v in sd.PGD_LINF.items() if k != "eps"}),
             Radius("l2_1", "l2", sd.PGD_L2["eps"], {k: v for k, v in sd.PGD_L2.items() if k != "eps"})]
    n = num_examples or 500
    return Study("smalldata", os.path.join(RESULTS, "smalldata"), rows, radii, n, claims, networks,
                 notes=["small_cnn rows: 200 images (the study's pgd_n for that model), 3 seeds, 5 epochs"],
                 examples_of=lambda row: min(n, settings_of(row.replace("__", "/"))[2]))


STUDIES = {"clip": clip_study, "lcnn": lcnn_study, "smalldata": smalldata_study}


def _read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _variables(state) -> dict:
    return {"params": state.params, **state.model_state}


def _saved_per_seed(path: str, key: str) -> dict:
    """``{seed: per_seed[key]}`` from a study's row file, ``{}`` when there is none."""
    if not os.path.exists(path):
        return {}
    obj = _read_json(path)
    return {int(r["seed"]): r.get(key) for r in obj.get("per_seed", [])}


# ------------------------------------------------------------------------------------------------ evaluation
@functools.lru_cache(maxsize=None)
def _fns(model):
    """``apply(variables, xs)`` (one object per model: AutoAttack's programs compile once per architecture) and
    jitted ``clean(variables, x, y)`` and ``pgd(variables, x, y, key, radius)``."""
    def apply(variables, xs):
        return model.apply(variables, xs, train=False)

    @jax.jit
    def clean(variables, x, y):
        return jnp.argmax(apply(variables, x), -1) == y

    @functools.lru_cache(maxsize=None)
    def pgd_of(eps: float, kwargs: tuple):
        @jax.jit
        def fn(variables, x, y, key):
            f = lambda xs: apply(variables, xs)  # noqa: E731
            return jnp.argmax(f(attacks.pgd(f, x, y, key=key, eps=eps, **dict(kwargs))), -1) == y
        return fn

    def pgd(radius: Radius):
        return pgd_of(float(radius.eps), tuple(sorted(radius.pgd.items())))

    return apply, clean, pgd


def evaluate_seed(model, variables, xs, ys, radius: Radius, *, key, aa_kwargs=None) -> dict:
    """Per-example correctness under the study's PGD and AutoAttack (standard) at one radius; accuracies and the
    points each AutoAttack stage broke. ``aa_kwargs``: extra arguments of :func:`lcnn_jax.attacks.autoattack`
    (tests lower its steps and queries; the studies use the reference's)."""
    apply, clean, pgd = _fns(model)
    k_pgd, k_aa = jax.random.split(key)
    ok_clean = np.asarray(clean(variables, jnp.asarray(xs), jnp.asarray(ys)))
    ok_pgd = np.asarray(map_chunks(lambda x, y, k: pgd(radius)(variables, x, y, k), xs, ys, key=k_pgd,
                                   chunk_size=250))
    t0 = time.time()
    res = attacks.autoattack(apply, jnp.asarray(xs), jnp.asarray(ys), norm=radius.norm, eps=radius.eps, key=k_aa,
                             params=variables, version="standard", progress=False, **(aa_kwargs or {}))
    aa_s = time.time() - t0
    robust = np.asarray(res.robust)
    stages = dict(res.per_stage)
    broken = {s: int(np.sum(np.asarray(res.broken_by) == s)) for s in ("apgd-ce", "apgd-t", "fab-t", "square")}
    return {"clean": float(ok_clean.mean()), "pgd": float((ok_pgd & ok_clean).mean()),
            "apgd_ce": float(stages.get("apgd-ce", np.nan)), "apgd": float(stages.get("apgd-t", np.nan)),
            "aa": float(robust.mean()), "worst": float((robust & ok_pgd & ok_clean).mean()),
            "pgd_not_aa": int(np.sum(robust & ~ok_pgd)), "broken_by": broken, "aa_seconds": aa_s}


def run_row(study: Study, row: str, *, xs_all, ys_all, workdir: str, force: bool = False,
            aa_kwargs=None) -> dict:
    """The row's result: its networks (``study.networks``) attacked at every radius, cached in
    ``<results_dir>/autoattack_rows/<row>.json``; each finished (seed, radius) is saved under
    ``autoattack_rows/parts/<row>/`` until then, so an interrupted row resumes where it stopped."""
    n = study.n_examples(row)
    xs, ys = xs_all[:n], ys_all[:n]
    settings = {"version": VERSION, "n": int(n), "radii": [r.__dict__ for r in study.radii],
                "autoattack": "standard", "autoattack_kwargs": dict(aa_kwargs or {})}

    parts = os.path.join(study.results_dir, "autoattack_rows", "parts", row)

    def compute():
        t0 = time.time()
        model, members, note = study.networks(row, workdir)
        train_s = time.time() - t0
        _, clean, _ = _fns(model)
        per_seed = []
        for seed, variables, saved_acc in members:
            acc = float(np.mean(map_chunks(lambda x, y, k: clean(variables, x, y), xs_all, ys_all,
                                           key=jax.random.PRNGKey(0), chunk_size=1000)))
            rec = {"seed": int(seed), "official_acc": acc, "study_official_acc": saved_acc,
                   "same_network": None if saved_acc is None else bool(abs(acc - saved_acc) <= 1.5 / len(ys_all))}
            for i, radius in enumerate(study.radii):
                # one finished (seed, radius), saved with what made it (the network's official accuracy among it)
                part = table_runner.cached_row(
                    os.path.join(parts, f"seed{int(seed)}__{radius.name}.json"),
                    {**settings, "seed": int(seed), "radius": radius.name, "official_acc": acc},
                    lambda: evaluate_seed(
                        model, variables, xs, ys, radius, aa_kwargs=aa_kwargs,
                        key=jax.random.fold_in(jax.random.PRNGKey(3000 + int(seed)), i)),
                    force=force, tag=f"rejudge {study.name}", name=f"{row} seed {seed} {radius.name}")
                r = rec[radius.name] = {k: v for k, v in part.items() if k != "settings"}
                print(f"[rejudge {study.name}] {row} seed {seed} {radius.name}: clean {r['clean']:.3f} pgd "
                      f"{r['pgd']:.3f} apgd-ce {r['apgd_ce']:.3f} aa {r['aa']:.3f} worst {r['worst']:.3f} "
                      f"(aa {r['aa_seconds']:.0f} s)", flush=True)
            per_seed.append(rec)
        return {"row": row, "per_seed": per_seed, "note": note, "networks_s": train_s,
                "eval_s": time.time() - t0 - train_s}

    path = os.path.join(study.results_dir, "autoattack_rows", f"{row}.json")
    result = table_runner.cached_row(path, settings, compute, force=force, tag=f"rejudge {study.name}", name=row)
    shutil.rmtree(parts, ignore_errors=True)  # the row holds them now
    return result



# ------------------------------------------------------------------------------------------------ verdicts
def verdict(base: Sequence[float], reg: Sequence[float]) -> dict:
    """The significance rule (module docstring) on per-seed values: ``{"verdict", "diff", "se"}``."""
    diff, se, move = table_runner.mean_difference(base, reg)
    v = {"up": "supported", "down": "contradicted", "none": "not supported"}[move]
    return {"verdict": v, "diff": diff, "se": se}


def judge(study: Study, rows: dict) -> list[dict]:
    out = []
    for claim, base, reg in study.claims:
        if base not in rows or reg not in rows:
            continue
        for radius in study.radii:
            if any(radius.name not in s for s in rows[base]["per_seed"] + rows[reg]["per_seed"]):
                continue  # a radius one of the two rows was not attacked at
            entry = {"claim": claim, "radius": radius.name}
            for col in ("pgd", "apgd_ce", "aa", "worst"):
                entry[col] = verdict([s[radius.name][col] for s in rows[base]["per_seed"]],
                                     [s[radius.name][col] for s in rows[reg]["per_seed"]])
            out.append(entry)
    return out


def _ms(values) -> str:
    m, s = lio.mean_std(list(values))
    return "-" if m is None else f"{100 * m:.1f} ± {100 * (s or 0.0):.1f}"


def markdown(study: Study, rows: dict, verdicts: list[dict], command: str, wall_s: float) -> str:
    radii = {r.name: r for r in study.radii}
    lines = [f"# Robustness claims of the {study.name} study, re-judged with AutoAttack", "",
             f"Last command: `{command}`. The tables hold every row whose result exists, from that call and earlier "
             f"ones ({wall_s / 60:.1f} min of training or loading and attacking, summed over all these rows, each "
             f"row's own time in its JSON, including any time the job was paused; "
             f"{table_runner.device_description()}; 2 CPU cores). "
             "Networks: the study's own (same configs, seeds and workdir naming; same_network below). Images: the "
             "first N official MNIST test images. Robust accuracy in %, mean ± std over seeds; columns as in "
             "`experiments/rejudge_robustness.py`: the study's PGD on these images, APGD-CE, APGD-CE then APGD-T, "
             "AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square), and the worst case over the study's PGD and "
             "AutoAttack.", ""]
    for name, radius in radii.items():
        pgd = ", ".join(f"{k} {v}" for k, v in radius.pgd.items() if k != "norm")
        lines += [f"## {radius.norm.upper()} ε = {radius.eps:g} (study's PGD: {pgd}, random start)", "",
                  "| row | N | seeds | " + " | ".join(f"{COLUMN_NAMES[c]} %" for c in COLUMNS)
                  + " | broken by APGD-CE / APGD-T / FAB-T / Square (sum over seeds) | same network |",
                  "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|"]
        for row, res in rows.items():
            per = res["per_seed"]
            if any(name not in s for s in per):
                continue  # this row was not attacked at this radius (--radii)
            broken = [sum(s[name]["broken_by"].get(k, 0) for s in per) for k in ("apgd-ce", "apgd-t", "fab-t",
                                                                                 "square")]
            same = [s["same_network"] for s in per]
            if any(v is None for v in same):
                same_txt = "not checked"
            elif all(same):
                same_txt = "yes"
            else:  # retrained, not bitwise the same: say by how much the official accuracy moved
                moved = max(abs(s["official_acc"] - s["study_official_acc"]) for s in per)
                same_txt = f"NO: official accuracy off by up to {moved * 100:.2f} points"
            lines.append(f"| {row} | {res['settings']['n']} | {len(per)} | "
                         + " | ".join(_ms(s[name][c] for s in per) for c in COLUMNS)
                         + f" | {' / '.join(map(str, broken))} | {same_txt} |")
        lines.append("")
    if verdicts:
        lines += ["## Verdicts", "",
                  "Difference of the seed means (regularized - comparison, points) ± twice its standard error, and "
                  "the verdict under each attack (significance rule in the script's docstring).", "",
                  "| claim | radius | study's PGD | APGD-CE | AutoAttack | worst case |", "|---|---|---|---|---|---|"]
        for v in verdicts:
            cells = [f"{100 * v[c]['diff']:+.1f} ± {200 * v[c]['se']:.1f} **{v[c]['verdict']}**"
                     for c in ("pgd", "apgd_ce", "aa", "worst")]
            lines.append(f"| {v['claim']} | {v['radius']} | " + " | ".join(cells) + " |")
        lines.append("")
    for note in study.notes:
        lines.append(f"Note: {note}.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("--mnist_test_dir", required=True, help="folder of the official MNIST test set (IDX files)")
    p.add_argument("--rows", default=None, help="comma-separated rows (default: every row of the study)")
    p.add_argument("--num_examples", type=int, default=None,
                   help="official test images attacked (default: the study's PGD count)")
    p.add_argument("--radii", default=None,
                   help="comma-separated radius names to attack (default: every radius of the study, e.g. l2_1,l2_2)")
    p.add_argument("--workdir", default="runs", help="parent of the studies' workdirs (their defaults: runs/...)")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if args.num_examples is not None and args.num_examples <= 0:
        p.error(f"--num_examples must be positive, got {args.num_examples}")
    study = STUDIES[args.study](args.num_examples)
    rows = list(study.rows) if args.rows is None else [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in study.rows]
    if bad:
        p.error(f"unknown row(s) {bad} of study {args.study}; choose among {list(study.rows)}")
    all_radii = list(study.radii)
    if args.radii is not None:
        names = [r for r in args.radii.split(",") if r]
        known = [r.name for r in study.radii]
        if not names or any(r not in known for r in names):
            p.error(f"--radii {args.radii!r}: choose among {known}")
        study.radii = [r for r in study.radii if r.name in names]
    try:
        official = data_lib.load_split("mnist", "test", data_dir=args.mnist_test_dir)
    except (FileNotFoundError, ValueError) as e:
        p.error(f"--mnist_test_dir {args.mnist_test_dir!r}: {e}")
    done = {}
    for row in rows:
        done[row] = run_row(study, row, xs_all=official.images, ys_all=official.labels, workdir=args.workdir,
                            force=args.force)
    # the tables show every row whose result exists, not only the ones this call computed
    for row in study.rows:
        path = os.path.join(study.results_dir, "autoattack_rows", f"{row}.json")
        if row not in done and os.path.exists(path):
            done[row] = _read_json(path)
    done = {r: done[r] for r in study.rows if r in done}
    study.radii = all_radii  # the tables and verdicts show every radius some row was attacked at
    verdicts = judge(study, done)
    command = "python experiments/rejudge_robustness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lio.write_json_atomic(os.path.join(study.results_dir, "autoattack.json"),
                          {"rows": done, "verdicts": verdicts, "command": command})
    wall_s = sum(r.get("networks_s", 0.0) + r.get("eval_s", 0.0) for r in done.values())
    text = markdown(study, done, verdicts, command, wall_s)
    lio.write_text_atomic(os.path.join(study.results_dir, "autoattack.md"), text)
    print(text)
    return {"rows": done, "verdicts": verdicts}


if __name__ == "__main__":
    main()
