"""The methods of a compare config: their specs, training configs, models, columns and fingerprints.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Sequence


__all__ = ["PIECEWISE_LINEAR_MODELS", "SHARPNESS_MODES", "columns", "compare_section", "check_methods",
           "SPEC_SECTIONS", "apply_compare_overrides", "to_dict", "method_config", "method_models", "models_title",
           "several_models", "is_piecewise_linear", "fingerprint", "training_fingerprint", "measure_fingerprint"]



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


def compare_section(config):
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

    cmp = compare_section(config)
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
    spec = compare_section(config).method_specs[name]
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
                        regs.make_regularizer(reg, dataset_info=info, **to_dict(value[reg]))
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

    cmp = compare_section(config)
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


def to_dict(node):
    return node.to_dict() if hasattr(node, "to_dict") else dict(node or {})


def method_config(config, name: str):
    """The training config of method ``name``: the base config (``compare`` and ``sweep`` sections dropped)
    with ``config.compare.method_specs[name]`` applied: ``model`` replaced when the spec names a model (its
    kwargs merged over nothing, so an LCNN variant does not inherit ``act='relu'``), ``regularizers``
    replaced, every other section merged key by key."""
    import ml_collections

    from lcnn_jax.errors import ConfigError

    specs = compare_section(config).method_specs
    if name not in specs:
        raise ConfigError(f"unknown method {name!r}; choose among {list(specs.keys())}.")
    spec = to_dict(specs[name])
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
    kwargs = {m: to_dict(c.model.get("kwargs")) for m, c in cfgs.items()}
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


def several_models(models: Mapping[str, str] | None) -> bool:
    return bool(models) and len(set(models.values())) > 1


def is_piecewise_linear(method_cfg) -> bool:
    """True when the method's model is a chain of dense/conv/pool layers with a ReLU or identity activation,
    no normalisation and no output activation (where minimum sharpness is exact, SPEC 1.5)."""
    m = method_cfg.model
    kw = to_dict(m.get("kwargs"))
    return (m.name in PIECEWISE_LINEAR_MODELS and kw.get("act", "relu") in ("relu", "identity")
            and kw.get("norm") in (None, "none") and kw.get("output_activation") is None)


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (configs as dicts): identifies what a cell or run computed."""
    text = json.dumps([to_dict(p) if hasattr(p, "to_dict") else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def training_fingerprint(method_cfg) -> str:
    cfg = method_cfg.to_dict()
    cfg["train"] = {k: v for k, v in cfg["train"].items() if k != "progress"}
    if cfg.get("optim", {}).get("clip_grad_norm") is None:  # added later; unset = how older runs trained
        cfg["optim"] = {k: v for k, v in cfg["optim"].items() if k != "clip_grad_norm"}
    return fingerprint(cfg)


def measure_fingerprint(cmp) -> dict:
    m = {k: v for k, v in to_dict(cmp.measure).items() if k != "progress"}
    return {"measure": m, "sharpness": cmp.sharpness, "test_data": cmp.get("test_data"),
            "test_data_dir": cmp.get("test_data_dir")}
