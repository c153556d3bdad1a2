"""Small-data study of the gradient regularizers (SPEC 1.2) and the derivative penalty (SPEC 1.4) on ``mnist5k``.

    lcnn-jax train --config experiments/configs/smalldata_mnist5k.py:datagrad --workdir runs/smalldata/datagrad
    python experiments/smalldata_study.py --mnist_test_dir /work/shared/data/mnist        # the whole study

The argument after the colon is ``<regularizer>[+<model>]``: ``baseline``, ``datagrad``, ``spectreg``, ``jacreg``,
``confidence_penalty``, ``derivative_a`` (SPEC 1.4 reading A: secant vs tangent), ``derivative_b`` (reading B: the
secant of the logits driven to the target's derivative, 0) or ``derivative_b_softmax`` (reading B on the softmax
outputs), optionally followed by ``+mlp`` (default), ``+mlp_softplus``, ``+lenet`` or ``+small_cnn``.

Data: ``TRAIN_SIZE = 2000`` training images, a stratified subset (``data.train_size``, ``data.subset_seed = 0``)
of the 4000 mnist5k training images; the study holds ``VAL_SIZE = 1000`` of the remaining 2000 out as the
validation split that picks each regularizer's coefficient (see ``experiments/smalldata_study.py``). The 1000
mnist5k test images and the official MNIST test set are only ever used for the final numbers.

Models (``MODELS``): ``mlp`` 784-256-256-10 ReLU (the regularizer table: its vmapped sweep of 15 members runs at
CPU speed), ``mlp_softplus`` (the same with softplus, beta 1: a smooth network, on which reading A is not vacuous),
``lenet`` (LeNet-5, 62k parameters: the "small CNN" of the derivative table) and ``small_cnn`` (the
CLIP paper's CNN, 3.3M parameters: the "high-capacity" net of the derivative table). ReLU and max-pool throughout but for ``mlp_softplus``.

Training: SGD lr 0.05, momentum 0.9, cosine schedule, batch 64 (31 steps per epoch), ``EPOCHS`` epochs.
Coefficient grids (``GRIDS``): four values per regularizer (the paper's values are not available to us). Measured
on the MLP after 10 unregularized epochs: ``||J||_F^2 ~ 280``, ``||grad_x CE||^2 ~ 0.02``, CE ~ 0.01 (2.3 at init).
A first pass with three values a decade apart (DataGrad 1/10/100, SpectReg and JacReg 1e-4/1e-3/1e-2, confidence
0.01/0.1/1) picked an end of the grid for DataGrad (1; 10 and 100 fell to ~65 %), SpectReg (1e-2) and the
confidence penalty (1), so the grids were moved to bracket those values. The derivative penalties have no coefficient
(weight 1 by construction); each unit names its reading explicitly, whatever the library's default.
"""
import ml_collections

from lcnn_jax.configs import default_config

TRAIN_SIZE = 2000
VAL_SIZE = 1000
SUBSET_SEED = 0
EPOCHS = 20
REGULARIZERS = ("baseline", "datagrad", "spectreg", "jacreg", "confidence_penalty", "derivative_a", "derivative_b",
                "derivative_b_softmax")
#: ``config.regularizers["derivative"]`` of each derivative variant (the resolution comes from the dataset, 1/255).
DERIVATIVE_READINGS = {"derivative_a": {"reading": "secant_tangent"}, "derivative_b": {"reading": "target"},
                       "derivative_b_softmax": {"reading": "target", "output": "softmax"}}
GRIDS = {
    "datagrad": (0.1, 0.3, 1.0, 3.0),
    "spectreg": (1e-3, 1e-2, 3e-2, 1e-1),
    "jacreg": (1e-3, 1e-2, 3e-2, 1e-1),
    "confidence_penalty": (0.1, 0.3, 1.0, 3.0),
}
MODELS = {
    "mlp": {"name": "mlp", "kwargs": {"widths": (256, 256)}},
    "mlp_softplus": {"name": "mlp", "kwargs": {"widths": (256, 256), "act": "softplus"}},
    "lenet": {"name": "lenet", "kwargs": {}},
    "small_cnn": {"name": "small_cnn", "kwargs": {}},
}


def parse_arg(arg: str) -> "tuple[str, str]":
    """``"datagrad+lenet"`` -> ``("datagrad", "lenet")``; the model defaults to ``mlp``."""
    reg, _, model = (arg or "baseline").partition("+")
    model = model or "mlp"
    if reg not in REGULARIZERS or model not in MODELS:
        raise ValueError(f"unknown variant {arg!r}: use <regularizer>[+<model>] with regularizer in {REGULARIZERS} "
                         f"and model in {tuple(MODELS)}, e.g. --config experiments/configs/smalldata_mnist5k.py:"
                         f"derivative_b+lenet")
    return reg, model


def regularizers(reg: str) -> dict:
    """``config.regularizers`` of a variant; a gridded regularizer gets its middle grid value (the sweep
    overrides it per member)."""
    if reg == "baseline":
        return {}
    if reg in DERIVATIVE_READINGS:
        return {"derivative": dict(DERIVATIVE_READINGS[reg])}  # resolution comes from the dataset (1/255)
    return {reg: {"coeff": GRIDS[reg][len(GRIDS[reg]) // 2]}}


def get_config(arg: str = "baseline"):
    reg, model = parse_arg(arg)
    config = default_config()
    config.data.name = "mnist5k"
    config.data.train_size = TRAIN_SIZE
    config.data.subset_seed = SUBSET_SEED
    config.model.name = MODELS[model]["name"]
    config.model.kwargs = ml_collections.ConfigDict(MODELS[model]["kwargs"])
    config.optim.name = "sgd"
    config.optim.learning_rate = 0.05
    config.optim.momentum = 0.9
    config.optim.schedule = "cosine"
    config.train.batch_size = 64
    config.train.num_epochs = EPOCHS
    config.train.log_every = 31  # once per epoch
    config.train.checkpoint_every = 155  # every 5 epochs
    config.train.progress = False
    config.regularizers = ml_collections.ConfigDict(regularizers(reg))
    return config
