"""``lcnn-jax compare``: every method trained under one protocol, measured by one suite, in one table.

For each method of ``config.compare.methods`` (a name of ``config.compare.method_specs``: a set of overrides of
the base config, see :func:`method_config`) the seeds ``config.compare.seeds`` are trained as ONE vmapped program
(:func:`lcnn_jax.train.fit_sweep`), then every (method, seed) *cell* is measured with the report suite
(:func:`lcnn_jax.report.measure_state`: accuracy, Jacobian Frobenius norm, input curvature, gradient stability,
local Lipschitz, APGD and/or PGD robust accuracy, certified accuracy, Gaussian-noise accuracy, parameter-Hessian
trace and top eigenvalue) plus minimum sharpness (:func:`lcnn_jax.measures.minimum_sharpness`) where it is defined.

Files in ``workdir``:

* ``cells/<method>/seed<k>.json``: one finished cell (its values, its config fingerprint), written atomically.
* ``runs/<method>-<fingerprint>-s<seeds>/``: the method's sweep (checkpoints, metrics, ``sweep_results.json``).
* ``results.csv``: one row per cell: ``method, seed, member, diverged, <metric columns>`` (see :func:`columns`).
* ``results_summary.csv``: one row per method: ``method, num_seeds, <metric>_mean, <metric>_std ...``.
* ``results.json``: ``columns`` (name, label, direction), ``cells``, ``aggregate`` (``method -> metric ->
  {mean, std, n}``), ``best`` (``metric -> [methods]``), ``methods``, ``models`` (``method -> model``),
  ``seeds``, ``timing``, ``config``.
* ``results.md``: mean ± std per method and column; the best mean per column in **bold**; a ``model`` column
  where the methods train different models (the title then counts them: ``models: small_cnn (8 methods),
  mine.py:Net (1)``).
* ``figures/accuracy_vs_curvature.png``, ``figures/robustness_vs_jacobian.png``: one point per method, seed
  standard deviations as error bars (labelled ``method (model)`` where the models differ).

A method of one's own from the command line (:func:`apply_compare_overrides`, what ``lcnn-jax compare`` applies):
``--config.compare.method_specs.mine.model.name=path/to/models.py:Net
--config.compare.method_specs.mine.regularizers.datagrad.coeff=0.01`` adds the method ``mine`` to the run.

Aggregates are the mean and the sample standard deviation (ddof=1; 0 for one seed) over the seeds that did not
diverge and have a finite value. NaN (JSON ``null``) marks a value that is undefined (e.g. minimum sharpness of a
smooth network with ``sharpness="auto"``).

Resuming: a rerun with the same config skips every cell whose file exists with the same fingerprint (the
method's resolved config + the measurement settings), and does not train a method whose cells are all done;
a method whose sweep finished but whose cells are missing is loaded from its checkpoint, not retrained; an
interrupted sweep resumes from its last checkpoint. Changing a method's config or the measurement settings
changes the fingerprint, so its cells are recomputed (in a new run directory).

Cost: training as in :func:`~lcnn_jax.train.fit_sweep` (K seeds ~ K x a single run, one compilation per
method); measurement as in ``lcnn-jax measure`` on ``measure.num_examples`` test images per cell, plus
minimum sharpness (one forward and K backward passes per example on ``measure.hessian_examples`` training
images).

Example::

    from lcnn_jax import compare
    from lcnn_jax.configs import load_config
    config = load_config("experiments/configs/compare_mnist5k.py")
    config.compare.methods = ("standard", "datagrad")
    summary = compare.run_compare(config, "runs/compare_two")
    print(summary["aggregate"]["datagrad"]["curvature"])       # {"mean": ..., "std": ..., "n": 2}
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "PIECEWISE_LINEAR_MODELS",
    "columns",
    "check_methods",
    "apply_compare_overrides",
    "method_config",
    "method_models",
    "models_title",
    "is_piecewise_linear",
    "fingerprint",
    "train_method",
    "Measurer",
    "measure_cell",
    "aggregate",
    "best_methods",
    "format_markdown",
    "format_compact",
    "compact_priority",
    "write_results",
    "plot_results",
    "scatter_figure",
    "axis_label",
    "run_compare",
]

# Registered models that are chains of dense/conv/pool layers (no skip connections, no normalisation by
# default): with a ReLU/identity activation they are piecewise linear, where minimum sharpness is exact.
PIECEWISE_LINEAR_MODELS = ("mlp", "ms_mlp", "lenet", "ms_lenet", "small_cnn")
SHARPNESS_MODES = ("auto", "always", "never")


# ----------------------------------------------------------------------------------------------------------
# Columns


def columns(mcfg) -> list[dict]:
    """The metric columns of a compare run with measurement settings ``mcfg``, in table order: ``name``,
    ``label`` (for tables and plots) and ``direction`` (``"higher"``/``"lower"`` is better, or None: not
    ranked). Accuracies are fractions in [0, 1].

    * ``test_accuracy``/``train_accuracy``: on the whole test / training split (the sweep's final evaluation);
    * ``clean_accuracy``, ``aa_<norm>_<eps>`` (AutoAttack's standard suite, when ``"autoattack"`` is in
      ``robust_attacks``), ``apgd_<norm>_<eps>`` (APGD worst case, when ``"apgd"`` is),
      ``pgd_<norm>_<eps>`` (when ``"pgd"`` is), ``noise_<std>``: on the measured test subset; robust columns
      count an example only when it is also classified correctly on the clean input;
    * ``certified_l2_<eps>``: certified accuracy at each radius of ``certified_l2_eps`` and ``certified_radius``
      the mean certified L2 radius (0 for misclassified examples), from the certified bounds
      (:mod:`lcnn_jax.measures.certified`), on the measured test subset;
    * ``jacobian_frobenius`` ``||J||_F`` of the logits, ``curvature`` ``|lam|/(||g||+1e-6)``, ``hessian_norm``
      ``|lam|``, ``grad_norm`` ``||grad_x CE||``, ``gradient_stability`` (cosine), ``local_lipschitz``: per-
      example means over the measured test subset (input space);
    * ``hessian_trace``, ``hessian_top_eigenvalue``, ``minimum_sharpness``: parameter space, mean CE over
      ``measure.hessian_examples`` training images.
    """
    cols = [("test_accuracy", "test acc", "higher"), ("train_accuracy", "train acc", None),
            ("clean_accuracy", "clean acc (subset)", "higher")]
    chosen = tuple(mcfg.get("robust_attacks", ("pgd",)))
    for attack, prefix, label in (("autoattack", "aa", "AA"), ("apgd", "apgd", "APGD"), ("pgd", "pgd", "PGD")):
        if attack in chosen:
            cols += [(f"{prefix}_linf_{float(e):g}", f"{label}-Linf {float(e):g}", "higher") for e in mcfg.pgd_linf_eps]
            cols += [(f"{prefix}_l2_{float(e):g}", f"{label}-L2 {float(e):g}", "higher") for e in mcfg.pgd_l2_eps]
    radii = tuple(mcfg.get("certified_l2_eps", ()))
    cols += [(f"certified_l2_{float(e):g}", f"certified acc L2 {float(e):g}", "higher") for e in radii]
    if radii:
        cols += [("certified_radius", "certified radius", "higher")]
    cols += [(f"noise_{float(s):g}", f"noise {float(s):g}", "higher") for s in mcfg.noise_std]
    cols += [("jacobian_frobenius", "Jacobian norm", "lower"), ("curvature", "curvature", "lower"),
             ("hessian_norm", "input Hessian norm", "lower"), ("grad_norm", "loss grad norm", "lower"),
             ("gradient_stability", "grad stability", "higher"), ("local_lipschitz", "local Lipschitz", "lower"),
             ("hessian_trace", "Hessian trace", "lower"), ("hessian_top_eigenvalue", "Hessian top eig", "lower"),
             ("minimum_sharpness", "min. sharpness", "lower"), ("train_time_s", "train time s", None)]
    return [{"name": n, "label": l, "direction": d} for n, l, d in cols]


# ----------------------------------------------------------------------------------------------------------
# Methods


def _section(config):
    from lcnn_jax.errors import ConfigError

    if "compare" not in config:
        raise ConfigError("The config has no 'compare' section; use a compare config such as "
                          "experiments/configs/compare_mnist5k.py.")
    return config.compare


def check_methods(config) -> tuple[str, ...]:
    """The selected method names, validated: each must be a key of ``config.compare.method_specs``.

    Raises:
      ConfigError (a ValueError): an unknown or repeated name; the message lists the valid choices.
    """
    from lcnn_jax.errors import ConfigError

    cmp = _section(config)
    valid = tuple(cmp.method_specs.keys())
    methods = cmp.methods
    if isinstance(methods, str):
        methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    methods = tuple(methods)
    unknown = [m for m in methods if m not in valid]
    if unknown:
        raise ConfigError(f"compare.methods: unknown method(s) {unknown}; choose among {list(valid)} "
                          f"(or add a spec under compare.method_specs).")
    if not methods:
        raise ConfigError(f"compare.methods is empty; choose among {list(valid)}.")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"compare.methods repeats a method: {methods}.")
    problems = [p for m in methods for p in _spec_problems(config, m)]
    if problems:
        raise ConfigError("Invalid method spec(s):\n  - " + "\n  - ".join(problems))
    return methods


SPEC_SECTIONS = ("model", "regularizers", "optim", "train", "data")  # what a method spec may set


def _spec_problems(config, name: str) -> list[str]:
    """What is wrong with ``compare.method_specs[name]`` (a typo'd section or setting, a model without a name
    string, regularizers that are not ``name -> kwargs``), each naming the key and the fix."""
    import difflib

    where = f"compare.method_specs.{name}"
    spec = _section(config).method_specs[name]
    if not isinstance(spec, Mapping) and not hasattr(spec, "keys"):
        return [f"{where}={spec!r} must be a set of overrides of the base config, e.g. "
                f"--config.{where}.model.name=models.py:Net --config.{where}.regularizers.datagrad.coeff=0.01."]

    def hint(key, choices):
        close = difflib.get_close_matches(str(key), list(choices), n=1, cutoff=0.5)
        return f" (did you mean {close[0]}?)" if close else ""

    problems = []
    for section in spec.keys():
        value = spec[section]
        if section not in SPEC_SECTIONS:
            problems.append(f"{where}.{section}: a method sets only {', '.join(SPEC_SECTIONS)}"
                            f"{hint(section, SPEC_SECTIONS)}.")
        elif not hasattr(value, "keys"):
            problems.append(f"{where}.{section}={value!r} must be a section (e.g. {where}.{section}.<key>=value).")
        elif section == "model":
            extra = [k for k in value.keys() if k not in ("name", "kwargs")]
            if extra:
                problems.append(f"{where}.model.{extra[0]}: a model has only a name and kwargs"
                                f"{hint(extra[0], ('name', 'kwargs'))}.")
            if "name" in value and not isinstance(value["name"], str):
                problems.append(f"{where}.model.name={value['name']!r} must be a model name or "
                                f"'path/to/file.py:Class'.")
            if value.get("kwargs") is not None and not hasattr(value["kwargs"], "keys"):
                problems.append(f"{where}.model.kwargs={value['kwargs']!r} must be a section of keyword arguments.")
        elif section == "regularizers":
            from lcnn_jax import data as data_lib
            from lcnn_jax import regularizers as regs

            data_name = (spec.get("data") or {}).get("name", config.data.name)
            info = data_lib.dataset_info(data_name) if data_name in data_lib.DATASETS else None
            for reg in value.keys():
                if not hasattr(value[reg], "keys"):
                    problems.append(f"{where}.regularizers.{reg}={value[reg]!r} must be the regularizer's keyword "
                                    f"arguments, e.g. {where}.regularizers.{reg}.coeff=0.01.")
                elif reg in regs.REGULARIZERS:  # an unknown name is validate_config's message
                    try:  # a typo'd keyword (coef) now, not after the methods before it have trained
                        regs.make_regularizer(reg, dataset_info=info, **_to_dict(value[reg]))
                    except (TypeError, ValueError) as e:
                        problems.append(f"{where}.regularizers.{reg}: {e}")
        else:
            known = config[section].keys() if section in config else ()
            for key in value.keys():
                if key not in known:
                    problems.append(f"{where}.{section}.{key} is not a setting of {section}{hint(key, known)}.")
    return problems


def apply_compare_overrides(config, overrides: Sequence[str]):
    """:func:`lcnn_jax.configs.apply_overrides` for a compare config, where a method can be added from the
    command line: ``compare.method_specs.<name>.<section>...=value`` (sections ``model``, ``regularizers``,
    ``optim``, ``train``, ``data``, as in :func:`method_config`) defines a method that the config does not have
    and, unless the overrides also set ``compare.methods``, appends it to the methods run, e.g.::

        lcnn-jax compare --config experiments/configs/compare_mnist5k.py --workdir runs/mine \\
            --config.compare.method_specs.mine.model.name=path/to/models.py:Net \\
            --config.compare.method_specs.mine.regularizers.datagrad.coeff=0.01

    ``compare.methods.<name>...`` (the tuple of names taken for a section) is refused with that spelling.
    Returns ``config``, changed in place; raises ConfigError listing every bad override."""
    from lcnn_jax.configs import apply_overrides
    from lcnn_jax.errors import ConfigError

    cmp = _section(config)
    before = set(cmp.method_specs.keys())
    keys = [o.partition("=")[0] for o in overrides]
    misplaced = [k for k in keys if k.startswith("compare.methods.")]
    rest = [o for o, k in zip(overrides, keys) if not k.startswith("compare.methods.")]
    problems = [f"{k}: compare.methods is the tuple of method names to run; a method is defined under "
                f"compare.method_specs, e.g. --config.compare.method_specs.{k.split('.')[2]}.model.name="
                f"path/to/models.py:Net (it joins compare.methods by itself)." for k in misplaced]
    try:
        apply_overrides(config, rest)
    except ConfigError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "\n".join(problems))
    added = [m for m in cmp.method_specs.keys() if m not in before]
    if added and "compare.methods" not in keys:
        names = cmp.methods
        names = tuple(m.strip() for m in names.split(",") if m.strip()) if isinstance(names, str) else tuple(names)
        cmp.methods = names + tuple(m for m in added if m not in names)
    return config


def _to_dict(node):
    return node.to_dict() if hasattr(node, "to_dict") else dict(node or {})


def method_config(config, name: str):
    """The training config of method ``name``: the base config (``compare`` and ``sweep`` sections dropped)
    with ``config.compare.method_specs[name]`` applied: ``model`` replaced when the spec names a model (its
    kwargs merged over nothing, so an LCNN variant does not inherit ``act='relu'``), ``regularizers``
    replaced, every other section merged key by key."""
    import ml_collections

    from lcnn_jax.errors import ConfigError

    specs = _section(config).method_specs
    if name not in specs:
        raise ConfigError(f"unknown method {name!r}; choose among {list(specs.keys())}.")
    spec = _to_dict(specs[name])
    base = config.to_dict()
    base.pop("compare", None)
    base.pop("sweep", None)
    base.setdefault("regularizers", {})
    for section, value in spec.items():
        if section == "regularizers":
            base["regularizers"] = dict(value or {})
        elif section == "model" and "name" in value:
            base["model"] = {"name": value["name"], "kwargs": dict(value.get("kwargs") or {})}
        elif isinstance(value, Mapping) and isinstance(base.get(section), Mapping):
            base[section] = {**base[section], **value}
        else:
            base[section] = value
    out = ml_collections.ConfigDict(base)
    out.sweep = ml_collections.ConfigDict(dict(seeds=(), grid=ml_collections.ConfigDict(), data_order="per_seed"))
    if not isinstance(out.get("regularizers"), ml_collections.ConfigDict):
        raise ConfigError(f"compare.method_specs.{name}.regularizers must be a mapping name -> kwargs.")
    return out


def _model_label(model) -> str:
    name = str(model.name)
    where, sep, attr = name.rpartition(":")
    return f"{os.path.basename(where)}:{attr}" if sep and where.endswith(".py") else name


def method_models(config, methods: Sequence[str]) -> dict[str, str]:
    """``method -> its model``, as tables and figures name it: a registered name (``small_cnn``), or
    ``file.py:Class`` for a model given by a file path; the kwargs are added (``small_cnn {'act': 'softplus'}``)
    where methods train one name with different kwargs."""
    cfgs = {m: method_config(config, m) for m in methods}
    short = {m: _model_label(c.model) for m, c in cfgs.items()}
    kwargs = {m: _to_dict(c.model.get("kwargs")) for m, c in cfgs.items()}
    out = {}
    for m in methods:
        variants = {json.dumps(kwargs[o], sort_keys=True, default=str) for o in methods if short[o] == short[m]}
        out[m] = f"{short[m]} {kwargs[m]}" if len(variants) > 1 else short[m]
    return out


def models_title(models: Mapping[str, str]) -> str:
    """The models of a run for a title: the one model's name when every method trains it, else
    ``"models: small_cnn (8 methods), mine.py:Net (1)"`` (the most used first)."""
    counts: dict[str, int] = {}
    for label in models.values():
        counts[label] = counts.get(label, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])  # stable: ties keep the methods' order
    return "models: " + ", ".join(f"{label} ({n} method{'s' if n > 1 else ''})" if i == 0 else f"{label} ({n})"
                                  for i, (label, n) in enumerate(ranked))


def _several_models(models: Mapping[str, str] | None) -> bool:
    return bool(models) and len(set(models.values())) > 1


def is_piecewise_linear(method_cfg) -> bool:
    """True when the method's model is a chain of dense/conv/pool layers with a ReLU or identity activation,
    no normalisation and no output activation (where minimum sharpness is exact, SPEC 1.5)."""
    m = method_cfg.model
    kw = _to_dict(m.get("kwargs"))
    return (m.name in PIECEWISE_LINEAR_MODELS and kw.get("act", "relu") in ("relu", "identity")
            and kw.get("norm") in (None, "none") and kw.get("output_activation") is None)


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (configs as dicts): identifies what a cell or run computed."""
    text = json.dumps([_to_dict(p) if hasattr(p, "to_dict") else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _training_fingerprint(method_cfg) -> str:
    cfg = method_cfg.to_dict()
    cfg["train"] = {k: v for k, v in cfg["train"].items() if k != "progress"}
    if cfg.get("optim", {}).get("clip_grad_norm") is None:  # added later; unset = how older runs trained
        cfg["optim"] = {k: v for k, v in cfg["optim"].items() if k != "clip_grad_norm"}
    return fingerprint(cfg)


def _measure_fingerprint(cmp) -> dict:
    m = {k: v for k, v in _to_dict(cmp.measure).items() if k != "progress"}
    return {"measure": m, "sharpness": cmp.sharpness, "test_data": cmp.get("test_data"),
            "test_data_dir": cmp.get("test_data_dir")}


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
# Aggregation and output


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def aggregate(cells: Sequence[dict], names: Sequence[str], methods: Sequence[str]) -> dict:
    """``method -> column -> {"mean", "std", "n"}``: mean and sample std (ddof=1; 0 for one value) over the
    cells of that method that did not diverge and have a finite value (mean/std NaN when there is none)."""
    out = {}
    for method in methods:
        rows = [c for c in cells if c["method"] == method and not c.get("diverged")]
        out[method] = {}
        for name in names:
            vals = np.array([c[name] for c in rows if _finite(c.get(name))], np.float64)
            out[method][name] = {"mean": float(vals.mean()) if vals.size else math.nan,
                                 "std": float(vals.std(ddof=1)) if vals.size > 1 else (0.0 if vals.size else math.nan),
                                 "n": int(vals.size)}
    return out


def best_methods(agg: dict, cols: Sequence[dict]) -> dict:
    """``column -> [methods]`` whose mean is the best (max for ``higher``, min for ``lower``; ties all kept);
    unranked columns and columns without finite means are left out."""
    best = {}
    for col in cols:
        if col["direction"] is None:
            continue
        means = {m: agg[m][col["name"]]["mean"] for m in agg if _finite(agg[m][col["name"]]["mean"])}
        if not means:
            continue
        target = max(means.values()) if col["direction"] == "higher" else min(means.values())
        best[col["name"]] = [m for m, v in means.items() if v == target]
    return best


def _is_accuracy(name: str) -> bool:
    return (name.endswith("accuracy") and name != "gradient_stability"
            or name.startswith(("pgd_", "apgd_", "noise_", "certified_l2_")))


def _cell_text(name: str, st: dict) -> str:
    mean, std = st["mean"], st["std"]
    if not _finite(mean):
        return "n/a"
    if _is_accuracy(name):
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:.4g} ± {std:.2g}"


def format_markdown(agg: dict, cols: Sequence[dict], best: dict, *, title: str = "", notes: Sequence[str] = (),
                    models: Mapping[str, str] | None = None) -> str:
    """The results table: one row per method, ``mean ± std`` per column (accuracies in %), the best entry
    per ranked column in bold; the header marks the direction (↑ higher is better, ↓ lower is better). With
    ``models`` (``method -> model``, :func:`method_models`) naming more than one model, a ``model`` column follows
    the method."""
    arrow = {"higher": " ↑", "lower": " ↓", None: ""}
    lines = [f"### {title}", ""] if title else []
    lines += list(notes) + ([""] if notes else [])
    show = _several_models(models)
    lines.append("| method | " + ("model | " if show else "") + " | ".join(c["label"] + arrow[c["direction"]]
                                                                        for c in cols) + " |")
    lines.append("|---|" + ("---|" if show else "") + "---|" * len(cols))
    for method in agg:
        cells = [models.get(method, "")] if show else []
        for c in cols:
            text = _cell_text(c["name"], agg[method][c["name"]])
            cells.append(f"**{text}**" if method in best.get(c["name"], ()) else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Which columns a terminal shows first when they do not all fit (see lcnn_jax.tables.priority_order): accuracy,
# one robust accuracy, input smoothness, then the other robustness columns, sharpness and cost.
COMPACT_PRIORITY = ("test_accuracy", ("apgd_l2_*", "pgd_l2_*", "apgd_linf_*", "pgd_linf_*"), "curvature",
                    "jacobian_frobenius", "apgd_*", "pgd_*", "certified_l2_*", "noise_*", "local_lipschitz",
                    "hessian_trace", "minimum_sharpness", "train_time_s")


def compact_priority(cols: Sequence[dict]) -> list[int]:
    """Column indices (of ``cols``) in :data:`COMPACT_PRIORITY` order, then the others in table order."""
    from lcnn_jax.tables import priority_order

    return priority_order([c["name"] for c in cols], COMPACT_PRIORITY)


def format_compact(agg: dict, cols: Sequence[dict], best: dict, *, width: int = 120,
                   models: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """The results table for a terminal: one row per method, ``mean ± std`` (accuracies in %), ``*`` after the best
    mean of a ranked column, limited to the columns that fit ``width`` characters (chosen by
    :func:`compact_priority`); returns the text and the labels of the columns left out (they are in
    ``results.md`` / ``results.csv`` / ``results.json``). A ``model`` column follows the method where ``models``
    names more than one model (as in :func:`format_markdown`)."""
    from lcnn_jax.tables import format_table

    arrow = {"higher": "↑", "lower": "↓", None: ""}
    lead = ["method", "model"] if _several_models(models) else ["method"]
    header = lead + [f"{c['label']}{' %' if _is_accuracy(c['name']) else ''} {arrow[c['direction']]}".strip()
                     for c in cols]
    rows = []
    for method in agg:
        row = [method] + ([models.get(method, "")] if len(lead) > 1 else [])
        for c in cols:
            text = _cell_text(c["name"], agg[method][c["name"]])
            row.append(text + ("*" if method in best.get(c["name"], ()) else " "))
        rows.append(row)
    k = len(lead)
    priority = list(range(k)) + [i + k for i in compact_priority(cols)]
    text, hidden = format_table(header, rows, fixed=k, priority=priority, width=width)
    return text, [cols[i - k]["label"] for i in hidden]


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if (isinstance(v, float) and not math.isfinite(v)) else v for v in r])
    return buf.getvalue()


def write_results(workdir: str, cells: Sequence[dict], cols: Sequence[dict], methods: Sequence[str], *,
                  meta: dict) -> dict:
    """Write ``results.csv``, ``results_summary.csv``, ``results.json`` and ``results.md`` (atomically) and
    return the JSON object."""
    from lcnn_jax.io import write_json_atomic, write_text_atomic

    names = [c["name"] for c in cols]
    agg = aggregate(cells, names, methods)
    best = best_methods(agg, cols)
    write_text_atomic(os.path.join(workdir, "results.csv"), _csv_text(
        ["method", "seed", "member", "diverged"] + names,
        [[c["method"], c["seed"], c.get("member", ""), int(bool(c.get("diverged")))]
         + [c.get(n, math.nan) for n in names]
         for c in cells]))
    write_text_atomic(os.path.join(workdir, "results_summary.csv"), _csv_text(
        ["method", "num_seeds"] + [f"{n}_{s}" for n in names for s in ("mean", "std")],
        [[m, sum(1 for c in cells if c["method"] == m and not c.get("diverged"))]
         + [agg[m][n][s] for n in names for s in ("mean", "std")] for m in methods]))
    obj = {"columns": list(cols), "methods": list(methods), "cells": list(cells), "aggregate": agg, "best": best,
           **meta}
    write_json_atomic(os.path.join(workdir, "results.json"), _json_safe(obj))
    notes = meta.get("notes", ())
    write_text_atomic(os.path.join(workdir, "results.md"),
                       format_markdown(agg, cols, best, title=meta.get("title", ""), notes=notes,
                                       models=meta.get("models")))
    return obj


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")


def axis_label(name: str, cols: Sequence[dict]) -> str:
    """A readable axis label of a metric column: ``pgd_l2_1`` -> ``"PGD-L2 ε=1 accuracy (%)"``,
    ``curvature`` -> ``"input curvature |λ| / (‖g‖ + 1e-6), test mean"``; other columns keep their table label."""
    for prefix, text in (("pgd_linf_", "PGD-L∞ ε={} accuracy (%)"), ("pgd_l2_", "PGD-L2 ε={} accuracy (%)"),
                         ("apgd_linf_", "APGD-L∞ ε={} accuracy (%)"), ("apgd_l2_", "APGD-L2 ε={} accuracy (%)"),
                         ("certified_l2_", "certified L2 ε={} accuracy (%)"),
                         ("noise_", "Gaussian-noise σ={} accuracy (%)")):
        if name.startswith(prefix):
            return text.format(name[len(prefix):])
    fixed = {"test_accuracy": "test accuracy (%)", "train_accuracy": "training accuracy (%)",
             "clean_accuracy": "clean accuracy, measured test subset (%)",
             "curvature": "input curvature |λ| / (‖g‖ + 1e-6), test mean",
             "jacobian_frobenius": "input-Jacobian norm ‖J‖_F, test mean",
             "hessian_norm": "input-Hessian norm |λ|, test mean", "grad_norm": "loss-gradient norm ‖g‖, test mean",
             "local_lipschitz": "local Lipschitz estimate, test mean",
             "gradient_stability": "gradient stability (cosine), test mean"}
    if name in fixed:
        return fixed[name]
    return next((c["label"] for c in cols if c["name"] == name), name)


def _plain_log_ticks(lo: float, hi: float) -> list[float]:
    """Tick positions for a log axis on [lo, hi], to be written as plain numbers: 1-2-5 per decade, or finer
    multiples when the range is narrow, or powers of ten when it is wide; 3 to 8 ticks where possible."""
    from matplotlib import ticker

    e0, e1 = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    best: list = []
    for mults in ((1, 2, 5), (1, 2, 3, 5), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9), (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7,
                                                                8, 9), (1,)):
        ticks = [m * 10.0 ** e for e in range(e0, e1 + 1) for m in mults if lo <= m * 10.0 ** e <= hi]
        if 3 <= len(ticks) <= 8:
            return ticks
        if len(best) < len(ticks) <= 8:
            best = ticks
    if len(best) >= 2:
        return best
    if hi / lo < 10:  # narrower than the multiples above: evenly spaced round numbers
        return [float(t) for t in ticker.MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
                if lo <= t <= hi]
    ticks = [10.0 ** e for e in range(e0, e1 + 1) if lo <= 10.0 ** e <= hi]
    while len(ticks) > 8:
        ticks = ticks[::2]
    return ticks


def _format_tick(v: float) -> str:
    return f"{v:.6g}" if 1e-4 <= abs(v) < 1e6 else f"{v:.0e}"


def _overlaps(a, b) -> bool:
    return not (a[2] < b[0] or a[0] > b[2] or a[3] < b[1] or a[1] > b[3])


def _place_labels(fig, ax, points: Sequence[dict], fontsize: float) -> list:
    """Label every point with its method name beside it: the nearest position (right or left, then moved up or
    down, with a leader line) whose box overlaps no other label, no marker and no error bar. ``points`` hold
    ``name, x, y, color`` (data coordinates), ``size`` (marker size, points) and ``xerr``/``yerr``."""
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    to_px = ax.transData.transform
    axes_box = ax.get_window_extent(renderer)
    obstacles = []
    for p in points:
        px, py = to_px((p["x"], p["y"]))
        r = 0.5 * p["size"] * px_per_pt + 2
        obstacles.append((px - r, py - r, px + r, py + r))
        if p["xerr"]:
            (x0, _), (x1, _) = to_px((max(p["x"] - p["xerr"], 1e-300), p["y"])), to_px((p["x"] + p["xerr"], p["y"]))
            obstacles.append((x0, py - 2, x1, py + 2))
        if p["yerr"]:
            (_, y0), (_, y1) = to_px((p["x"], p["y"] - p["yerr"])), to_px((p["x"], p["y"] + p["yerr"]))
            obstacles.append((px - 2, y0, px + 2, y1))
    placed, texts = [], []
    for p in sorted(points, key=lambda q: -to_px((q["x"], q["y"]))[1]):  # top to bottom: clusters stack in order
        px, py = to_px((p["x"], p["y"]))
        probe = ax.text(0, 0, p["name"], fontsize=fontsize)
        w, h = probe.get_window_extent(renderer).width + 4, probe.get_window_extent(renderer).height + 2
        probe.remove()
        gap = 0.5 * p["size"] * px_per_pt + 4
        # Candidates nearest first: right, left, above, below the marker, then right/left moved up or down.
        cands = [(px + gap, py, "left"), (px - gap, py, "right"), (px, py + gap + h / 2, "center"),
                 (px, py - gap - h / 2, "center")]
        cands += [(px + side * gap, py + sign * k * h, "left" if side == 1 else "right")
                  for k in range(1, 16) for sign in (1, -1) for side in (1, -1)]
        best = None
        for ax_x, ax_y, ha in cands:
            left = {"left": ax_x, "right": ax_x - w, "center": ax_x - w / 2}[ha]
            box = (left, ax_y - h / 2, left + w, ax_y + h / 2)
            inside = (box[0] >= axes_box.x0 and box[2] <= axes_box.x1 and box[1] >= axes_box.y0
                      and box[3] <= axes_box.y1)
            if inside and not any(_overlaps(box, o) for o in placed + obstacles):
                best = (box, ax_x, ax_y, ha)
                break
        if best is None:  # no free place inside the axes: right of the point, possibly overlapping
            best = ((px + gap, py - h / 2, px + gap + w, py + h / 2), px + gap, py, "left")
        box, ax_x, ax_y, ha = best
        placed.append(box)
        near = abs(ax_y - py) <= gap + h / 2 + 1e-6
        texts.append(ax.annotate(
            p["name"], (p["x"], p["y"]), xytext=((ax_x - px) / px_per_pt, (ax_y - py) / px_per_pt),
            textcoords="offset points", fontsize=fontsize, color=p["color"], ha=ha, va="center", zorder=20,
            bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.85),
            arrowprops=None if near else dict(arrowstyle="-", color=p["color"], lw=0.6, shrinkA=0, shrinkB=2)))
    return texts


def scatter_figure(agg: Mapping, cols: Sequence[dict], xname: str, yname: str, *, title: str,
                   subtitle: str = "", models: Mapping[str, str] | None = None):
    """One point per method at (mean of ``xname``, mean of ``yname``) over seeds, seed standard deviations as
    error bars, log x axis with plain tick labels. Methods get distinct marker shapes and decreasing marker
    sizes (so coinciding points show as nested outlines) and a direct label placed clear of the other labels
    and markers; the legend sits outside the axes. Accuracies are plotted in %. Where ``models``
    (``method -> model``) names more than one model, each label says ``method (model)``. Returns the Matplotlib
    figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(8.0, 4.8), dpi=120)
    scale = 100.0 if _is_accuracy(yname) else 1.0
    points = []
    n = len(agg)
    label = (lambda m: f"{m} ({models.get(m, '?')})") if _several_models(models) else (lambda m: m)  # noqa: E731
    for i, method in enumerate(agg):
        x, y = agg[method][xname], agg[method][yname]
        if not (_finite(x["mean"]) and _finite(y["mean"]) and x["mean"] > 0):
            continue
        color = f"C{i % 10}"
        # Drawn in order, each smaller than the one before: coinciding points show as nested outlines.
        size = 12.0 - 6.0 * i / max(n - 1, 1)
        xerr = float(x["std"]) if _finite(x["std"]) else 0.0
        yerr = scale * float(y["std"]) if _finite(y["std"]) else 0.0
        ax.errorbar(x["mean"], scale * y["mean"], xerr=xerr or None, yerr=yerr or None,
                    fmt=_MARKERS[i % len(_MARKERS)], markersize=size, markerfacecolor="none", markeredgewidth=1.5,
                    color=color, ecolor=color, elinewidth=0.9, alpha=0.9, capsize=2.5, label=label(method),
                    zorder=2 + i)
        points.append({"name": label(method), "x": x["mean"], "y": scale * y["mean"], "color": color, "size": size,
                       "xerr": xerr, "yerr": yerr})
    ax.set_xscale("log")
    ax.set_xlabel(f"{axis_label(xname, cols)} (log scale; lower is smoother)")
    ax.set_ylabel(axis_label(yname, cols))
    ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    if subtitle:
        ax.set_title(subtitle, fontsize=8, color="0.3")
    if points:
        ax.margins(x=0.15, y=0.12)
        ax.autoscale_view()
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(ticker.FixedLocator(_plain_log_ticks(lo, hi)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _format_tick(v)))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, title="method",
                  title_fontsize=8, frameon=False)
        fig.tight_layout()
        fig.canvas.draw()
        _place_labels(fig, ax, points, fontsize=7.5)
    else:
        ax.text(0.5, 0.5, "no finite values to plot", transform=ax.transAxes, ha="center", va="center")
        fig.tight_layout()
    return fig


def _run_title(workdir: str) -> tuple[str, str]:
    """The run's name (its directory) and, when ``results.json`` is there, the run's description line."""
    name = os.path.basename(os.path.abspath(workdir)) or workdir
    try:
        with open(os.path.join(workdir, "results.json")) as fh:
            desc = str(json.load(fh).get("title", ""))
    except (OSError, ValueError):
        desc = ""
    return name, desc.removeprefix("lcnn-jax compare: ")


def plot_results(workdir: str, agg: dict, cols: Sequence[dict], *, robust_column: str,
                 title: str | None = None, models: Mapping[str, str] | None = None) -> list[str]:
    """``figures/accuracy_vs_curvature.png`` (test accuracy against input curvature) and
    ``figures/robustness_vs_jacobian.png`` (``robust_column`` against the Jacobian Frobenius norm), drawn by
    :func:`scatter_figure`; the title names the run (``title``, else the workdir's name) and the subtitle
    describes it (dataset, model(s), seeds, epochs, from ``results.json``); ``models`` as in
    :func:`scatter_figure`. Returns the paths written."""
    from lcnn_jax.io import save_figure_atomic

    names = {c["name"] for c in cols}
    if robust_column not in names:
        robust_column = next((c["name"] for prefix in ("apgd_", "pgd_") for c in cols if c["name"].startswith(prefix)),
                             "clean_accuracy")
    run, desc = _run_title(workdir)
    run = title or run
    os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
    paths = []
    for fname, xname, yname, what in (
            ("accuracy_vs_curvature.png", "curvature", "test_accuracy", "test accuracy vs input curvature"),
            ("robustness_vs_jacobian.png", "jacobian_frobenius", robust_column,
             f"{axis_label(robust_column, cols).removesuffix(' (%)')} vs Jacobian norm")):
        fig = scatter_figure(agg, cols, xname, yname, title=f"{run}: {what}", subtitle=desc, models=models)
        paths.append(save_figure_atomic(fig, os.path.join(workdir, "figures", fname), bbox_inches="tight"))
    return paths


# ----------------------------------------------------------------------------------------------------------
# The command


def _measure_config(cmp):
    from lcnn_jax import report
    from lcnn_jax.errors import ConfigError

    mcfg = report.measure_defaults()
    if cmp.get("measure"):
        try:
            mcfg.update(_to_dict(cmp.measure))  # plain values: FieldReferences cannot update FieldReferences
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
    cmp = _section(config)
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
    measure_fp = _measure_fingerprint(cmp)

    cells, timing, measurers = [], {}, {}
    bar = tqdm(total=2 * len(methods), desc="compare", unit="phase", disable=not cmp.get("progress", True),
               dynamic_ncols=True)
    try:
        for method in methods:
            mc = cfgs[method]
            train_fp = _training_fingerprint(mc)
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
                arch = fingerprint(_to_dict(mc.model), sharp)
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
                    write_json_atomic(path, _json_safe(cell))
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
    trained = (models_title(models) if _several_models(models)
               else f"{models[methods[0]]} {_to_dict(mc0.model.get('kwargs'))}")  # each method's own model
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
    if _several_models(models):
        by_model: dict[str, list[str]] = {}
        for m in methods:
            by_model.setdefault(f"{cfgs[m].model.name} {_to_dict(cfgs[m].model.get('kwargs'))}", []).append(m)
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
