"""lcnn_jax: smoothness, curvature, Lipschitz and sharpness of neural networks in JAX/Flax.

``import lcnn_jax as lj`` gives every public module as an attribute, imported on first use (so that
``import lcnn_jax`` stays cheap): ``lj.measures``, ``lj.regularizers``, ``lj.nn``, ``lj.attacks``,
``lj.estimators``, ``lj.autodiff``, ``lj.loops``, ``lj.data``, ``lj.train``, ``lj.runs``, ``lj.report``,
``lj.compare``, ``lj.tables``, ``lj.batching``, ``lj.configs``, ``lj.io``, ``lj.errors``, ``lj.types``
(``lj.training`` and ``lj.sweep`` are deprecated aliases of ``lj.train``, kept for one release). The API
reference in ``docs/`` lists the public names of each.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_MODULES = ("types", "errors", "io", "loops", "autodiff", "estimators", "measures", "regularizers", "nn", "attacks",
            "data", "batching", "train", "runs", "report", "compare", "tables", "configs", "cli",
            "training", "sweep")  # the last two: deprecated aliases of lcnn_jax.train, kept for one release

__all__ = ["__version__", *_MODULES]


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"lcnn_jax.{name}")  # the import also binds it on this package
    raise AttributeError(f"module 'lcnn_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_MODULES))
