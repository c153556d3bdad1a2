"""LCNN table on the offline ``mnist5k`` data: the LCNN paper's rows with the small CNN (4000 train / 1000 test).

    lcnn-jax train --config experiments/configs/lcnn_mnist5k.py:lcnn --workdir runs/lcnn_mnist5k/lcnn

Variants (the argument after the colon):

* ``standard``     small CNN, softplus beta=1000 (~ReLU), batch norm, average pooling.
* ``lcnn``         the same network with centred softplus (trainable beta), spectrally normalised convs and dense
                   layers (true operator norms), Lipschitz batch norm; penalty 1e-2 sum(beta) + 1e-2 sum|log gamma|.
* ``gradreg``      ``standard`` + the reference's gradient-norm penalty (1e-3 * 1e5/B^2 * mean ||grad_x CE||^2).
* ``lcnn_gradreg`` ``lcnn`` + the same gradient-norm penalty.
* ``softplus10``   ``standard`` with softplus beta=10.
* ``cure``         ``standard`` + CURE as in the LCNN reference code (h = 1, 1e-3 * 1e3/B^2 * mean ||dg||^2).
* ``adversarial``  ``standard`` trained by PGD adversarial training (coeff 1: Madry's objective), L2 PGD with 3 steps
                   as in the paper's row, at eps 1.0 instead of its CIFAR 0.1: on MNIST an L2 radius of 0.1 moves
                   the images by less than the attacks this table evaluates at (eps 1 and 2) by a factor 10-20, so
                   training at it would leave the network as the standard one; 1.0 is the smaller evaluated radius
                   (the compare config's ``adversarial`` method uses the same).

Every row: SGD momentum 0.9, lr 0.05, weight decay 5e-4 (not on log_beta/log_gamma), lr x0.1 at 75 % and
87.5 % of training, batch 64, 15 epochs (~940 steps). The gradient penalties use the per-example strength
of the paper protocol (batch 128) via ``batch_size=128``, so halving the batch does not double them.
Average pooling everywhere: a 2x2/2 average pool is linear with norm 1/2, so the LCNN net is smooth everywhere
and its curvature bound (lcnn_jax.measures.bounds) holds for every input.

Run time: about 2-5 minutes per row on 2 CPU cores (``gradreg``/``cure`` about 2-3x a plain row, ``adversarial``
about 5x: 3 attack steps and 2 more forward passes per step; not measured), seconds on a GPU.
The LCNN rows need the registry names ``lcnn_small_cnn`` (see lcnn_jax.nn.lcnn.lcnn_model_kwargs).
"""
import os

from lcnn_jax.configs import default_config, load_config_module

# The rows (model + regularizers) are those of the paper protocol, shared with lcnn_cifar100.py.
_PAPER = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lcnn_cifar100.py"))

VARIANTS = _PAPER.VARIANTS


def get_config(variant: str = "lcnn"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for lcnn_mnist5k; choose one of {VARIANTS}, "
                         "e.g. --config experiments/configs/lcnn_mnist5k.py:lcnn")
    config = default_config()
    config.data.name = "mnist5k"
    _PAPER.apply_variant(config, variant, "small_cnn", model_kwargs={"pool": "avg"}, grad_batch_size=128,
                         adversarial_eps=1.0)

    config.optim.name = "sgd"
    config.optim.learning_rate = 0.05
    config.optim.momentum = 0.9
    config.optim.weight_decay = 5e-4
    config.optim.wd_exclude = ("log_beta", "log_gamma")
    config.optim.schedule = "piecewise"
    config.optim.boundaries = (0.75, 0.875)
    config.optim.decay_factor = 0.1
    config.train.batch_size = 64
    config.train.num_epochs = 15
    config.train.log_every = 25

    return config
