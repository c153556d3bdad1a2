"""Models for the five studies: MLPs, LeNet, the CLIP small CNN, CIFAR ResNet-18 and VGG-11.

Every model is a Flax linen module with ``__call__(self, x, train: bool = False) -> logits``; ``x`` is
NHWC ``(B, H, W, C)`` float32 (MLPs flatten it). Activation, normalisation, convolution, dense layers
and the ResNet block are *factories* (see :mod:`lcnn_jax.nn.layers` for the protocol), so LCNN's
layers plug in without copying a model. Each site gets its own module, named after its place
(``conv1``, ``act1``, ``norm1``, ``stage2_block0``, ``head`` ...).

Convolutions are bias-free when a norm follows them (its shift replaces the bias) and carry a bias
when ``norm=None``; dense layers always carry a bias.

Example::

    import jax, jax.numpy as jnp
    from lcnn_jax.nn.models import make_model
    net = make_model("resnet18", num_classes=100, act="softplus", act_kwargs={"beta": 10.0})
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    logits, upd = net.apply(variables, jnp.zeros((8, 32, 32, 3)), train=True, mutable=["batch_stats"])
    logits_eval = net.apply({"params": variables["params"], **upd}, jnp.zeros((8, 32, 32, 3)))

Cost: one forward pass per call; nothing iterates.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from lcnn_jax import loops
from lcnn_jax.nn.layers import (
    Activation,
    BatchNorm,
    Conv,
    Dense,
    ModuleFactory,
    POOLS,
    pool2d,
    resolve_activation,
    resolve_norm,
)
from lcnn_jax.nn import lcnn as _lcnn  # lcnn and lipschitz import only layers (and lcnn): no cycle
from lcnn_jax.nn import lipschitz as _lipschitz
from lcnn_jax.types import Array

VGG11_CFG: Tuple[Union[int, str], ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _scaled(channels: int, width_mult: float) -> int:
    """Channel count times the width multiplier, rounded, at least 1."""
    return max(1, int(round(channels * width_mult)))


def _check_images(x: Array, model: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{model} expects NHWC images of shape (B, H, W, C), got shape {x.shape}; "
                         "add a batch axis with x[None] for a single image")


def _check_spatial(x: Array, model: str, needed: str) -> None:
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"{model}: the input is too small (feature map became {x.shape[1:3]}); "
                         f"it needs {needed}")


def _conv(factory: ModuleFactory, features: int, kernel: int, stride: int, padding: str,
          use_bias: bool, name: str) -> nn.Module:
    """Builds one conv site with the keyword protocol of :mod:`lcnn_jax.nn.layers`."""
    return factory(features=features, kernel_size=(kernel, kernel), strides=(stride, stride),
                   padding=padding, use_bias=use_bias, name=name)


def _flatten(x: Array) -> Array:
    return x.reshape((x.shape[0], -1))


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Fully connected net: flatten -> [dense(w) -> act] for w in widths -> dense(num_classes) [-> out act].

    ``output_activation`` (a factory or None) is applied after the last layer; the CLIP reference
    applies a sigmoid there. ``MLP(widths=(512, 128, 512))`` is the minimum-sharpness MLP.
    """

    widths: Sequence[int]
    num_classes: int
    act: ModuleFactory = Activation
    dense: ModuleFactory = Dense
    output_activation: Optional[ModuleFactory] = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if x.ndim < 2:
            raise ValueError(f"MLP expects a batch (B, ...), got shape {x.shape}")
        x = _flatten(x)
        for i, w in enumerate(self.widths):
            x = self.dense(features=w, use_bias=True, name=f"dense{i}")(x, train=train)
            x = self.act(name=f"act{i}")(x, train=train)
        x = self.dense(features=self.num_classes, use_bias=True, name="head")(x, train=train)
        if self.output_activation is not None:
            x = self.output_activation(name="out_act")(x, train=train)
        return x


# --------------------------------------------------------------------------------------------
# LeNet and the minimum-sharpness reference variant
# --------------------------------------------------------------------------------------------
class LeNet(nn.Module):
    """LeNet-5: conv6 5x5 -> act -> pool2 -> conv16 5x5 -> act -> pool2 -> fc120 -> act -> fc84 -> act -> fc.

    The first conv is SAME-padded (as in the common MNIST port, ``padding=2``) and the second VALID, so a
    28x28 input gives the classic 16x5x5 = 400 features before ``fc1`` (32x32 gives 16x6x6). All layers
    have biases; max-pool is kept (piecewise linear, Lipschitz 1), ``pool='avg'`` is available.
    """

    num_classes: int = 10
    act: ModuleFactory = Activation
    conv: ModuleFactory = Conv
    dense: ModuleFactory = Dense
    pool: str = "max"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_images(x, "LeNet")
        x = _conv(self.conv, 6, 5, 1, "SAME", True, "conv1")(x, train=train)
        x = pool2d(self.act(name="act1")(x, train=train), self.pool)
        x = _conv(self.conv, 16, 5, 1, "VALID", True, "conv2")(x, train=train)
        x = pool2d(self.act(name="act2")(x, train=train), self.pool)
        _check_spatial(x, "LeNet", "at least 16x16 pixels")
        x = self.dense(features=120, use_bias=True, name="fc1")(_flatten(x), train=train)
        x = self.act(name="act3")(x, train=train)
        x = self.dense(features=84, use_bias=True, name="fc2")(x, train=train)
        x = self.act(name="act4")(x, train=train)
        return self.dense(features=self.num_classes, use_bias=True, name="head")(x, train=train)


class MSLeNet(nn.Module):
    """The "LeNet" of the minimum-sharpness reference code (not LeNet-5).

    conv6 5x5 SAME -> act -> maxpool 2 *stride 1* -> conv16 5x5 VALID -> act -> maxpool 2 ->
    conv120 5x5 VALID -> act -> flatten (120x7x7 on 28x28) -> fc84 -> act -> fc; all with biases.
    Use it to compare against that code's archived sharpness numbers.
    """

    num_classes: int = 10
    act: ModuleFactory = Activation
    conv: ModuleFactory = Conv
    dense: ModuleFactory = Dense

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_images(x, "MSLeNet")
        x = _conv(self.conv, 6, 5, 1, "SAME", True, "conv1")(x, train=train)
        x = pool2d(self.act(name="act1")(x, train=train), "max", window=2, stride=1)
        x = _conv(self.conv, 16, 5, 1, "VALID", True, "conv2")(x, train=train)
        x = pool2d(self.act(name="act2")(x, train=train), "max")
        x = _conv(self.conv, 120, 5, 1, "VALID", True, "conv3")(x, train=train)
        x = self.act(name="act3")(x, train=train)
        _check_spatial(x, "MSLeNet", "at least 24x24 pixels")
        x = self.dense(features=84, use_bias=True, name="fc1")(_flatten(x), train=train)
        x = self.act(name="act4")(x, train=train)
        return self.dense(features=self.num_classes, use_bias=True, name="head")(x, train=train)


# --------------------------------------------------------------------------------------------
# The CLIP small CNN
# --------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """conv32 5x5 -> [norm] -> act -> pool2 -> conv64 5x5 -> [norm] -> act -> pool2 -> fc1024 -> act -> fc.

    Convolutions are SAME-padded (28x28 -> 7x7x64 = 3136 features; 32x32 -> 8x8x64). ``width_mult``
    scales the 32/64/1024 widths; ``pool`` is ``'max'`` (default) or ``'avg'``; ``norm`` (a factory,
    default None) follows each conv.
    """

    num_classes: int = 10
    width_mult: float = 1.0
    act: ModuleFactory = Activation
    conv: ModuleFactory = Conv
    dense: ModuleFactory = Dense
    norm: Optional[ModuleFactory] = None
    pool: str = "max"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_images(x, "SmallCNN")
        for i, c in enumerate((32, 64), start=1):
            x = _conv(self.conv, _scaled(c, self.width_mult), 5, 1, "SAME", self.norm is None,
                      f"conv{i}")(x, train=train)
            if self.norm is not None:
                x = self.norm(name=f"norm{i}")(x, train=train)
            x = pool2d(self.act(name=f"act{i}")(x, train=train), self.pool)
        _check_spatial(x, "SmallCNN", "at least 4x4 pixels")
        x = _flatten(x)
        x = self.dense(features=_scaled(1024, self.width_mult), use_bias=True, name="fc1")(x, train=train)
        x = self.act(name="act3")(x, train=train)
        return self.dense(features=self.num_classes, use_bias=True, name="head")(x, train=train)


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block: ``act(norm(conv3x3(act(norm(conv3x3_s(x))))) + shortcut(x))``.

    The shortcut is the identity, or a strided 1x1 conv + norm when the stride or channel count changes.
    The block protocol (what :class:`ResNet` passes, all by keyword):
    ``block(features=int, strides=int, conv=factory, norm=factory|None, act=factory, name=str)``, then
    ``block(x, train=train)``. An LCNN block with the same constructor is a drop-in. The block's input goes through
    :func:`lcnn_jax.loops.materialize` (the identity; on the CPU it is stored once instead of recomputed in the
    backward pass).
    """

    features: int
    strides: int = 1
    conv: ModuleFactory = Conv
    norm: Optional[ModuleFactory] = BatchNorm
    act: ModuleFactory = Activation

    def _norm(self, x: Array, name: str, train: bool) -> Array:
        return x if self.norm is None else self.norm(name=name)(x, train=train)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        # The input feeds both convolutions' weight gradients and the residual sum: stored once (the identity),
        # since XLA:CPU would otherwise recompute the residual chain of the previous blocks inside the backward pass's
        # transposes (bench_resnet.py's _fused rows, experiments/results/resnet/materialize). The LCNN block gained
        # nothing from it and ran slower, so it does not.
        x = loops.materialize(x)
        bias = self.norm is None
        y = _conv(self.conv, self.features, 3, self.strides, "SAME", bias, "conv1")(x, train=train)
        y = self.act(name="act1")(self._norm(y, "norm1", train), train=train)
        y = _conv(self.conv, self.features, 3, 1, "SAME", bias, "conv2")(y, train=train)
        y = self._norm(y, "norm2", train)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = _conv(self.conv, self.features, 1, self.strides, "SAME", bias,
                             "shortcut_conv")(x, train=train)
            shortcut = self._norm(shortcut, "shortcut_norm", train)
        return self.act(name="act2")(y + shortcut, train=train)


class ResNet(nn.Module):
    """CIFAR-style ResNet: conv3x3 stem (stride 1, no max-pool) -> [norm] -> act -> stages -> GAP -> dense.

    Stage ``i`` has ``stage_sizes[i]`` blocks of width ``64 * 2**i * width_mult``; the first block of
    stages 2-4 has stride 2. ``block`` is a factory following the :class:`BasicBlock` protocol.
    With the defaults (ResNet-18, BatchNorm, 10 classes) there are 11,173,962 parameters, as in the
    PyTorch CIFAR ResNet-18: bias-free convs, BN scale and bias, a 512x10 dense head with bias.
    """

    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width_mult: float = 1.0
    block: ModuleFactory = BasicBlock
    act: ModuleFactory = Activation
    conv: ModuleFactory = Conv
    dense: ModuleFactory = Dense
    norm: Optional[ModuleFactory] = BatchNorm

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_images(x, type(self).__name__)
        x = _conv(self.conv, _scaled(64, self.width_mult), 3, 1, "SAME", self.norm is None,
                  "stem_conv")(x, train=train)
        if self.norm is not None:
            x = self.norm(name="stem_norm")(x, train=train)
        x = self.act(name="stem_act")(x, train=train)
        for i, n_blocks in enumerate(self.stage_sizes):
            for j in range(n_blocks):
                x = self.block(features=_scaled(64 * 2 ** i, self.width_mult),
                               strides=2 if (i > 0 and j == 0) else 1,
                               conv=self.conv, norm=self.norm, act=self.act,
                               name=f"stage{i + 1}_block{j}")(x, train=train)
        x = jnp.mean(x, axis=(1, 2))  # global average pool: Lipschitz 1/sqrt(HW) <= 1
        return self.dense(features=self.num_classes, use_bias=True, name="head")(x, train=train)


class ResNet18(ResNet):
    """:class:`ResNet` with stage sizes (2, 2, 2, 2) (the default)."""


# --------------------------------------------------------------------------------------------
# VGG
# --------------------------------------------------------------------------------------------
class VGG11(nn.Module):
    """CIFAR-style VGG-11: [conv3x3 -> norm -> act] and max-pool per :data:`VGG11_CFG` -> flatten -> dense.

    Channels scale with ``width_mult``. Pooling uses SAME padding, so 32x32 -> 1x1 exactly and 28x28
    MNIST input also works (28 -> 14 -> 7 -> 4 -> 2 -> 1). ``pool='avg'`` swaps in average pooling.
    """

    num_classes: int = 10
    width_mult: float = 1.0
    act: ModuleFactory = Activation
    conv: ModuleFactory = Conv
    dense: ModuleFactory = Dense
    norm: Optional[ModuleFactory] = BatchNorm
    pool: str = "max"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_images(x, "VGG11")
        i = 0
        for c in VGG11_CFG:
            if c == "M":
                x = pool2d(x, self.pool, padding="SAME")
                continue
            i += 1
            x = _conv(self.conv, _scaled(c, self.width_mult), 3, 1, "SAME", self.norm is None,
                      f"conv{i}")(x, train=train)
            if self.norm is not None:
                x = self.norm(name=f"norm{i}")(x, train=train)
            x = self.act(name=f"act{i}")(x, train=train)
        return self.dense(features=self.num_classes, use_bias=True, name="head")(_flatten(x), train=train)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
BLOCKS = {"basic": BasicBlock, "lcnn": _lcnn.LCNNBasicBlock}

_REGISTRY: dict = {
    "mlp": (MLP, {"widths": (64, 64)}),  # the CLIP MNIST net 784-64-64-10
    "ms_mlp": (MLP, {"widths": (512, 128, 512)}),  # minimum-sharpness MLP 784-512-128-512-10
    "lenet": (LeNet, {}),
    "ms_lenet": (MSLeNet, {}),
    "small_cnn": (SmallCNN, {}),
    "resnet18": (ResNet18, {}),
    "vgg11": (VGG11, {}),
    # LCNN variants (SPEC 1.1): centred softplus, true-norm spectral convs/dense, Lipschitz BN, LCNN block.
    "lcnn_small_cnn": (SmallCNN, _lcnn.lcnn_model_kwargs("small_cnn")),
    "lcnn_resnet18": (ResNet18, _lcnn.lcnn_model_kwargs("resnet18")),
    "lcnn_vgg11": (VGG11, _lcnn.lcnn_model_kwargs("vgg11")),
    # 1-Lipschitz by construction (AOL layers, MinMax or centred softplus) with a plain dense head
    **_lipschitz.MODEL_REGISTRY,
}
MODELS: Tuple[str, ...] = tuple(_REGISTRY)  # the built-in names; registered_models() adds the user's


def _fields(cls: type) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))


def make_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Builds a model by name: a built-in (:data:`MODELS`), one registered with :func:`register_model`, or an
    import path ``"package.module:attr"`` / ``"path/to/file.py:attr"`` (see :func:`resolve_model`).

    For the built-ins, ``kwargs`` are the model's fields, with names accepted for the pluggable parts:
    ``act`` = ``'relu' | 'sigmoid' | 'tanh' | 'softplus' | 'identity'`` or a factory (plus ``act_kwargs``,
    e.g. ``{'beta': 10.0}``); ``norm`` = ``'batch' | 'none'``, None or a factory (plus ``norm_kwargs``);
    ``output_activation`` (MLP) = a name or a factory; ``block`` (ResNet) = ``'basic'`` or a factory.
    For the user's models they go to the factory unchanged (lists as tuples, as a config file read back from
    JSON gives lists where the file had tuples); see :func:`register_model`.
    An unknown model name or keyword raises ``ValueError`` listing the valid ones.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if name not in _REGISTRY:
        return _build_user_model(name, resolve_model(name), num_classes, kwargs)
    cls, defaults = _REGISTRY[name]
    fields = set(_fields(cls)) - {"num_classes"}
    valid = set(fields)
    valid |= {"act_kwargs"} if "act" in fields else set()
    valid |= {"norm_kwargs"} if "norm" in fields else set()
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(f"model {name!r} does not accept {unknown}; valid keywords: {sorted(valid)}")

    cfg = {**defaults, **kwargs}
    act_kwargs = cfg.pop("act_kwargs", None)
    norm_kwargs = cfg.pop("norm_kwargs", None)
    if "act" in cfg or act_kwargs:
        cfg["act"] = resolve_activation(cfg.get("act", "relu"), act_kwargs)
    if "norm" in cfg or norm_kwargs:
        cfg["norm"] = resolve_norm(cfg.get("norm", "batch"), norm_kwargs)
    if isinstance(cfg.get("output_activation"), str):
        cfg["output_activation"] = resolve_activation(cfg["output_activation"])
    if isinstance(cfg.get("block"), str):
        if cfg["block"] not in BLOCKS:
            raise ValueError(f"unknown block {cfg['block']!r}; choose one of {tuple(BLOCKS)} "
                             "or pass a block factory")
        cfg["block"] = BLOCKS[cfg["block"]]
    if "pool" in cfg and cfg["pool"] not in POOLS:
        raise ValueError(f"unknown pool {cfg['pool']!r}; choose one of {POOLS}")
    for key in ("widths", "stage_sizes"):
        if key in cfg:
            cfg[key] = tuple(int(w) for w in cfg[key])
    return cls(num_classes=num_classes, **cfg)


# --------------------------------------------------------------------------------------------
# The user's models: a registry by name, import paths, and the train/eval switch
# --------------------------------------------------------------------------------------------
_USER_MODELS: dict = {}
_IMPORTED: dict = {}  # import path -> the object it named (a file is executed once per process)
_log = logging.getLogger(__name__)


def register_model(name: str, factory: Any = None):
    """Make a Flax module usable by name: ``config.model.name = name`` then works in ``fit``, ``lcnn-jax train``,
    ``fit_sweep``, ``compare`` and measurement, as for a built-in model.

    ``factory`` is one of
      * a ``flax.linen.Module`` subclass: built as ``cls(num_classes=..., **model.kwargs)`` when it has a
        ``num_classes`` field, else ``cls(**model.kwargs)``;
      * a function returning a module: called the same way (``num_classes=`` when it takes that argument);
      * a module instance: used as it is (it takes no ``model.kwargs``).

    The module's ``__call__(x)`` takes a batch of NHWC images in [0, 1] and returns logits ``(B, num_classes)``;
    a ``train`` argument is optional (see :func:`mode_kwargs`), and so are mutable collections such as
    ``batch_stats`` (they are updated in training mode). Used without ``factory`` it is a class decorator::

        @register_model("tiny_cnn")
        class TinyCNN(nn.Module): ...

    A registration lives in the Python process that made it: for a run you will measure from the command line
    later, name the model by an import path instead (``"my_package.models:TinyCNN"``), which any process can
    resolve. Built-in names cannot be replaced; registering a name again replaces the earlier factory (with a
    warning, unless it is the same one: re-running a notebook cell is harmless). Returns ``factory``.
    """
    if factory is None:
        return lambda f: register_model(name, f)
    if not isinstance(name, str) or not name.strip() or ":" in name or name != name.strip():
        raise ValueError(f"register_model: the name must be a non-empty string without ':' (':' marks import "
                         f"paths such as 'my_package.models:Net'), got {name!r}.")
    if name in _REGISTRY:
        raise ValueError(f"register_model: {name!r} is a built-in model; choose another name.")
    if not (isinstance(factory, nn.Module) or callable(factory)):
        raise TypeError(f"register_model({name!r}, ...): the factory must be a flax.linen.Module class, a "
                        f"function returning a module, or a module instance, got {type(factory).__name__}.")
    old = _USER_MODELS.get(name)
    if old is not None and old is not factory:
        _log.warning("register_model: %r now names %r (it named %r).", name, factory, old)
    _USER_MODELS[name] = factory
    return factory


def registered_models() -> Tuple[str, ...]:
    """Every name ``make_model`` accepts in this process: the built-ins, then the user's registrations."""
    return MODELS + tuple(_USER_MODELS)


def is_builtin_model(name: str) -> bool:
    """True for the library's own models (:data:`MODELS`), whose keywords are checked and which the compare
    suite knows (e.g. which are piecewise linear)."""
    return name in _REGISTRY


def resolve_model(name: str) -> Any:
    """The factory ``name`` stands for: a registered one (:func:`register_model`), or the object an import
    path names: ``"package.module:attr"`` (importable: installed, on ``PYTHONPATH``, or in the current
    directory) or ``"path/to/file.py:attr"`` (a Python file, executed once per process; a relative path is
    relative to the current directory). Built-in names return their class.

    Raises:
      ValueError: an unknown name, or an import path that cannot be resolved (the message says why and how).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY:
        return _REGISTRY[name][0]
    if name in _USER_MODELS:
        return _USER_MODELS[name]
    if ":" not in name:
        raise ValueError(
            f"unknown model {name!r}; choose one of {registered_models()}, register your own with "
            f"lcnn_jax.nn.register_model({name!r}, MyModule), or give an import path "
            f"'my_package.models:MyModule' or 'path/to/models.py:MyModule'. (A registration lives in the Python "
            f"process that made it.)")
    if name not in _IMPORTED:
        _IMPORTED[name] = _import_attr(name)
    return _IMPORTED[name]


def _import_attr(spec: str) -> Any:
    """The object ``"module:attr"`` or ``"file.py:attr"`` names (``attr`` may be dotted: ``"mod:Outer.Net"``)."""
    import importlib
    import importlib.util
    import os
    import sys

    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ValueError(f"model import path {spec!r} must read 'package.module:Name' or 'path/to/file.py:Name'.")
    if where.endswith(".py"):
        path = os.path.abspath(os.path.expanduser(where))
        if not os.path.isfile(path):
            raise ValueError(f"model import path {spec!r}: the file {path} does not exist.")
        mod_name = f"_lcnn_user_model_{abs(hash(path))}"
        module = sys.modules.get(mod_name)  # "file.py:A" and "file.py:B" share one execution of the file
        if module is None:
            mod_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
            try:
                mod_spec.loader.exec_module(module)
            except Exception as e:  # the user's file failed: say which and why, not a traceback into importlib
                sys.modules.pop(mod_name, None)
                raise ValueError(f"model import path {spec!r}: executing {path} raised {type(e).__name__}: "
                                 f"{e}") from e
    else:
        module = _import_module(spec, where)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise ValueError(f"model import path {spec!r}: {where} has no attribute {attr!r}. It defines "
                             f"{public[:20]}{' ...' if len(public) > 20 else ''}.")
        obj = getattr(obj, part)
    return obj


def _import_module(spec: str, where: str):
    """Import ``where``; as ``python -m`` would, also from the current directory (the ``lcnn-jax`` command's
    own ``sys.path`` does not hold it)."""
    import importlib
    import os
    import sys

    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        top = where.split(".")[0]
        cwd = os.getcwd()
        if e.name != top or cwd in sys.path or not (os.path.exists(os.path.join(cwd, top + ".py"))
                                                     or os.path.isdir(os.path.join(cwd, top))):
            raise ValueError(f"model import path {spec!r}: cannot import {where!r} ({e}). Install the package, "
                             f"add its folder to PYTHONPATH, or give the file: 'path/to/{top}.py:...'.") from None
    except Exception as e:
        raise ValueError(f"model import path {spec!r}: importing {where!r} raised {type(e).__name__}: {e}") from e
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(where)
    except Exception as e:
        raise ValueError(f"model import path {spec!r}: importing {where!r} raised {type(e).__name__}: {e}") from e


def _plain(value: Any) -> Any:
    """Config values as a factory expects them: ``ConfigDict`` -> dict, list -> tuple (recursively)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _factory_keywords(factory: Any) -> Tuple[Optional[Tuple[str, ...]], bool]:
    """``(keywords, takes_num_classes)`` of a user factory; ``keywords`` is None when it takes any (``**kw``)."""
    import inspect

    if isinstance(factory, nn.Module):
        return (), False
    if isinstance(factory, type) and issubclass(factory, nn.Module):
        names = tuple(f.name for f in dataclasses.fields(factory) if f.init and f.name not in ("parent", "name"))
        return tuple(n for n in names if n != "num_classes"), "num_classes" in names
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None, False
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None, True
    names = tuple(n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return tuple(n for n in names if n != "num_classes"), "num_classes" in names


def model_keywords(name: str) -> Optional[Tuple[str, ...]]:
    """The ``model.kwargs`` keys model ``name`` accepts, sorted; None when its factory takes any keyword.

    Built-ins: the fields of the model's dataclass (less ``num_classes``), plus ``act_kwargs`` / ``norm_kwargs``
    where it has ``act`` / ``norm``. The user's: a module class's fields, a function's keyword parameters."""
    if name in _REGISTRY:
        fields = set(_fields(_REGISTRY[name][0])) - {"num_classes"}
        extra = {"act_kwargs"} if "act" in fields else set()
        extra |= {"norm_kwargs"} if "norm" in fields else set()
        return tuple(sorted(fields | extra))
    keywords, _ = _factory_keywords(resolve_model(name))
    return None if keywords is None else tuple(sorted(keywords))


def _build_user_model(name: str, factory: Any, num_classes: int, kwargs: dict) -> nn.Module:
    """Call a user factory with ``num_classes`` (when it takes it) and ``kwargs``; check it gave a module."""
    kwargs = {k: _plain(v) for k, v in kwargs.items()}
    if isinstance(factory, nn.Module):
        if kwargs:
            raise ValueError(f"model {name!r} is a module instance, which takes no model.kwargs (got "
                             f"{sorted(kwargs)}); register its class or a factory function to pass settings.")
        return factory
    keywords, takes_classes = _factory_keywords(factory)
    if keywords is not None:
        unknown = sorted(set(kwargs) - set(keywords))
        if unknown:
            raise ValueError(f"model {name!r} does not accept {unknown}; valid keywords: {sorted(keywords)}")
    try:
        model = factory(num_classes=num_classes, **kwargs) if takes_classes else factory(**kwargs)
    except Exception as e:  # a missing required field, a bad value: the factory's own words
        raise ValueError(f"model {name!r} cannot be built with num_classes={num_classes} and model.kwargs="
                         f"{kwargs}: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r}: its factory returned a {type(model).__name__}, not a "
                         f"flax.linen.Module.")
    return model


# Keyword arguments of ``__call__`` that switch a module between training and evaluation, with their value in
# training mode: the Flax examples' ``train``, the Haiku/Keras-style ``is_training`` / ``training``, and
# ``deterministic`` / ``use_running_average`` (``nn.Dropout`` / ``nn.BatchNorm``), whose sense is inverted.
MODE_ARGUMENTS = {"train": True, "training": True, "is_training": True, "deterministic": False,
                  "use_running_average": False}


@functools.lru_cache(maxsize=None)
def _mode_arguments(cls: type) -> Tuple[str, ...]:
    import inspect

    try:
        params = inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(n for n in params if n in MODE_ARGUMENTS)


def mode_kwargs(model: nn.Module, *, train: bool) -> dict:
    """The keyword arguments that put ``model`` in training (``train=True``) or evaluation mode: each argument of
    its ``__call__`` named in :data:`MODE_ARGUMENTS` (``train``, ``training``, ``is_training`` get ``train``;
    ``deterministic``, ``use_running_average`` get ``not train``); ``{}`` for a model without one, so
    ``model.apply(variables, x, **mode_kwargs(model, train=False))`` works for every model."""
    return {n: (bool(train) if MODE_ARGUMENTS[n] else not train) for n in _mode_arguments(type(model))}


def make_lcnn_model(arch: str, num_classes: int, *, norm: bool = True, pool: str = "avg", **overrides: Any):
    """``make_model(arch, num_classes, **lcnn_model_kwargs(arch, norm=, pool=), **overrides)``."""
    return make_model(arch, num_classes, **{**_lcnn.lcnn_model_kwargs(arch, norm=norm, pool=pool), **overrides})
