"""``run_compare``: train every method's seeds, measure every (method, seed) cell, write tables and figures.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Sequence

import numpy as np

from lcnn_jax.compare.methods import (SHARPNESS_MODES, columns, compare_section, check_methods, to_dict,
                                      method_config, method_models, models_title, several_models, is_piecewise_linear,
                                      fingerprint, training_fingerprint, measure_fingerprint)
from lcnn_jax.compare.tables import aggregate, json_safe, write_results
from lcnn_jax.compare.figures import plot_results

__all__ = ["train_method", "Measurer", "robustness_notes", "measure_cell", "run_compare"]



# ----------------------------------------------------------------------------------------------------------
# Training and measuring


def train_method(method_cfg, run_dir: str, seeds: Sequence[int], *, data_order: str = "per_seed"):
    """Train ``seeds`` of one method as one vmapped sweep in ``run_dir`` (resuming an interrupted one; a
    finished one, marked by its ``sweep_results.json``, is only loaded) and return ``(model, states,
    sweep_summary)``: one :class:`~lcnn_jax.train.TrainState` per seed, in ``seeds`` order."""
    from lcnn_jax.train import sweep
    from lcnn_jax import train as training

    done = os.path.join(run_dir, "sweep_results.json")
    if os.path.exists(done):
        with open(done) as fh:
            summary = json.load(fh)
    else:
        summary = sweep.fit_sweep(method_cfg, run_dir, seeds=tuple(int(s) for s in seeds), data_order=data_order)
    _, model, stacked, members = sweep.load_sweep(run_dir)
    by_seed = {m.seed: m.index for m in members}
    states = [training.member_state(stacked, by_seed[int(s)]) for s in seeds]
    return model, states, summary


class Measurer:
    """The measurement suite of one model, compiled once and applied to every seed's variables.

    Every compiled function takes the variables as an argument (as the report's programs do), so the seeds and
    the methods that train the same architecture share the programs (same formulas and settings as
    :func:`lcnn_jax.report.measure_state`):

    * per-example input-space items: :func:`lcnn_jax.report.per_example_fn` / ``per_example_measures``;
    * clean accuracy, robust accuracy under :func:`lcnn_jax.report.attack_suite` (per radius, the per-example
      worst case of APGD with each loss of ``apgd_losses``, and/or PGD with ``pgd_steps`` steps of
      ``pgd_step_factor * eps / pgd_steps``; an example counts only if also correct on the clean input) and
      Gaussian-noise accuracy: :func:`lcnn_jax.report.robustness` (its programs and key scheme), in padded
      chunks of ``batch_size``;
    * certified accuracy at ``certified_l2_eps`` and the mean certified radius: the model's certified bounds
      (:func:`lcnn_jax.report.model_bound`, on the host per cell) through
      :func:`lcnn_jax.report.certified_robustness` (one margin program per model);
    * Hutchinson trace and Lanczos top eigenvalue of the parameter Hessian of the mean CE
      (:func:`lcnn_jax.report.parameter_hessian`: one program per model and settings);
    * minimum sharpness (:func:`lcnn_jax.measures.minimum_sharpness`, biases included) when ``sharpness``.
    """

    def __init__(self, model, mcfg, *, sharpness: bool, sharpness_chunk: int = 32):
        from lcnn_jax import report
        from lcnn_jax.nn import mode_kwargs

        self.model, self.mcfg, self.sharpness, self.chunk = model, mcfg, bool(sharpness), int(sharpness_chunk)
        self.eval_kw = mode_kwargs(model, train=False)
        self.per_example = report.per_example_fn(model, mcfg)
        self._logits_fn = None

    def robustness(self, variables, xs, ys, key) -> dict:
        """``clean_accuracy``, the robust columns and ``noise_<std>``: :func:`lcnn_jax.report.robustness`."""
        from lcnn_jax import report

        out = report.robustness(self.model, variables, xs, ys, self.mcfg, key, int(self.mcfg.batch_size))
        return {("clean_accuracy" if k == "accuracy" else k): float(st["mean"]) for k, st in out.items()}

    def certified(self, variables, xs, ys) -> dict:
        """``certified_l2_<eps>`` and ``certified_radius`` (mean) of one network
        (:func:`lcnn_jax.report.certified_robustness`); NaN when the model has no certified bound (an operation
        without a rule)."""
        from lcnn_jax import report

        radii = tuple(self.mcfg.get("certified_l2_eps", ()))
        if not radii:
            return {}
        bound = report.model_bound(self.model, variables, np.shape(xs)[1:])
        if bound is None:
            return {**{f"certified_l2_{float(e):g}": math.nan for e in radii}, "certified_radius": math.nan}
        out = report.certified_robustness(self.model, variables, xs, ys, self.mcfg, bound, int(self.mcfg.batch_size))
        return {k: float(st["mean"]) for k, st in out.items()}

    def minimum_sharpness(self, variables, xs) -> float:
        import jax

        from lcnn_jax.measures import layer_order, minimum_sharpness

        rest = {k: v for k, v in variables.items() if k != "params"}
        model, eval_kw = self.model, self.eval_kw

        def logits_fn(p, x):
            return model.apply({"params": p, **rest}, x[None], **eval_kw)[0]

        if not jax.tree.leaves(rest):  # one function object for every seed: layer_hessian_traces compiles once
            if self._logits_fn is None:
                self._logits_fn = logits_fn
            logits_fn = self._logits_fn
        # Flax lists layers in call order at init; a restored checkpoint may have re-sorted the keys.
        fresh = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), xs[:1], **eval_kw))["params"]
        res = minimum_sharpness(logits_fn, variables["params"], xs, include_bias=True, layers=layer_order(fresh),
                                chunk_size=self.chunk)
        return float(res.value)

    def __call__(self, variables, test: tuple, train: tuple, *, key) -> dict:
        import jax

        from lcnn_jax import report

        k_pe, k_rob, k_hess = jax.random.split(key, 3)
        bs = int(self.mcfg.batch_size)
        per_example = report.per_example_measures(self.model, variables, *test, self.mcfg, k_pe, bs,
                                                  run=self.per_example)
        out = {n: st["mean"] for n, st in per_example.items()}
        out.update(self.robustness(variables, *test, k_rob))
        out.update(self.certified(variables, *test))
        out.update({k: st["mean"] for k, st in report.parameter_hessian(self.model, variables, *train, self.mcfg,
                                                                         k_hess).items()})
        out["minimum_sharpness"] = self.minimum_sharpness(variables, train[0]) if self.sharpness else math.nan
        return {k: float(v) for k, v in out.items()}


def robustness_notes(mcfg) -> list[str]:
    """The table notes that say how the robust and certified columns were measured."""
    chosen = tuple(mcfg.get("robust_attacks", ("pgd",)))
    notes = []
    if "autoattack" in chosen:
        notes.append("AA: AutoAttack's standard suite (Croce & Hein 2020, the settings of fra31/auto-attack: APGD-CE, "
                     "APGD-T with 9 target classes, FAB-T with 9, Square with 5000 queries; 100 steps), each attack "
                     "run only on the points all earlier ones failed to break (lcnn_jax.attacks.autoattack); an "
                     "example counts only if it is also correct on the clean input.")
    if "apgd" in chosen:
        notes.append(f"APGD: per-example worst case of APGD-{'/'.join(l.upper() for l in mcfg.apgd_losses)} "
                     f"(Croce & Hein 2020; {int(mcfg.apgd_steps)} steps, {int(mcfg.apgd_restarts)} restart(s), no "
                     f"step-size parameter); an example counts only if it is also correct on the clean input, as "
                     f"for PGD.")
    if tuple(mcfg.get("certified_l2_eps", ())):
        notes.append("certified acc L2 eps: share of examples whose logit margin certifies every L2 perturbation "
                     "of norm eps (lcnn_jax.measures.certified: margin > L_yj eps with the certified pairwise "
                     "Lipschitz bounds, sqrt(2) L eps at worst (Tsuzuku et al. 2018), and the curvature certificate "
                     "for smooth networks); certified radius: its mean per-example radius (0 when misclassified). "
                     "Certified accuracy never exceeds robust accuracy at the same radius.")
    return notes


def measure_cell(measurer: Measurer, variables, test: tuple, train: tuple, *, key) -> dict:
    """All measured columns of one trained network (see :func:`columns`): the suite of ``measurer`` on
    ``test`` (``(xs, ys)``) and the parameter-space items on ``train``. Returns ``{column: float}``."""
    return measurer(variables, test, train, key=key)


# ----------------------------------------------------------------------------------------------------------
# The command


def _measure_config(cmp):
    from lcnn_jax import report
    from lcnn_jax.errors import ConfigError

    mcfg = report.measure_defaults()
    if cmp.get("measure"):
        try:
            mcfg.update(to_dict(cmp.measure))  # plain values: FieldReferences cannot update FieldReferences
        except (TypeError, ValueError) as e:
            raise ConfigError(f"compare.measure: {e}") from None
    report.validate_measure_config(mcfg, prefix="compare.measure")
    return mcfg


def _cell_path(workdir: str, method: str, seed: int) -> str:
    return os.path.join(workdir, "cells", method, f"seed{int(seed)}.json")


def _read_cell(path: str, fp: str):
    from lcnn_jax.io import load_if_matches

    cell = load_if_matches(path, fp, field="fingerprint")
    return None if cell is None else {k: (math.nan if v is None else v) for k, v in cell.items()}


def run_compare(config, workdir: str) -> dict:
    """Train and measure every (method, seed) cell of ``config.compare`` and write the results to ``workdir``
    (see the module docstring for the files). Resumable; returns the ``results.json`` object.

    Raises:
      ConfigError (a ValueError): an unknown method name (the message lists the valid ones), a bad seed list,
        a bad ``compare.sharpness`` mode or measurement setting, or an invalid method config.
      lcnn_jax.data.DatasetError: the dataset cannot be found.
    """
    import jax
    from tqdm.auto import tqdm

    from lcnn_jax import data as data_lib
    from lcnn_jax.configs import validate_config
    from lcnn_jax.report import check_finite_images
    from lcnn_jax.errors import ConfigError
    from lcnn_jax.train import check_workdir_path
    from lcnn_jax.io import write_json_atomic

    t0 = time.time()
    check_workdir_path(workdir)
    cmp = compare_section(config)
    methods = check_methods(config)
    try:
        seeds = tuple(int(s) for s in cmp.seeds)
    except (TypeError, ValueError):
        raise ConfigError(f"compare.seeds must be integers, got {cmp.seeds!r}.") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"compare.seeds must be distinct non-negative integers, got {cmp.seeds!r}.")
    mode = cmp.get("sharpness", "auto")
    if mode not in SHARPNESS_MODES:
        raise ConfigError(f"compare.sharpness={mode!r} is unknown; use one of {SHARPNESS_MODES}.")
    mcfg = _measure_config(cmp)
    mcfg.progress = bool(mcfg.get("progress", True)) and bool(cmp.get("progress", True))
    cols = columns(mcfg)
    cfgs = {m: method_config(config, m) for m in methods}
    for m, c in cfgs.items():  # every config error before any training
        try:
            validate_config(c)
        except ConfigError as e:
            raise ConfigError(f"method {m!r}: {e}") from e

    d = config.data
    test_name, test_dir = d.name, d.get("data_dir")
    if cmp.get("test_data"):  # e.g. the official MNIST test set for a model trained on mnist5k
        test_name, test_dir = cmp.test_data, cmp.get("test_data_dir")
    test = data_lib.load_split(test_name, "test", data_dir=test_dir, download=d.get("download", False))
    train = data_lib.load_split(d.name, "train", data_dir=d.get("data_dir"), download=d.get("download", False))
    n_test, n_hess = min(int(mcfg.num_examples), len(test.images)), min(int(mcfg.hessian_examples), len(train.images))
    test_xy = (test.images[:n_test], test.labels[:n_test])
    train_xy = (train.images[:n_hess], train.labels[:n_hess])
    check_finite_images(f"{test_name} test", test_xy[0])  # on the host, before any training or compilation
    check_finite_images(f"{d.name} train", train_xy[0])
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    measure_fp = measure_fingerprint(cmp)

    cells, timing, measurers = [], {}, {}
    bar = tqdm(total=2 * len(methods), desc="compare", unit="phase", disable=not cmp.get("progress", True),
               dynamic_ncols=True)
    try:
        for method in methods:
            mc = cfgs[method]
            train_fp = training_fingerprint(mc)
            cell_fp = fingerprint(train_fp, measure_fp)
            done = {s: _read_cell(_cell_path(workdir, method, s), cell_fp) for s in seeds}
            todo = [s for s in seeds if done[s] is None]
            timing[method] = {"train_s": 0.0, "measure_s": 0.0}
            if todo:
                bar.set_postfix_str(f"{method}/train")
                t = time.time()
                run_dir = os.path.join(workdir, "runs", f"{method}-{train_fp}-s{'_'.join(map(str, seeds))}")
                model, states, summary = train_method(mc, run_dir, seeds, data_order=cmp.get("data_order", "per_seed"))
                timing[method]["train_s"] = time.time() - t
                bar.update(1)
                bar.set_postfix_str(f"{method}/measure")
                t = time.time()
                per_member = {int(r["seed"]): r for r in summary["members"]}
                sharp = mode == "always" or (mode == "auto" and is_piecewise_linear(mc))
                # One Measurer (one compilation) per architecture: methods that train the same model differ
                # only in the variables, which the compiled functions take as arguments.
                arch = fingerprint(to_dict(mc.model), sharp)
                if arch not in measurers:
                    measurers[arch] = Measurer(model, mcfg, sharpness=sharp,
                                               sharpness_chunk=int(cmp.get("sharpness_chunk", 32)))
                measurer = measurers[arch]
                for seed, state in zip(seeds, states):
                    if done[seed] is not None:
                        continue
                    r = per_member[seed]
                    variables = {"params": state.params, **state.model_state}
                    t_cell = time.time()
                    values = measure_cell(measurer, variables, test_xy, train_xy,
                                          key=jax.random.PRNGKey(int(mcfg.seed)))
                    values["measure_time_s"] = time.time() - t_cell  # the architecture's first cell compiles
                    cell = {"method": method, "seed": seed, "member": r["id"], "diverged": bool(r["diverged"]),
                            "diverged_at": r.get("diverged_at"), "test_accuracy": float(r["test_accuracy"]),
                            "train_accuracy": float(r["train_accuracy"]), "train_time_s": float(summary["wall_time_s"]),
                            **values, "fingerprint": cell_fp, "run_dir": os.path.relpath(run_dir, workdir),
                            "minimum_sharpness_defined": sharp}
                    path = _cell_path(workdir, method, seed)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    write_json_atomic(path, json_safe(cell))
                    done[seed] = cell
                timing[method]["measure_s"] = time.time() - t
                bar.update(1)
            else:
                timing[method]["reused"] = True  # every cell read back; times of the run that made them in cells/
                bar.update(2)
            cells.extend(done[s] for s in seeds)
    finally:
        bar.close()

    mc0 = cfgs[methods[0]]
    models = method_models(config, methods)
    trained = (models_title(models) if several_models(models)
               else f"{models[methods[0]]} {to_dict(mc0.model.get('kwargs'))}")  # each method's own model
    title = f"lcnn-jax compare: {d.name}, {trained}, {len(seeds)} seed(s), {config.train.num_epochs} epochs"
    notes = [
        f"Mean ± std over seeds {list(seeds)} (sample std, ddof=1). **Bold**: best mean per column "
        "(↑ higher is better, ↓ lower is better). Accuracies in %.",
        f"test acc / train acc: whole {d.name} test / training split. Other columns on the first {n_test} test "
        f"images ({test_name}); parameter-space columns (Hessian trace, top eigenvalue, minimum sharpness) on "
        f"{n_hess} training images. PGD: {int(mcfg.pgd_steps)} steps, step {float(mcfg.pgd_step_factor):g} eps / "
        f"steps; noise: N(0, std^2) clipped to [0, 1]; gradient stability at noise std "
        f"{float(mcfg.stability_noise):g}.",
        "min. sharpness: n/a for networks that are not piecewise linear (LCNN: centred softplus, Lipschitz batch "
        "norm), where the layer-rescaling symmetry it rests on does not hold.",
        f"train time s: the method's whole vmapped sweep ({len(seeds)} seeds at once).",
    ]
    if several_models(models):
        by_model: dict[str, list[str]] = {}
        for m in methods:
            by_model.setdefault(f"{cfgs[m].model.name} {to_dict(cfgs[m].model.get('kwargs'))}", []).append(m)
        notes.append("Models: " + "; ".join(f"{k} ({', '.join(v)})" for k, v in by_model.items()) + ".")
    notes += robustness_notes(mcfg)
    # wall_time_s and timing are of THIS invocation (0 for reused cells); each cell keeps its own
    # train_time_s (its method's sweep) and measure_time_s.
    meta = {"title": title, "notes": notes, "models": models, "seeds": list(seeds), "timing": timing,
            "wall_time_s": time.time() - t0, "batch_size": int(mc0.train.batch_size),
            "config": config.to_dict(), "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}
    obj = write_results(workdir, cells, cols, methods, meta=meta)
    agg = aggregate(cells, [c["name"] for c in cols], methods)
    obj["figures"] = plot_results(workdir, agg, cols, robust_column=str(cmp.get("plot_robust_column", "apgd_l2_1")),
                                  models=models)
    return obj
