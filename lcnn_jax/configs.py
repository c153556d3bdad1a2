"""Configs as data: the default training config, loading ``get_config()`` files, ``--config.a.b=value``
overrides, and validation with messages that name the key and the fix.

An experiment config file defines ``get_config(arg=None)`` returning an ``ml_collections.ConfigDict``,
usually :func:`default_config` with a few fields changed (the big_vision / Flax-examples convention)::

    # experiments/configs/my_run.py
    from lcnn_jax.configs import default_config

    def get_config(arg=None):
        config = default_config()
        config.model.name = "lenet"
        return config

A file can take an argument after a colon: ``--config experiments/configs/ablate.py:datagrad``.
"""
from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import math
import os

import ml_collections

from lcnn_jax.errors import ConfigError


def default_config() -> ml_collections.ConfigDict:
    """Every key the training loop reads, with its default. See the README for what each one means."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        name="mnist5k",  # mnist5k | mnist | fashion_mnist | cifar10 | cifar100
        data_dir=ml_collections.FieldReference(None, field_type=str),
        download=False,  # let TFDS download + prepare (needs network and the tfds-prepare extra)
        augment=False,  # random crop (pad 4) + horizontal flip, for CIFAR
        translate=0,  # random translation by up to this many pixels, zero fill, no flip (digits); 0: off
        # train | train+test: mnist5k's two splits (5000 images), for runs evaluated on another set (certify)
        train_split="train",
        train_size=ml_collections.FieldReference(None, field_type=int),  # stratified subset of the train split
        subset_seed=0,
        pair_pool_size=0,  # hold out this many training images as CLIP's pair pool (0: pairs from the batches)
    ))
    c.model = ml_collections.ConfigDict(dict(name="small_cnn", kwargs=ml_collections.ConfigDict()))
    c.optim = ml_collections.ConfigDict(dict(
        name="sgd", learning_rate=0.05, momentum=0.9, nesterov=False, weight_decay=0.0,
        wd_exclude=("log_beta", "log_gamma"),
        schedule="cosine", boundaries=(0.75, 0.875), decay_factor=0.1, warmup_steps=0,
        # rescale the gradient to this global norm when larger (optax.clip_by_global_norm); None: no clipping
        clip_grad_norm=ml_collections.FieldReference(None, field_type=float),
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=64,
        num_epochs=10,
        num_steps=ml_collections.FieldReference(None, field_type=int),  # overrides num_epochs when set
        log_every=50,
        eval_every=0,  # 0: evaluate only at the end
        eval_batch_size=500,
        checkpoint_every=500,
        keep_checkpoints=2,
        progress=True,
    ))
    # name -> kwargs of lcnn_jax.regularizers.make_regularizer, e.g. {"datagrad": {"coeff": 1e-3}}
    c.regularizers = ml_collections.ConfigDict()
    # Read by lcnn_jax.train.fit_sweep_from_config / `lcnn-jax sweep` (one vmapped program for seeds x grid points);
    # `fit` ignores it and `lcnn-jax train` refuses a section that asks for more than the config's own run.
    # seeds=() means (seed,). grid: regularizer name -> state key -> values, e.g.
    # --config.sweep.grid.datagrad.coeff="(0.0, 1e-3, 1e-2)". data_order: "per_seed" | "shared".
    c.sweep = ml_collections.ConfigDict(dict(seeds=(), grid=ml_collections.ConfigDict(), data_order="per_seed"))
    return c


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``get_config()`` from a Python file; ``"path.py:arg"`` passes ``arg`` to it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"Config file {path!r} not found. Pass a Python file that defines get_config(), "
                          f"e.g. --config experiments/configs/quickstart.py")
    mod_spec = importlib.util.spec_from_file_location(f"_lcnn_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # a broken config file is a user error, not a crash
        raise ConfigError(f"Could not execute config file {path!r}: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"Config file {path!r} defines no get_config() function.")
    return module.get_config(arg) if arg else module.get_config()


def load_config_module(path: str):
    """Import a config file by path (config files are not a package), e.g. to share a variant's settings
    between two config files: ``load_config_module(os.path.join(os.path.dirname(__file__), "other.py"))``."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"_lcnn_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as `sgd`


# Free-form dictionaries: new keys are allowed there (compare.method_specs: a new method from the command line,
# checked by lcnn_jax.compare.check_methods).
OPEN_SECTIONS = ("regularizers", "model.kwargs", "sweep.grid", "compare.method_specs")


def _is_open(path: str) -> bool:
    return any(path == s or path.startswith(s + ".") for s in OPEN_SECTIONS)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply ``["a.b=value", ...]`` in place. Values are Python literals (``0.1``, ``(64, 64)``, ``None``,
    ``{'coeff': 0.01}``) or bare strings. An unknown key or a value of the wrong type is an error, except inside
    ``regularizers``, ``model.kwargs``, ``sweep.grid`` and ``compare.method_specs``, which are open dictionaries.

    Every override is tried before anything is raised, so one :class:`ConfigError` lists every bad override
    (five typos cost one rerun, not five); the good ones are applied.
    """
    problems = []
    for item in overrides:
        problem = _apply_one(config, item)
        if problem:
            problems.append(problem)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} overrides are invalid:\n  - " + "\n  - ".join(problems))
    return config


def _apply_one(config: ml_collections.ConfigDict, item: str) -> str | None:
    """Apply one ``key=value`` override; return what is wrong with it (None: applied)."""
    key, eq, text = item.partition("=")
    if not eq or not key:
        return f"Override {item!r} is not of the form key=value (e.g. --config.optim.learning_rate=0.1)."
    value = _parse_value(text)
    parts = key.split(".")
    node = config
    for i, name in enumerate(parts):
        here = ".".join(parts[:i + 1])
        if not isinstance(node, ml_collections.ConfigDict):
            return f"Unknown config key {key!r}: {'.'.join(parts[:i])!r} is a value, not a section."
        if name not in node and not _is_open(here):
            return f"Unknown config key {key!r}: {here!r} does not exist. Known keys there: {sorted(node.keys())}."
        if i == len(parts) - 1:
            break
        if name not in node:
            node[name] = ml_collections.ConfigDict()
        node = node[name]
    try:
        node[parts[-1]] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    except (TypeError, ValueError) as e:
        return f"Bad value for {key!r}: {text!r} ({e})."
    return None


def absolute_model_path(name):
    """``"dir/models.py:Net"`` with the file's absolute path when it is relative and exists from the current
    directory; any other name unchanged."""
    if not isinstance(name, str) or ":" not in name:
        return name
    where, _, attr = name.rpartition(":")
    if not where.endswith(".py") or os.path.isabs(os.path.expanduser(where)):
        return name
    path = os.path.abspath(os.path.expanduser(where))
    return f"{path}:{attr}" if os.path.isfile(path) else name


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` in which every model named by a relative file path (``model.name="models.py:Net"``,
    also a compare method's ``model.name``) names the file by its absolute path, so that the ``config.json`` a run
    stores works from any directory (``lcnn-jax measure`` run elsewhere, a notebook). Training calls this before
    it compares or writes a config."""
    config = copy.deepcopy(config)

    def walk(node):
        for key in list(node.keys()):
            child = node[key]
            if isinstance(child, ml_collections.ConfigDict):
                if key == "model" and "name" in child:
                    child.name = absolute_model_path(child.name)
                walk(child)

    walk(config)
    return config


def _model_kwargs_problems(name: str, kwargs, num_classes: int) -> list[str]:
    """Build the model (a dataclass, nothing traced) to check ``model.kwargs``: an unknown key, with the closest
    valid one suggested (``widht`` -> ``width_mult``), or a bad value is reported before any data is loaded.
    A user's model (:func:`lcnn_jax.nn.register_model` or an import path) is built by its own factory, whose
    keywords are checked the same way."""
    from lcnn_jax.nn import is_builtin_model, make_model

    kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else (kwargs or {}))
    if is_builtin_model(name):
        wm = kwargs.get("width_mult", 1.0)  # the model clamps every width to >= 1 channel: check the multiplier
        if isinstance(wm, bool) or not isinstance(wm, (int, float)) or not math.isfinite(wm) or wm <= 0:
            return [f"model.kwargs.width_mult={wm!r} must be a positive number (1.0: the published widths)."]
        for key in ("widths", "stage_sizes"):
            v = kwargs.get(key)
            if v is not None and (not isinstance(v, (list, tuple)) or
                                  not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in v)):
                return [f"model.kwargs.{key}={v!r} must be a tuple of positive integers, e.g. (64, 64)."]
    try:
        make_model(name, num_classes, **kwargs)
    except (ValueError, TypeError) as e:
        valid = _model_keywords(name)
        hints = []
        for key in sorted(set(kwargs) - set(valid)) if valid is not None else ():
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hints.append(f"model.kwargs.{key} is not a setting of {name!r}"
                         + (f" (did you mean model.kwargs.{close[0]}?)" if close else ""))
        if hints:
            return [f"{'; '.join(hints)}. Its settings: {sorted(valid)}."]
        return [f"model.kwargs={kwargs} cannot build {name!r}: {e}"]
    return []


def _model_keywords(name: str) -> list[str] | None:
    """The keywords :func:`lcnn_jax.nn.make_model` accepts for ``name`` (None: any keyword), see
    :func:`lcnn_jax.nn.model_keywords`."""
    from lcnn_jax.nn import model_keywords

    keywords = model_keywords(name)
    return None if keywords is None else list(keywords)


TRAIN_SPLITS = ("train", "train+test")


def check_train_split(dcfg) -> str:
    """``config.data.train_split``, checked (see :func:`lcnn_jax.train.setup.training_split`); raises
    :class:`lcnn_jax.errors.ConfigError` before any data is loaded."""
    choice = dcfg.get("train_split", "train")
    if choice not in TRAIN_SPLITS:
        raise ConfigError(f"data.train_split={choice!r} is unknown; use one of {list(TRAIN_SPLITS)}.")
    if choice == "train+test" and dcfg.name != "mnist5k":
        raise ConfigError(f"data.train_split='train+test' trains on the test split too; it is allowed for mnist5k "
                          f"only (evaluated elsewhere, e.g. on the official MNIST test set), not for "
                          f"data.name={dcfg.name!r}, whose test split is where results are reported. "
                          f"Use data.train_split='train'.")
    return choice


def validate_config(config) -> None:
    """Raise ConfigError naming every problem found in ``config`` (before any data is loaded)."""
    from lcnn_jax import data as data_lib
    from lcnn_jax import regularizers as regs
    from lcnn_jax.nn import resolve_model

    problems = []
    if config.data.name not in data_lib.DATASETS:
        problems.append(f"data.name={config.data.name!r} is unknown; choose one of {list(data_lib.DATASETS)}.")
    try:
        resolve_model(config.model.name)
        model_ok = True
    except ValueError as e:
        problems.append(f"model.name: {e}")
        model_ok = False
    if model_ok and config.data.name in data_lib.DATASETS:
        problems.extend(_model_kwargs_problems(config.model.name, config.model.get("kwargs"),
                                               data_lib.dataset_info(config.data.name).num_classes))
    try:
        check_train_split(config.data)
    except ConfigError as e:
        problems.append(str(e))
    t, o = config.train, config.optim
    if not isinstance(t.batch_size, int) or t.batch_size <= 0:
        problems.append(f"train.batch_size={t.batch_size!r} must be a positive integer.")
    if not t.get("num_steps") and (not isinstance(t.num_epochs, int) or t.num_epochs <= 0):
        problems.append(f"train.num_epochs={t.num_epochs!r} must be a positive integer (or set train.num_steps).")
    if t.get("num_steps") is not None and t.num_steps <= 0:
        problems.append(f"train.num_steps={t.num_steps!r} must be positive.")
    for k in ("log_every", "checkpoint_every", "eval_batch_size"):
        if not isinstance(t.get(k), int) or t.get(k) <= 0:
            problems.append(f"train.{k}={t.get(k)!r} must be a positive integer.")
    if not isinstance(o.learning_rate, (int, float)) or not o.learning_rate > 0:
        problems.append(f"optim.learning_rate={o.learning_rate!r} must be a positive number.")
    if o.name not in ("sgd", "adam", "adamw"):
        problems.append(f"optim.name={o.name!r} is unknown; use 'sgd', 'adam' or 'adamw'.")
    if o.schedule not in ("constant", "piecewise", "cosine"):
        problems.append(f"optim.schedule={o.schedule!r} is unknown; use 'constant', 'piecewise' or 'cosine'.")
    if o.get("weight_decay", 0.0) < 0:
        problems.append(f"optim.weight_decay={o.weight_decay!r} must be >= 0.")
    clip = o.get("clip_grad_norm")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip)
                             or clip <= 0):
        problems.append(f"optim.clip_grad_norm={clip!r} must be a positive number (e.g. 1.0), or None for no "
                        f"clipping.")
    for name in (config.get("regularizers") or {}).keys():
        if name not in regs.REGULARIZERS:
            problems.append(f"regularizers.{name} is unknown; choose among {sorted(regs.REGULARIZERS)}.")
    if problems:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))
