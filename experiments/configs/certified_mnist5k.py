"""Certified L2 robustness on the offline ``mnist5k`` data (4000 train images), certified with ``lcnn-jax certify``.

    lcnn-jax train --config experiments/configs/certified_mnist5k.py --workdir runs/certified/gloro_cnn
    lcnn-jax certify --workdir runs/certified/gloro_cnn --radii 0.5,1.0,1.58 --test_data mnist \\
        --test_data_dir ../shared/data/mnist --num_examples 1000 --attack apgd

Variants (the argument after the colon; the default is ``gloro_cnn``, the network that certifies best here):

* ``gloro_cnn``    ``aol_cnn`` (AOL convolutions 16-16/2-32-32/2, AOL dense 256, MinMax, dense head) trained with
                   the GloRo bottom-logit loss at eps 1.0 (ramped over the first 20 epochs), coeff 3.
* ``gloro_mlp``    ``aol_mlp`` (AOL dense 256-256-256, MinMax) with the same loss.
* ``tsuzuku_cnn``  ``gloro_cnn`` with the Tsuzuku margin (``eps L_yj`` added to every other logit) instead.
* ``aol_ce``       ``aol_cnn`` trained with plain cross-entropy: what the 1-Lipschitz layers alone give.
* ``crt``          ``aol_cnn`` with centred softplus (smooth, curvature bound ``sum b / 4``) trained with the
                   margin loss and the CRT curvature penalty (coeff 1e-2), for the second-order certificate.
* ``standard`` / ``lcnn`` / ``clip``  our existing methods (``quickstart``'s small CNN; ``lcnn_mnist5k.py:lcnn``;
                   ``clip_mnist5k.py:clip90``), certified the same way.

The certifiable rows: Adam lr 1e-3, cosine schedule, batch 128, 60 epochs (1875 steps), inputs in [0, 1].
Run time on 2 CPU cores: see experiments/results/certified/table.md (measured on a shared machine).
"""
import os

from lcnn_jax.configs import default_config, load_config_module

VARIANTS = ("gloro_cnn", "gloro_mlp", "tsuzuku_cnn", "aol_ce", "crt", "standard", "lcnn", "clip")
_HERE = os.path.dirname(os.path.abspath(__file__))


def _certifiable(config, model: str, *, epochs: int = 60):
    config.data.name = "mnist5k"
    config.model.name = model
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3
    config.optim.schedule = "cosine"
    config.train.batch_size = 128
    config.train.num_epochs = epochs
    config.train.log_every = 50
    return config


def _margin(eps: float = 1.0, coeff: float = 3.0, variant: str = "gloro", warmup_epochs: int = 20) -> dict:
    return {"eps": eps, "coeff": coeff, "variant": variant, "warmup_epochs": warmup_epochs}


def get_config(variant: str = "gloro_cnn"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for certified_mnist5k; choose one of {VARIANTS}, "
                         "e.g. --config experiments/configs/certified_mnist5k.py:gloro_cnn")
    if variant == "standard":
        return load_config_module(os.path.join(_HERE, "quickstart.py")).get_config()
    if variant == "lcnn":
        return load_config_module(os.path.join(_HERE, "lcnn_mnist5k.py")).get_config("lcnn")
    if variant == "clip":
        return load_config_module(os.path.join(_HERE, "clip_mnist5k.py")).get_config("clip90")
    config = default_config()
    if variant in ("gloro_cnn", "tsuzuku_cnn", "aol_ce", "crt"):
        _certifiable(config, "aol_cnn")
    else:
        _certifiable(config, "aol_mlp")
    if variant in ("gloro_cnn", "gloro_mlp"):
        config.regularizers.lipschitz_margin = _margin()
    elif variant == "tsuzuku_cnn":
        config.regularizers.lipschitz_margin = _margin(variant="tsuzuku")
    elif variant == "crt":
        config.model.kwargs.activation = "centered_softplus"
        config.regularizers.lipschitz_margin = _margin()
        config.regularizers.crt = {"coeff": 1e-2}
    return config
