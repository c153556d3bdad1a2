"""The models a researcher brings, and small helpers, for tests/test_own_model.py and tests/test_cli_runs.py (not a
test module). The library defines none of these modules; the tests name them by ``register_model`` or by this
file's import path (``MODELS_FILE + ":BNDropNet"``)."""
import os
import re

import flax.linen as nn
import numpy as np
import pytest

from lcnn_jax.configs import load_config
from lcnn_jax.nn import mode_kwargs
from lcnn_jax.nn import models as nn_models

MODELS_FILE = os.path.abspath(__file__)


class PlainNet(nn.Module):
    """No ``train`` argument, no mutable collection."""
    num_classes: int = 10
    width: int = 16

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.width)(x)))


class BNDropNet(nn.Module):
    """``train`` switches batch norm (``batch_stats``) and dropout; ``num_classes`` has no default."""
    num_classes: int
    width: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (3, 3), strides=(2, 2))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class DeterministicNet(nn.Module):
    """The ``nn.Dropout`` convention: ``deterministic=True`` is evaluation."""
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class WrongWidthNet(nn.Module):
    """Ignores the number of classes the data has."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(7)(x.reshape((x.shape[0], -1)))


class NoEvalModeNet(nn.Module):
    """Batch statistics always updated: there is no evaluation mode."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=False)(x.reshape((x.shape[0], -1)))
        return nn.Dense(self.num_classes)(x)



@pytest.fixture
def registry(monkeypatch):
    """An empty user registry and import cache for the test; the real ones are restored afterwards."""
    import sys

    monkeypatch.setattr(nn_models, "_USER_MODELS", {})
    monkeypatch.setattr(nn_models, "_IMPORTED", {})
    monkeypatch.setattr(sys, "path", list(sys.path))


def one_paragraph_error(err: str) -> str:
    """The CLI's error text: no traceback, a single message line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("lcnn-jax:")]
    assert len(lines) == 1, err
    return lines[0]


TINY = """
from lcnn_jax.configs import default_config


def get_config():
    c = default_config()
    c.model.name = {model_name!r}
    c.data.train_size, c.train.batch_size, c.train.num_steps, c.train.log_every = 250, 25, 6, 3
    c.train.checkpoint_every, c.train.progress = 3, False
    c.regularizers = {{"spectreg": {{"coeff": 0.0}}}}
    c.measure = dict(num_examples=8, batch_size=8, hessian_examples=16, hessian_probes=2, hessian_lanczos_iters=3,
                     pgd_steps=2, pgd_linf_eps=(), pgd_l2_eps=(1.0,), noise_std=(), curvature_iters=2,
                     lipschitz_iters=2, progress=False)
    return c
"""


def tiny_config_file(tmp_path, model_name) -> str:
    """A config file (as a user writes one) training ``model_name`` for 6 steps on 250 mnist5k images, with
    measurement settings small enough for a test."""
    path = tmp_path / f"tiny_{re.sub(r'[^A-Za-z0-9]', '_', model_name)[-40:]}.py"
    path.write_text(TINY.format(model_name=model_name))
    return str(path)


def tiny_config(tmp_path, model_name):
    return load_config(tiny_config_file(tmp_path, model_name))


def accuracy(model, state, xs, ys) -> float:
    """Accuracy of a trained state on ``(xs, ys)``, the model in evaluation mode, computed here directly."""
    logits = model.apply({"params": state.params, **state.model_state}, xs, **mode_kwargs(model, train=False))
    return float(np.mean(np.argmax(np.asarray(logits), -1) == ys))
