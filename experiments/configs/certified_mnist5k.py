"""Certified L2 robustness on the offline ``mnist5k`` data, certified with ``lcnn-jax certify``.

    lcnn-jax train --config experiments/configs/certified_mnist5k.py --workdir runs/certified/gloro_mlp
    lcnn-jax certify --workdir runs/certified/gloro_mlp --radii 0.5,1.0,1.58 --test_data mnist \\
        --test_data_dir ../shared/data/mnist --num_examples 1000 --attack apgd

Variants (the argument after the colon; the default is ``gloro_mlp``, the network that certified best in our runs):

* ``gloro_mlp``    ``aol_mlp`` (AOL dense 784-512-512-512, MinMax, plain dense head) trained with the GloRo
                   bottom-logit loss (``lipschitz_margin``) at eps 2.0 (ramped linearly over the first 60 epochs),
                   coeff 3, 300 epochs, on all 5000 mnist5k images (``data.train_split=train+test``: the network is
                   judged on the official MNIST test set, which shares no image with mnist5k). Training at a radius
                   above the largest one certified (1.58), as GloRo does.
* ``gloro_mlp_256`` the earlier default: the same at widths 256 x 3 on the 4000 training images. The variants
                   below change one thing of this one.
* ``gloro_mlp_translate``  ``gloro_mlp_256`` with every training image moved by up to 2 pixels
                   (``data.translate``), a fresh draw each step: the 4000 images are few, and the margin network
                   overfits them.
* ``tsuzuku_mlp``  ``gloro_mlp_256`` with the Tsuzuku margin (``eps L_yj`` added to every other logit) instead.
* ``aol_ce``       ``aol_mlp`` (256 x 3) trained with plain cross-entropy: what the 1-Lipschitz layers alone give.
* ``crt``          ``aol_mlp`` (256 x 3) with centred softplus (smooth; curvature bound ``||w_i - w_j|| sum b / 4``)
                   trained with the margin loss and the CRT curvature penalty (coeff 1e-2), for the second-order
                   certificate.
* ``gloro_cnn``    ``aol_cnn`` (AOL convolutions 16, 16/2, 32, 32/2, AOL dense 256, MinMax) with the GloRo loss,
                   60 epochs (an AOL convolution step is ~15x an MLP step on a CPU).
* ``standard`` / ``lcnn`` / ``clip``  our existing methods (``quickstart``'s small CNN; ``lcnn_mnist5k.py:lcnn``;
                   ``clip_mnist5k.py:clip90``), certified the same way.

The AOL rows: Adam lr 1e-3, cosine schedule, batch 128, inputs in [0, 1]; 4000 training images except
``gloro_mlp`` (5000). Train times on 2 CPU cores: see experiments/results/certified/table.md.
"""
import os

from lcnn_jax.configs import default_config, load_config_module

VARIANTS = ("gloro_mlp", "gloro_mlp_256", "gloro_mlp_translate", "tsuzuku_mlp", "aol_ce", "crt", "gloro_cnn", "standard", "lcnn", "clip")
_HERE = os.path.dirname(os.path.abspath(__file__))


def _certifiable(config, model: str, *, epochs: int = 300):
    config.data.name = "mnist5k"
    config.model.name = model
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3
    config.optim.schedule = "cosine"
    config.train.batch_size = 128
    config.train.num_epochs = epochs
    config.train.log_every = 50
    return config


def _margin(eps: float = 2.0, coeff: float = 3.0, variant: str = "gloro", warmup_epochs: int = 60) -> dict:
    return {"eps": eps, "coeff": coeff, "variant": variant, "warmup_epochs": warmup_epochs}


def get_config(variant: str = "gloro_mlp"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for certified_mnist5k; choose one of {VARIANTS}, "
                         "e.g. --config experiments/configs/certified_mnist5k.py:gloro_mlp")
    if variant == "standard":
        return load_config_module(os.path.join(_HERE, "quickstart.py")).get_config()
    if variant == "lcnn":
        return load_config_module(os.path.join(_HERE, "lcnn_mnist5k.py")).get_config("lcnn")
    if variant == "clip":
        return load_config_module(os.path.join(_HERE, "clip_mnist5k.py")).get_config("clip90")
    config = default_config()
    if variant == "gloro_cnn":
        _certifiable(config, "aol_cnn", epochs=60)
        config.regularizers.lipschitz_margin = _margin(warmup_epochs=20)
        return config
    _certifiable(config, "aol_mlp")
    config.model.kwargs.widths = (256, 256, 256)  # explicit, so --config.model.kwargs.widths='(512,512,512)' works
    if variant == "gloro_mlp":
        config.model.kwargs.widths = (512, 512, 512)
        config.data.train_split = "train+test"
    if variant in ("gloro_mlp", "gloro_mlp_256", "gloro_mlp_translate"):
        config.regularizers.lipschitz_margin = _margin()
        if variant == "gloro_mlp_translate":
            config.data.translate = 2
    elif variant == "tsuzuku_mlp":
        config.regularizers.lipschitz_margin = _margin(variant="tsuzuku")
    elif variant == "crt":
        config.model.kwargs.activation = "centered_softplus"
        config.regularizers.lipschitz_margin = _margin()
        config.regularizers.crt = {"coeff": 1e-2}
    return config
