"""The measurement report of a trained network: every smoothness measure and attack on train and test examples.

This composes :mod:`lcnn_jax.measures` and :mod:`lcnn_jax.attacks` around a Flax model in eval mode; it is what
``lcnn-jax measure --workdir DIR`` runs. Per-example items are reported as ``{"mean", "std", "n"}``; the
parameter-space items (Hessian trace by Hutchinson, top Hessian eigenvalue by Lanczos) as ``{"mean", "std", "n"}``
with ``std`` the estimator's standard error (trace) or 0 (eigenvalue) and ``n`` its probe / iteration count.

Example::

    import jax
    from lcnn_jax import data, report, training
    config, model, state, info = training.load_trained("runs/quickstart")  # a finished `lcnn-jax train` run
    variables = {"params": state.params, **state.model_state}             # what model.apply takes
    test = data.load_split("mnist5k", "test")
    rep = report.measure_state(model, variables, {"test": (test.images[:256], test.labels[:256])},
                               report.measure_defaults(), key=jax.random.key(0))
    print(report.format_report(rep))
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, Mapping

import jax
import ml_collections
import numpy as np
import optax

from lcnn_jax import attacks
from lcnn_jax.batching import map_chunks
from lcnn_jax.measures import (gradient_stability, hessian_top_eigenvalues, hessian_trace, input_curvature,
                               jacobian_frobenius, local_lipschitz)

# Item names in report order (per-split items first).
PER_EXAMPLE_ITEMS = ("jacobian_frobenius", "curvature", "hessian_norm", "grad_norm", "gradient_stability",
                     "local_lipschitz")


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
        lipschitz_iters=20,
        hessian_examples=256,  # training examples in the loss whose parameter Hessian is measured
        hessian_probes=10,  # Hutchinson probes
        hessian_lanczos_iters=20,
        pgd_linf_eps=(0.1,),
        pgd_l2_eps=(1.0, 2.0),
        pgd_steps=20,
        pgd_step_factor=2.5,  # step size = factor * eps / steps (Madry et al.)
        noise_std=(1.0,),  # Gaussian-noise accuracy (CLIP protocol: N(0, 1) clipped to [0, 1])
        progress=True,
    ))


def _stats(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def model_functions(model, variables) -> tuple[Callable, Callable, Callable]:
    """``(f, loss_fn, logits_fn)`` of a Flax model in eval mode: one example -> logits, one example -> CE,
    and a batch -> logits."""

    def logits_fn(xs):
        return model.apply(variables, xs, train=False)

    def f(x):
        return logits_fn(x[None])[0]

    def loss_fn(x, y):
        return optax.softmax_cross_entropy_with_integer_labels(f(x), y)

    return f, loss_fn, logits_fn


def per_example_fn(model, cfg) -> Callable:
    """The jitted ``run(variables, xs, ys, key) -> {item: (B,)}`` of the per-example items (compile once, apply
    to every chunk of every split)."""

    @jax.jit
    def run(variables, xs, ys, key):
        f, loss_fn, _ = model_functions(model, variables)
        k1, k2, k3 = jax.random.split(key, 3)
        curv = input_curvature(loss_fn, xs, ys, key=k1, num_iters=int(cfg.curvature_iters))
        return {"jacobian_frobenius": jacobian_frobenius(f, xs),
                "curvature": curv["curvature"], "hessian_norm": curv["hessian_norm"], "grad_norm": curv["grad_norm"],
                "gradient_stability": gradient_stability(loss_fn, xs, ys, key=k2, noise_std=float(cfg.stability_noise)),
                "local_lipschitz": local_lipschitz(f, xs, key=k3, num_iters=int(cfg.lipschitz_iters))}

    return run


def per_example_measures(model, variables, xs, ys, cfg, key, batch_size, run=None) -> dict:
    """Jacobian Frobenius norm (exact), LCNN curvature / Hessian norm / gradient norm, gradient stability and the
    local Lipschitz estimate, per example, as ``{item: {"mean", "std", "n"}}``."""
    run = per_example_fn(model, cfg) if run is None else run
    vals = map_chunks(functools.partial(run, variables), xs, ys, key=key, chunk_size=batch_size)
    return {k: _stats(vals[k]) for k in PER_EXAMPLE_ITEMS}


def robustness(model, variables, xs, ys, cfg, key, batch_size) -> dict:
    """Clean accuracy, PGD-Linf / PGD-L2 robust accuracy at each radius, and Gaussian-noise accuracy."""
    _, _, logits_fn = model_functions(model, variables)
    out = {"accuracy": attacks.accuracy(logits_fn, xs, ys, batch_size=batch_size)}
    steps, factor = int(cfg.pgd_steps), float(cfg.pgd_step_factor)
    for norm, radii in (("linf", cfg.pgd_linf_eps), ("l2", cfg.pgd_l2_eps)):
        for i, eps in enumerate(radii):
            attack = functools.partial(attacks.pgd, norm=norm, eps=float(eps), step_size=factor * float(eps) / steps,
                                       num_steps=steps)
            out[f"pgd_{norm}_{eps:g}"] = attacks.robust_accuracy(
                logits_fn, xs, ys, attack=attack, key=jax.random.fold_in(key, hash((norm, i)) % 2**31),
                batch_size=batch_size)
    for i, std in enumerate(cfg.noise_std):
        noise = lambda f, x, y, key, s=float(std): attacks.gaussian_noise(x, key=key, std=s)  # noqa: E731
        out[f"noise_{std:g}"] = attacks.robust_accuracy(logits_fn, xs, ys, attack=noise,
                                                        key=jax.random.fold_in(key, 1000 + i), batch_size=batch_size)
    return {k: {"mean": float(v), "std": 0.0, "n": int(xs.shape[0])} for k, v in out.items()}


def parameter_hessian(model, variables, xs, ys, cfg, key) -> dict:
    """Hutchinson trace and Lanczos top eigenvalue of the parameter Hessian of the mean CE over ``xs``."""
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(p):
        logits = model.apply({"params": p, **rest}, xs, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

    k1, k2 = jax.random.split(key)
    trace, se = jax.jit(lambda p, k: hessian_trace(loss, p, key=k, num_probes=int(cfg.hessian_probes)))(params, k1)
    top = jax.jit(lambda p, k: hessian_top_eigenvalues(loss, p, key=k, k=1,
                                                       num_iters=int(cfg.hessian_lanczos_iters)))(params, k2)
    return {"hessian_trace": {"mean": float(trace), "std": float(se), "n": int(cfg.hessian_probes)},
            "hessian_top_eigenvalue": {"mean": float(top.eigenvalues[0]), "std": 0.0,
                                       "n": int(cfg.hessian_lanczos_iters)}}


def measure_state(model, variables, splits: Mapping[str, tuple], cfg, *, key, train_for_hessian=None) -> dict:
    """The full report: ``{split: {item: stats}}`` plus ``"parameter_space"`` from ``train_for_hessian``
    (``(xs, ys)``; skipped when None). ``splits`` maps a name to ``(xs, ys)`` numpy arrays."""
    from tqdm.auto import tqdm

    bs = int(cfg.batch_size)
    tasks = [(name, part) for name in splits for part in ("measures", "robustness")]
    if train_for_hessian is not None:
        tasks.append(("parameter_space", "hessian"))
    report: dict = {}
    run = per_example_fn(model, cfg)
    with tqdm(total=len(tasks), disable=not cfg.get("progress", True), desc="measure", unit="item") as bar:
        for i, (name, part) in enumerate(tasks):
            bar.set_postfix_str(f"{name}/{part}")
            k = jax.random.fold_in(key, i)
            if part == "measures":
                report.setdefault(name, {}).update(per_example_measures(model, variables, *splits[name], cfg, k, bs, run))
            elif part == "robustness":
                report.setdefault(name, {}).update(robustness(model, variables, *splits[name], cfg, k, bs))
            else:
                report[name] = parameter_hessian(model, variables, *train_for_hessian, cfg, k)
            bar.update(1)
    return report


def measure_workdir(workdir: str, overrides: list[str] | None = None) -> dict:
    """Load the checkpoint of a training run, measure it, write ``workdir/measures.json`` atomically and return
    the report. ``overrides`` are ``"key=value"`` strings for the ``measure`` section (e.g. ``num_examples=64``)."""
    from lcnn_jax import data as data_lib
    from lcnn_jax.configs import apply_overrides
    from lcnn_jax.training import ConfigError, load_trained, write_json_atomic

    config, model, state, info = load_trained(workdir)
    cfg = measure_defaults()
    if "measure" in config:
        cfg.update(config.measure)
    holder = ml_collections.ConfigDict({"measure": cfg})
    apply_overrides(holder, [o if o.startswith("measure.") else f"measure.{o}" for o in (overrides or [])])
    cfg = holder.measure
    if int(cfg.num_examples) <= 0 or int(cfg.batch_size) <= 0:
        raise ConfigError("measure.num_examples and measure.batch_size must be positive integers.")
    for s in cfg.splits:
        if s not in ("train", "test"):
            raise ConfigError(f"measure.splits contains {s!r}; use 'train' and/or 'test'.")

    d = config.data
    loaded = {}
    for s in cfg.splits:
        name, data_dir = d.name, d.get("data_dir")
        if s == "test" and cfg.test_data:
            name, data_dir = cfg.test_data, cfg.test_data_dir
        split = data_lib.load_split(name, s, data_dir=data_dir, download=d.get("download", False))
        n = min(int(cfg.num_examples), len(split.images))
        loaded[s] = (split.images[:n], split.labels[:n])
    train = data_lib.load_split(d.name, "train", data_dir=d.get("data_dir"), download=d.get("download", False))
    nh = min(int(cfg.hessian_examples), len(train.images))
    variables = {"params": state.params, **state.model_state}
    rep = measure_state(model, variables, loaded, cfg, key=jax.random.PRNGKey(int(cfg.seed)),
                        train_for_hessian=(train.images[:nh], train.labels[:nh]))
    rep["measure_config"] = cfg.to_dict()
    rep["test_data"] = cfg.test_data or d.name
    write_json_atomic(os.path.join(workdir, "measures.json"), rep)
    return rep


def format_report(rep: dict) -> str:
    """A plain-text table: one row per item, one column per split (mean +- std)."""
    splits = [s for s in ("train", "test") if s in rep]
    items = list(dict.fromkeys(k for s in splits for k in rep[s]))
    w = max([len(i) for i in items] + [22])
    lines = [f"{'item':<{w}}" + "".join(f"{s:>28}" for s in splits)]
    for item in items:
        row = f"{item:<{w}}"
        for s in splits:
            st = rep[s].get(item)
            row += f"{'-':>28}" if st is None else f"{_fmt(st['mean']):>14} +- {_fmt(st['std']):<10}"
        lines.append(row)
    for item, st in rep.get("parameter_space", {}).items():
        lines.append(f"{item:<{w}}{_fmt(st['mean']):>14} +- {_fmt(st['std']):<10}  (parameter space)")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)
