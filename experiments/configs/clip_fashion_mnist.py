"""CLIP table (SPEC 1.3, paper Table 1, Fashion-MNIST rows): the small CNN on TFDS ``fashion_mnist``.

    lcnn-jax train --config experiments/configs/clip_fashion_mnist.py:clip85 --workdir runs/clip_fmnist/clip85

Needs the prepared TFDS dataset (``--config.data.download=True`` once, with network and the ``tfds-prepare``
extra) or a folder of Fashion-MNIST IDX files as ``--config.data.data_dir``.

Variants: ``standard``, ``clip85`` / ``90`` / ``95``, ``weightreg85`` / ``90`` / ``95``, ``clip_reference`` and
``clip_reference85`` / ``90`` / ``95``, with the regularizer settings of clip_mnist5k.py (the paper reports Standard
and CLIP85). Network: conv32 5x5 -> pool -> conv64 5x5 -> pool -> fc1024 (``small_cnn``, ReLU; it has no output
sigmoid option). SGD lr 0.1, momentum 0.9, batch 128, constant learning rate, 30 epochs.

Pair pool: as on MNIST, every row holds training images out as CLIP's pool (``data.pair_pool_size``): 6000 of the
60000, the reference's 90/10 train/validation split (it draws its pairs from batches of that validation set), so
every row trains on the same 54000 images (422 steps per epoch, 12660 steps). Without a pool, the 500 pairs would be
drawn, with replacement, from one 128-image training batch. With 500 pairs the CLIP ascent runs the network on 1000
extra inputs per step (forward + backward, then forward): a CLIP row costs several standard rows; use a GPU.
"""
import os

import ml_collections

from lcnn_jax.configs import default_config, load_config_module


_MNIST = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_mnist5k.py"))
VARIANTS = _MNIST.VARIANTS


def get_config(variant: str = "clip85"):
    variant, sigmoid_out = _MNIST.parse_variant(variant, "clip_fashion_mnist")
    if sigmoid_out:
        raise ValueError("small_cnn has no output activation: drop the '_sigmoid' suffix for Fashion-MNIST.")
    config = default_config()
    config.data.name = "fashion_mnist"
    config.data.pair_pool_size = 6000
    config.model.name = "small_cnn"
    config.model.kwargs = ml_collections.ConfigDict()

    config.optim.name = "sgd"
    config.optim.learning_rate = 0.1
    config.optim.momentum = 0.9
    config.optim.weight_decay = 0.0
    config.optim.schedule = "constant"
    config.train.batch_size = 128
    config.train.num_epochs = 30
    config.train.log_every = 100
    config.train.checkpoint_every = 2000
    config.regularizers = ml_collections.ConfigDict(_MNIST.regularizers(variant))
    return config
