"""What a training run builds from its config before the first step: data, model, regularizers, optimizer, steps.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.errors import ConfigError
from lcnn_jax.regularizers.base import Regularizer
from lcnn_jax.train.distributed import data_mesh, maybe_initialize_distributed
from lcnn_jax.train.state import make_eval_step, make_optimizer, make_train_step
from lcnn_jax.types import Batch, PyTree

__all__ = ["build_regularizers", "check_regularizers_fit_model", "RunSetup", "prepare_run", "check_model_fits_data",
           "data_augmentation"]


def data_augmentation(dcfg):
    """The augmentation ``(key, images) -> images`` that ``config.data`` asks for, or None: ``augment=True``
    (CIFAR's random crop with 4-pixel padding and horizontal flip, :func:`lcnn_jax.data.augment_cifar`) or
    ``translate=k`` (random translation by up to ``k`` pixels, no flip: :func:`lcnn_jax.data.augment_translate`).
    Raises :class:`lcnn_jax.errors.ConfigError` for a bad ``translate`` or both at once."""
    import functools

    from lcnn_jax import data as data_lib

    translate = dcfg.get("translate", 0) or 0
    if isinstance(translate, bool) or not isinstance(translate, (int, np.integer)) or translate < 0:
        raise ConfigError(f"data.translate must be a non-negative integer (pixels), got {translate!r}; "
                          "e.g. --config.data.translate=2.")
    if translate and dcfg.get("augment", False):
        raise ConfigError("data.augment (crop + flip) and data.translate are two augmentations; set one of them.")
    if translate:
        return functools.partial(data_lib.augment_translate, pad=int(translate))
    return data_lib.augment_cifar if dcfg.get("augment", False) else None


def training_split(dcfg, train, test):
    """The examples to train on, as ``config.data.train_split`` says: ``"train"`` (the default) or ``"train+test"``,
    both splits of ``mnist5k`` (5000 images instead of 4000). The second is for runs evaluated on another set, such
    as the certified runs judged on the official MNIST test set, which shares no image with mnist5k; the run's own
    "test" figures are then figures on training images. Refused for every other dataset, whose test split is the
    one results are reported on (:func:`lcnn_jax.configs.check_train_split`)."""
    from lcnn_jax import data as data_lib
    from lcnn_jax.configs import check_train_split

    if check_train_split(dcfg) == "train":
        return train
    return data_lib.Split(np.concatenate([train.images, test.images]), np.concatenate([train.labels, test.labels]))


def build_regularizers(reg_cfg, info, pool_images: np.ndarray | None = None) -> list[Regularizer]:
    """Regularizers from ``config.regularizers`` (a dict ``name -> kwargs``), in key order. ``pool_images``
    (held-out training images, see ``data.pair_pool_size``) go to CLIP as its pair pool."""
    from lcnn_jax import regularizers as regs

    out = []
    for name, kwargs in (reg_cfg or {}).items():
        kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else (kwargs or {}))
        if name == "clip" and pool_images is not None:
            kwargs.setdefault("pool_images", pool_images)
        try:
            out.append(regs.make_regularizer(name, dataset_info=info, **kwargs))
        except ValueError as e:
            raise ConfigError(f"regularizers.{name}: {e}") from e
    return out


def check_regularizers_fit_model(regularizers: Sequence[Regularizer], abstract_params: PyTree, sample: Batch, *,
                                 model_name: str, names: Sequence[str] | None = None) -> None:
    """Run every regularizer's ``init`` on the model's parameter shapes (``jax.eval_shape``: a trace, no
    compilation), so a regularizer that needs another model (``regularizers.lcnn`` needs the ``log_beta`` /
    ``log_gamma`` leaves of an ``lcnn_*`` model) is refused before any training.

    Raises:
      ConfigError: naming the regularizer (its config key in ``names``), the model and the regularizer's reason.
    """
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
    names = [r.name for r in regularizers] if names is None else list(names)
    for name, reg in zip(names, regularizers):
        try:
            jax.eval_shape(lambda p, r=reg: r.init(jax.random.PRNGKey(0), p, sample), params)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"regularizers.{name} cannot be used with model.name={model_name!r}: {e}") from e


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """Everything a training run builds from its config before the first step (shared by :func:`fit` and
    :func:`lcnn_jax.train.fit_sweep`, so a sweep member is set up exactly like a single run).

    Attributes:
      info, train, test: the dataset description and its (possibly subset) splits, in host memory.
      model, regularizers, tx, schedule: the Flax model, the regularizer list, the optax optimizer and its schedule.
      mesh: the one-axis ``("data",)`` mesh over every device.
      batch_size, local_bs: the global batch and this process's share of it.
      steps_per_epoch, total_steps: the loop's length (``train.num_steps`` or ``num_epochs * steps_per_epoch``).
      sample: the first global batch, for initialisation (the same in every process).
      step_fn: the un-jitted ``step(state, batch) -> (state, metrics)`` (with the configured augmentation, see :func:`data_augmentation`).
      eval_fn: the un-jitted ``eval_step(state, batch) -> {"loss_sum", "correct", "count"}``.
    """

    info: Any
    train: Any
    test: Any
    model: Any
    regularizers: tuple
    tx: Any
    schedule: Any
    mesh: Any
    batch_size: int
    local_bs: int
    steps_per_epoch: int
    total_steps: int
    sample: Any
    step_fn: Any
    eval_fn: Any


def prepare_run(config) -> RunSetup:
    """Validate ``config``, load the data, build model, regularizers, optimizer and the step functions.

    Raises:
      ConfigError: a bad configuration value (message names the key).
      lcnn_jax.data.DatasetError: the dataset cannot be found.
    """
    from lcnn_jax import data as data_lib
    from lcnn_jax.configs import validate_config
    from lcnn_jax.nn import make_model

    validate_config(config)
    maybe_initialize_distributed()
    dcfg, tcfg = config.data, config.train
    augment = data_augmentation(dcfg)  # checked before any data is loaded (data.train_split: by validate_config)
    info = data_lib.dataset_info(dcfg.name)
    train = data_lib.load_split(dcfg.name, "train", data_dir=dcfg.get("data_dir"), download=dcfg.get("download", False))
    test = data_lib.load_split(dcfg.name, "test", data_dir=dcfg.get("data_dir"), download=dcfg.get("download", False))
    train = training_split(dcfg, train, test)
    if dcfg.get("train_size"):
        try:
            train = data_lib.subset(train, int(dcfg.train_size), seed=int(dcfg.get("subset_seed", 0)))
        except ValueError as e:
            raise ConfigError(f"data.train_size={dcfg.train_size}: {e}") from e
    pool = None
    if dcfg.get("pair_pool_size"):  # held out of training (CLIP's pair pool), never trained on
        try:
            train, held = data_lib.holdout(train, int(dcfg.pair_pool_size), seed=int(dcfg.get("subset_seed", 0)))
        except ValueError as e:
            raise ConfigError(f"data.pair_pool_size={dcfg.pair_pool_size}: {e}") from e
        pool = held.images

    mesh = data_mesh()
    batch_size = int(tcfg.batch_size)
    if batch_size % mesh.devices.size:
        raise ConfigError(f"train.batch_size={batch_size} must be divisible by the {mesh.devices.size} devices; "
                          f"use a multiple of {mesh.devices.size}.")
    if batch_size > len(train.images):
        raise ConfigError(f"train.batch_size={batch_size} exceeds the {len(train.images)} training examples.")
    local_bs = batch_size // jax.process_count()
    steps_per_epoch = len(train.images) // batch_size
    total_steps = int(tcfg.get("num_steps") or int(tcfg.num_epochs) * steps_per_epoch)

    model = make_model(config.model.name, info.num_classes, **dict(config.model.get("kwargs", {}) or {}))
    regularizers = build_regularizers(config.get("regularizers"), info, pool_images=pool)
    # The first global batch, in every process: a regularizer whose init draws from it (CLIP without a pair pool)
    # starts from the same state whatever the number of processes.
    sample = {"image": train.images[:batch_size], "label": train.labels[:batch_size]}
    abstract_params = check_model_fits_data(model, config.model, sample["image"], info, dcfg.name)
    check_regularizers_fit_model(regularizers, abstract_params, sample, model_name=config.model.name,
                                 names=list((config.get("regularizers") or {}).keys()))
    tx, schedule = make_optimizer(config.optim, total_steps, abstract_params)

    step_fn = make_train_step(model, regularizers)
    if augment is not None:
        base_step = step_fn

        def step_fn(st, b):  # augmentation inside the compiled step, keyed by the step
            k = jax.random.fold_in(jax.random.fold_in(st.rng, st.step), 10_007)
            return base_step(st, {**b, "image": augment(k, b["image"])})

    return RunSetup(info=info, train=train, test=test, model=model, regularizers=tuple(regularizers), tx=tx,
                    schedule=schedule, mesh=mesh, batch_size=batch_size, local_bs=local_bs,
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps, sample=sample, step_fn=step_fn,
                    eval_fn=make_eval_step(model))


def check_model_fits_data(model, model_cfg, images: np.ndarray, info, data_name: str) -> PyTree:
    """Trace (no compilation) ``model.init`` and an evaluation-mode ``model.apply`` on ``images`` and return the
    abstract params; raise :class:`ConfigError` when the model cannot take these images, cannot run in
    evaluation mode (e.g. it updates ``batch_stats`` there: it needs a ``train`` argument), or does not return
    logits of shape ``(B, num_classes)``. Catches before any compilation what would otherwise fail deep inside
    the first jitted step."""
    from lcnn_jax.nn import mode_kwargs

    eval_kw = mode_kwargs(model, train=False)
    x = jnp.asarray(images)
    what = (f"model.name={model_cfg.name!r} with model.kwargs={dict(model_cfg.get('kwargs', {}) or {})}")

    def init_and_apply(k):
        variables = model.init(k, x, **eval_kw)
        return variables, model.apply(variables, x, **eval_kw)

    try:
        variables, out = jax.eval_shape(init_and_apply, jax.random.PRNGKey(0))
    except Exception as e:  # the user's model raised: its own message, once, no traceback  # noqa: BLE001
        hint = ("" if eval_kw else " A model with batch statistics or dropout needs a `train` argument in its "
                "__call__ (e.g. nn.BatchNorm(use_running_average=not train)), which the library sets.")
        mode = ", ".join(f"{k}={v}" for k, v in eval_kw.items()) or "its __call__ has no train argument"
        raise ConfigError(f"{what} cannot run on {data_name} images {tuple(info.image_shape)} in evaluation mode "
                          f"({mode}): {type(e).__name__}: {e}.{hint} Change model.kwargs or the model.") from None
    want = (x.shape[0], int(info.num_classes))
    if not hasattr(out, "shape") or tuple(out.shape) != want or not jnp.issubdtype(out.dtype, jnp.floating):
        got = f"shape {tuple(out.shape)} {out.dtype}" if hasattr(out, "shape") else f"a {type(out).__name__}"
        raise ConfigError(f"{what} returns {got} for a batch of {want[0]} {data_name} images; the library needs "
                          f"logits of shape {want} ({info.num_classes} classes). A model's factory gets "
                          f"num_classes= when it takes that argument (a field of the module).")
    return variables["params"]
