"""lcnn_jax: smoothness, curvature, Lipschitz and sharpness of neural networks in JAX/Flax.

``import lcnn_jax as lj`` gives every public module as an attribute, imported on first use (so that
``import lcnn_jax`` stays cheap): ``lj.measures``, ``lj.regularizers``, ``lj.nn``, ``lj.attacks``,
``lj.estimators``, ``lj.autodiff``, ``lj.data``, ``lj.training``, ``lj.sweep``, ``lj.runs``, ``lj.report``,
``lj.compare``, ``lj.tables``, ``lj.batching``, ``lj.configs``, ``lj.types``. The README's API overview lists the
public names of each.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_MODULES = ("types", "autodiff", "estimators", "measures", "regularizers", "nn", "attacks", "data", "batching",
            "training", "sweep", "runs", "report", "compare", "tables", "configs", "cli")

__all__ = ["__version__", *_MODULES]


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"lcnn_jax.{name}")  # the import also binds it on this package
    raise AttributeError(f"module 'lcnn_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_MODULES))
