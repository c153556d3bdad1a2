"""The LCNN paper's protocol: ResNet-18 on CIFAR-100 (TFDS), 200 epochs, one row per argument.

    lcnn-jax train --config experiments/configs/lcnn_cifar100.py:lcnn --workdir runs/lcnn_cifar100/lcnn \
        --config.data.data_dir=~/tensorflow_datasets

Rows (the argument after the colon), as in the paper's table and the reference code ``kylematoba/lcnn``:

* ``standard``     ResNet-18, softplus beta=1000 (~ReLU), batch norm.
* ``lcnn``         LCNN ResNet-18: centred softplus (trainable beta, initial 5), convolutions normalised by their
                   true operator norm, Lipschitz batch norm (initial gamma 10), LCNN residual blocks
                   ``act(0.5 (conv2(act(conv1(x/sqrt2))) + shortcut(x/sqrt2)))``, spectrally normalised head;
                   penalty 1e-2 sum(beta) + 1e-2 sum|log gamma|.
* ``gradreg``      ``standard`` + gradient-norm penalty 1e-3 * 1e5 * ||grad_X mean CE||^2 / B (the reference's).
* ``lcnn_gradreg`` ``lcnn`` + the same gradient-norm penalty.
* ``softplus10``   ``standard`` with softplus beta=10 (+ the weight decay every row has).
* ``cure``         ``standard`` + CURE as in the reference code (h = 1, 1e-3 * 1e3 * ||G(x+hz) - G(x)||^2 / B).
* ``adversarial``  ``standard`` trained by PGD adversarial training (Madry et al. 2018; the regularizer
                   ``adversarial`` with coeff 1, i.e. on the adversarial loss alone): L2 PGD, eps 0.1 in the [0, 1]
                   pixel scale the paper's code uses (ToTensor, no normalisation), 3 steps of 2.5 eps / 3, random
                   start. The step is ours (Madry's rule): the reference's evaluation attacks step eps / 10, which in
                   3 steps never reaches the sphere; it publishes no training attack.

Protocol: batch 128, SGD momentum 0.9, lr 0.1, weight decay 5e-4 (not on log_beta/log_gamma), lr x0.1 at 75 % and
87.5 % of training (epochs 150 and 175), random crop (pad 4) + horizontal flip, inputs in [0, 1].
CIFAR-100 must be prepared by TFDS first (``--config.data.download=True`` with the ``tfds-prepare`` extra, or an
existing ``~/tensorflow_datasets``).

Expected run time: an ESTIMATE, not measured (no GPU was available when this config was written). 78,000 steps
of batch 128, about 1.7e16 FLOP (3 x 0.56 GFLOP per image). Batch-128 training on 32x32 images is latency-bound
and uses a few percent of a modern GPU's peak; CIFAR ResNet-18 typically trains at roughly 5-15 s per epoch on
one A100/H100-class GPU, so the ``standard`` row should take about 20-50 minutes. ``lcnn`` adds one convolution
and one transposed convolution on a single image per conv layer per step (negligible FLOPs, some latency):
expect +10-30 %. ``gradreg``/``lcnn_gradreg`` differentiate a gradient (double backprop), about 2-3x a plain
step; ``cure`` two of them, about 4-5x; ``adversarial`` 3 attack steps and 2 more forward passes, about 5x (an
estimate). Evaluation every 10 epochs and the host input pipeline add a little.
Measure one epoch (``--config.train.num_steps=390``) before planning. A CPU is far too slow for this protocol.
The LCNN rows need the registry name ``lcnn_resnet18`` (see lcnn_jax.nn.lcnn.lcnn_model_kwargs).
"""
import ml_collections

from lcnn_jax.configs import default_config

VARIANTS = ("standard", "lcnn", "gradreg", "lcnn_gradreg", "softplus10", "cure", "adversarial")
#: The adversarial-training row's attack: L2 PGD, 3 steps (the radius is set per dataset, see apply_variant).
ADVERSARIAL = {"coeff": 1.0, "norm": "l2", "num_steps": 3}


def get_config(variant: str = "lcnn"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for lcnn_cifar100; choose one of {VARIANTS}, "
                         "e.g. --config experiments/configs/lcnn_cifar100.py:lcnn")
    config = default_config()
    config.data.name = "cifar100"
    config.data.augment = True
    apply_variant(config, variant, "resnet18")

    config.optim.name = "sgd"
    config.optim.learning_rate = 0.1
    config.optim.momentum = 0.9
    config.optim.nesterov = False
    config.optim.weight_decay = 5e-4
    config.optim.wd_exclude = ("log_beta", "log_gamma")
    config.optim.schedule = "piecewise"
    config.optim.boundaries = (0.75, 0.875)
    config.optim.decay_factor = 0.1
    config.optim.warmup_steps = 0
    config.train.batch_size = 128
    config.train.num_epochs = 200
    config.train.log_every = 100
    config.train.eval_every = 390 * 10  # every 10 epochs (390 full batches per epoch)
    config.train.checkpoint_every = 390 * 5
    return config


def apply_variant(config, variant: str, arch: str, *, model_kwargs=None, grad_batch_size=None,
                  adversarial_eps: float = 0.1):
    """Set the model and regularizers of one row of the LCNN table on ``config`` (shared with lcnn_mnist5k.py).

    ``arch`` is the registered base model (its LCNN variant is ``lcnn_<arch>``); ``grad_batch_size`` fixes the
    batch size the gradient penalties' strength refers to (None: the training batch); ``adversarial_eps`` is the
    L2 radius of the adversarial-training row (the paper's 0.1 on CIFAR)."""
    lcnn_model = variant.startswith("lcnn")
    config.model.name = f"lcnn_{arch}" if lcnn_model else arch
    kwargs = dict(model_kwargs or {})
    if not lcnn_model:
        kwargs.update(act="softplus", act_kwargs={"beta": 10.0 if variant == "softplus10" else 1000.0}, norm="batch")
    config.model.kwargs = ml_collections.ConfigDict(kwargs)
    grad = {} if grad_batch_size is None else {"batch_size": grad_batch_size}
    regs = {}
    if lcnn_model:
        regs["lcnn"] = {"beta_coeff": 1e-2, "gamma_coeff": 1e-2}
    if variant.endswith("gradreg"):
        regs["lcnn_gradnorm"] = {"coeff": 1e-3, **grad}
    if variant == "cure":
        regs["cure"] = {"coeff": 1e-3, "h": 1.0, **grad}
    if variant == "adversarial":
        regs["adversarial"] = {**ADVERSARIAL, "eps": float(adversarial_eps)}
    config.regularizers = ml_collections.ConfigDict(regs)
    return config
