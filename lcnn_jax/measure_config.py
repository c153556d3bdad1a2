"""The ``measure`` section of a config: its defaults and their validation (what ``lcnn-jax measure``,
:func:`lcnn_jax.report.measure_state` and ``compare`` read). All radii are in the [0, 1] pixel scale.

Example::

    from lcnn_jax.measure_config import measure_defaults, validate_measure_config
    cfg = measure_defaults()
    cfg.pgd_l2_eps = (0.5, 1.0)
    validate_measure_config(cfg)          # raises ConfigError naming every bad setting, before anything runs
"""
from __future__ import annotations

import math

import ml_collections
import numpy as np

from lcnn_jax import attacks

__all__ = ["ROBUST_ATTACKS", "measure_defaults", "measure_config_problems", "validate_measure_config"]


def measure_defaults() -> ml_collections.ConfigDict:
    """Defaults of the ``measure`` config section (all in the [0, 1] pixel scale)."""
    return ml_collections.ConfigDict(dict(
        seed=0,
        num_examples=256,  # per split; the first N examples of each (the splits are stored shuffled)
        batch_size=128,  # examples per compiled chunk (the last chunk is padded)
        splits=("train", "test"),
        test_data=ml_collections.FieldReference(None, field_type=str),  # evaluate 'test' on another dataset...
        test_data_dir=ml_collections.FieldReference(None, field_type=str),  # ...e.g. mnist + an IDX folder
        curvature_iters=10,  # LCNN protocol
        stability_noise=0.01,  # std of the Gaussian noise for gradient stability
        lipschitz_iters=20,  # power iterations on J^T J (the cap when lipschitz_tol is set)
        # stop each example once ||A u - lam u|| <= tol * lam (A = J^T J); None: exactly lipschitz_iters
        lipschitz_tol=ml_collections.FieldReference(None, field_type=float),
        hessian_examples=256,  # training examples in the loss whose parameter Hessian is measured
        hessian_probes=10,  # Hutchinson probes (the cap when hessian_tol is set)
        hessian_lanczos_iters=20,  # Lanczos steps (the cap when hessian_tol is set)
        # relative tolerance of both parameter-Hessian items: the trace's standard error, the eigenvalue's residual
        hessian_tol=ml_collections.FieldReference(None, field_type=float),
        # probes and Lanczos steps driven from the host with one compiled HVP (True), as one compiled program
        # (False), or None: lcnn_jax.loops.host_loop decides (the host on the CPU for a convolutional net)
        hessian_host_loop=ml_collections.FieldReference(None, field_type=bool),
        pgd_linf_eps=(0.1,),  # attack radii, L-inf and L2, of every attack in robust_attacks
        pgd_l2_eps=(1.0, 2.0),
        # "apgd": per-example worst case of APGD with each loss of apgd_losses (Croce & Hein 2020, the core of
        # AutoAttack), column apgd_<norm>_<eps>; "pgd": fixed-step PGD, column pgd_<norm>_<eps> (cheaper, and known
        # to overstate the robustness of smooth networks); "autoattack": AutoAttack's standard suite (APGD-CE,
        # APGD-T, FAB-T, Square as a cascade, the reference's settings), column aa_<norm>_<eps>. Any of them.
        robust_attacks=("apgd",),
        apgd_steps=100,
        apgd_losses=("ce", "dlr"),
        apgd_restarts=1,
        pgd_steps=20,
        pgd_step_factor=2.5,  # step size = factor * eps / steps (Madry et al.)
        noise_std=(1.0,),  # Gaussian-noise accuracy (CLIP protocol: N(0, 1) clipped to [0, 1])
        # certified L2 accuracy at these radii (lcnn_jax.measures.certified: Lipschitz-margin, pairwise and, for
        # twice-differentiable networks, curvature certificates from the certified bounds); () to skip
        certified_l2_eps=(0.01, 0.1),
        progress=True,
    ))


def _positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def _positive_number(v) -> bool:
    return (isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))
            and float(v) > 0)


# The integer and real settings of the measure section that must be > 0, with an example of a good value.
_POSITIVE_INTS = {"num_examples": 256, "batch_size": 128, "curvature_iters": 10, "lipschitz_iters": 20,
                  "hessian_examples": 256, "hessian_probes": 10, "hessian_lanczos_iters": 20, "pgd_steps": 20,
                  "apgd_steps": 100, "apgd_restarts": 1}
_POSITIVE_NUMBERS = {"stability_noise": 0.01, "pgd_step_factor": 2.5}
_TOLERANCES = {"lipschitz_tol": 1e-3, "hessian_tol": 0.01}  # positive numbers or None
_RADII = {"pgd_linf_eps": "(0.03, 0.1)", "pgd_l2_eps": "(1.0, 2.0)", "noise_std": "(0.5, 1.0)",
          "certified_l2_eps": "(0.01, 0.1)"}
ROBUST_ATTACKS = ("apgd", "pgd", "autoattack")


def measure_config_problems(cfg, prefix: str = "measure") -> list[str]:
    """Every invalid setting of a ``measure`` section (see :func:`measure_defaults`), one sentence each naming the
    key, the value and a valid example. Checked before anything is loaded or compiled, so a bad radius does not
    surface after the expensive measures ran, and a negative count is not silently read as a slice bound
    (``xs[:-5]``)."""
    problems = []
    for key, example in _POSITIVE_INTS.items():
        if key in cfg and not _positive_int(cfg[key]):
            problems.append(f"{prefix}.{key}={cfg[key]!r} must be a positive integer (e.g. {example}).")
    for key, example in _POSITIVE_NUMBERS.items():
        if key in cfg and not _positive_number(cfg[key]):
            problems.append(f"{prefix}.{key}={cfg[key]!r} must be a positive finite number (e.g. {example}).")
    for key, example in _TOLERANCES.items():
        if cfg.get(key) is not None and not _positive_number(cfg[key]):
            problems.append(f"{prefix}.{key}={cfg[key]!r} must be a positive finite number (e.g. {example}) or None.")
    for key, example in _RADII.items():
        if key not in cfg:
            continue
        v = cfg[key]
        if not isinstance(v, (tuple, list)) or not all(_positive_number(r) for r in v):
            problems.append(f"{prefix}.{key}={v!r} must be a tuple of positive finite numbers, e.g. "
                            f"{prefix}.{key}={example!s} (or () to skip).")
    for key, allowed, example in (("robust_attacks", ROBUST_ATTACKS, "('apgd', 'pgd')"),
                                  ("apgd_losses", attacks.APGD_LOSSES, "('ce', 'dlr')")):
        v = cfg.get(key, ())
        if key in cfg and (not isinstance(v, (tuple, list)) or not v or len(set(v)) != len(v)
                           or not set(v) <= set(allowed)):
            problems.append(f"{prefix}.{key}={v!r} must name one or more of {allowed} once each, e.g. "
                            f"{prefix}.{key}=\"{example}\".")
    if "seed" in cfg and (isinstance(cfg.seed, bool) or not isinstance(cfg.seed, (int, np.integer))
                          or cfg.seed < 0):
        problems.append(f"{prefix}.seed={cfg.seed!r} must be a non-negative integer.")
    splits = cfg.get("splits", ("train", "test"))
    if (not isinstance(splits, (tuple, list)) or not splits or len(set(splits)) != len(splits)
            or not set(splits) <= {"train", "test"}):
        problems.append(f"{prefix}.splits={splits!r} must name 'train' and/or 'test' once each, e.g. "
                        f"{prefix}.splits=\"('test',)\".")
    return problems


def validate_measure_config(cfg, prefix: str = "measure") -> None:
    """Raise :class:`~lcnn_jax.errors.ConfigError` listing every problem :func:`measure_config_problems`
    finds (the CLI turns it into exit code 2 and one message)."""
    from lcnn_jax.errors import ConfigError

    problems = measure_config_problems(cfg, prefix)
    if problems:
        raise ConfigError("Invalid measurement settings:\n  - " + "\n  - ".join(problems))
