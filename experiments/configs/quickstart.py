"""Quickstart: the small CNN of the CLIP paper on the offline `mnist5k` data (4000 train / 1000 test images).

    lcnn-jax train --config experiments/configs/quickstart.py --workdir runs/quickstart

About 3 minutes on 2 CPU cores; expect >= 95 % test accuracy.
"""
from lcnn_jax.configs import default_config


def get_config():
    config = default_config()
    config.data.name = "mnist5k"
    config.model.name = "small_cnn"
    config.optim.name = "sgd"
    config.optim.learning_rate = 0.05
    config.optim.momentum = 0.9
    config.optim.schedule = "cosine"
    config.train.batch_size = 64
    config.train.num_epochs = 8
    config.train.log_every = 25
    return config
