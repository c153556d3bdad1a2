"""Certified L2 robustness of a trained network at given radii, checked against APGD (``lcnn-jax certify``).

For one trained network (a training run, a sweep member or a compare run's method/seed, chosen as for
``lcnn-jax measure``) this computes the certified bounds of the model (:func:`lcnn_jax.measures.curvature_bound`,
data independent), then per test example the certified L2 radius: the best of the pairwise Lipschitz-margin
certificate and, for twice-differentiable networks, the second-order certificate (the root of
``m - G r - K r^2 / 2``); see :mod:`lcnn_jax.measures.certified`. An example is certified at ``r`` when its radius
exceeds ``r``. With ``attack="apgd"`` every example is attacked at every radius by APGD-CE and APGD-DLR (L2,
100 steps each, in the box [0, 1]); an example counts as robust when neither attack changes its prediction.

``certified_but_broken`` counts the examples certified at ``r`` for which the attack found a misclassified point
within distance ``r``: a bug in a bound or a certificate, never expected (the float32 model's rounding aside,
which the certificates do not cover; the distances are checked in float64).

Example::

    import jax, jax.numpy as jnp
    from lcnn_jax.certify import certify_model, format_certify
    from lcnn_jax.nn.models import make_model
    net = make_model("aol_mlp", 10, widths=(16,))
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    xs = jax.random.uniform(jax.random.PRNGKey(1), (20, 8, 8, 1))
    rep = certify_model(net, variables, xs, jnp.zeros(20, jnp.int32), ["0.1", "0.5"])
    print(format_certify(rep))      # rep["radii"]["0.1"]["certified"]: the fraction certified at L2 radius 0.1
    # a trained run: certify_workdir("runs/certified/gloro_mlp", "0.5,1.0,1.58", test_data="mnist",
    #                                test_data_dir="../shared/data/mnist", num_examples=1000, attack="apgd")

Cost: the bound (one trace of the model; per convolution a float64 FFT on the host), one forward pass per example
(plus K backward passes for the second-order certificate), and with the attack
``2 * len(radii) * 101`` forward and backward passes per example.
"""
from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.errors import ConfigError

__all__ = ["ATTACKS", "parse_radii", "check_certify_args", "certify_workdir", "certify_model", "format_certify",
           "broken_message"]

#: Attacks ``certify`` can run.
ATTACKS = ("apgd",)
APGD_STEPS = 100


def parse_radii(radii) -> list[tuple[str, float]]:
    """``[(key, value)]`` from ``"0.5,1.0,1.58"`` or a sequence of numbers; keys as written (strings keep the
    command line's spelling). Raises ``ConfigError`` for an empty list, a non-number, or a radius that is not
    finite and > 0."""
    if isinstance(radii, str):
        parts = [p.strip() for p in radii.split(",") if p.strip()]
    else:
        parts = [str(r) if not isinstance(r, str) else r for r in radii]
    if not parts:
        raise ConfigError("--radii needs at least one L2 radius, e.g. --radii 0.5,1.0,1.58")
    out = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise ConfigError(f"--radii: {p!r} is not a number; give L2 radii > 0 separated by commas, e.g. "
                              f"--radii 0.5,1.0,1.58") from None
        if not math.isfinite(v) or v <= 0:
            raise ConfigError(f"--radii: every radius must be a finite number > 0 (an L2 distance in the [0, 1] "
                              f"pixel scale), got {p}; e.g. --radii 0.5,1.0,1.58")
        out.append((p, v))
    return out


def check_certify_args(radii, attack, num_examples) -> list[tuple[str, float]]:
    """Validate the cheap arguments before anything is loaded; returns :func:`parse_radii`'s list."""
    parsed = parse_radii(radii)
    if attack is not None and attack not in ATTACKS:
        raise ConfigError(f"--attack {attack!r} is unknown; choose one of {ATTACKS} (or leave it out to only "
                          f"certify).")
    if num_examples is not None and (not isinstance(num_examples, int) or isinstance(num_examples, bool)
                                     or num_examples < 1):
        raise ConfigError(f"--num_examples must be a positive integer, got {num_examples!r}")
    return parsed


def _bound_or_error(model, variables, input_shape):
    from lcnn_jax.measures import curvature_bound

    try:
        return curvature_bound(model, variables, tuple(input_shape), num_iters=1)
    except ValueError as e:
        raise ConfigError(f"cannot certify this model: {e}") from e


def certify_model(model, variables, xs, ys, radii, *, attack: str | None = None, key=None,
                  batch_size: int = 250, bound=None) -> dict:
    """The certify report (see :func:`certify_workdir`) of ``model`` with ``variables`` on ``(xs, ys)``."""
    from lcnn_jax.measures import certified
    from lcnn_jax.nn import mode_kwargs

    parsed = check_certify_args(radii, attack, None)
    xs = jnp.asarray(xs, jnp.float32)
    ys_np = np.asarray(ys).astype(np.int64)
    if bound is None:
        bound = _bound_or_error(model, variables, xs.shape[1:])
    eval_kw = mode_kwargs(model, train=False)

    def logits_fn(v, x):
        return model.apply(v, x, **eval_kw)

    t0 = time.time()
    cert = certified.certify(lambda x: logits_fn(variables, x), xs, jnp.asarray(ys_np), bound,
                             batch_size=batch_size)
    n = int(xs.shape[0])
    clean = cert.margin > 0
    out = {"n": n, "clean_accuracy": float(np.mean(clean)), "radii": {},
           "certificate": cert.method,
           "bound": {"network_lipschitz": float(bound.network.lipschitz),
                     "network_curvature": float(bound.network.curvature),
                     "pairwise_lipschitz_max": (None if bound.pairwise_lipschitz is None
                                                else float(np.max(np.asarray(bound.pairwise_lipschitz)))),
                     "curvature_certificate": certified.curvature_certificate_is_sound(bound)},
           "certified_radius": {"median": float(np.median(cert.radius)), "mean": float(np.mean(cert.radius))},
           "certify_time_s": round(time.time() - t0, 2)}
    key = jax.random.PRNGKey(0) if key is None else key
    for i, (name, r) in enumerate(parsed):
        is_cert = cert.radius > r
        by = cert.certified_by(r)
        entry = {"certified": float(np.mean(is_cert)),
                 "certified_by": {s: int(np.sum(by == s)) for s in sorted(set(by[is_cert]))},
                 "robust_apgd": None, "certified_but_broken": None}
        if attack == "apgd":
            t1 = time.time()
            broken, dist = _apgd_broken(logits_fn, variables, xs, ys_np, r, jax.random.fold_in(key, i), batch_size)
            bad = is_cert & broken
            entry.update(robust_apgd=float(np.mean(~broken)), certified_but_broken=int(np.sum(bad)),
                         certified_but_broken_ids=[int(j) for j in np.nonzero(bad)[0][:20]],
                         certified_but_broken_within_radius=int(np.sum(bad & (dist < cert.radius))),
                         attack_time_s=round(time.time() - t1, 2))
        out["radii"][name] = entry
    return out


def _apgd_broken(logits_fn, variables, xs, ys, eps: float, key, batch_size: int):
    """Per example: whether APGD-CE or APGD-DLR (L2, ``eps``) found a misclassified point, and its float64
    distance from the clean input (``inf`` where none)."""
    from lcnn_jax.attacks import apgd_stepwise

    n = xs.shape[0]
    broken = np.zeros(n, bool)
    dist = np.full(n, np.inf)
    ys_j = jnp.asarray(ys, jnp.int32)
    k = None
    for li, loss in enumerate(("ce", "dlr")):
        for s in range(0, n, batch_size):
            x, y = xs[s:s + batch_size], ys_j[s:s + batch_size]
            if k is None:
                k = int(logits_fn(variables, x[:1]).shape[-1])
            if loss == "dlr" and k < 3:
                continue
            adv = apgd_stepwise(logits_fn, x, y, params=variables, norm="l2", eps=float(eps),
                                num_steps=APGD_STEPS, loss=loss, key=jax.random.fold_in(key, li * 100003 + s))
            pred = np.asarray(jnp.argmax(logits_fn(variables, adv), axis=-1))
            hit = pred != np.asarray(y)
            d = np.sqrt(np.sum((np.asarray(adv, np.float64) - np.asarray(x, np.float64)).reshape(len(hit), -1) ** 2,
                               axis=1))
            sl = slice(s, s + len(hit))
            dist[sl] = np.where(hit, np.minimum(dist[sl], d), dist[sl])
            broken[sl] |= hit
    return broken, dist


def certify_workdir(workdir: str, radii, *, test_data: str | None = None, test_data_dir: str | None = None,
                    num_examples: int | None = None, attack: str | None = None, member=None,
                    seed: int | None = None, method: str | None = None, batch_size: int = 250,
                    key=None) -> dict:
    """Certify the trained network of ``workdir`` (a run, a sweep member or a compare cell, chosen by ``member``/
    ``seed``/``method`` as in ``lcnn-jax measure``) on the first ``num_examples`` test images (all when None) of
    ``test_data`` (default: the run's own dataset's test split; ``"mnist"`` with ``test_data_dir`` a folder of
    IDX files) at each radius of ``radii``.

    Returns ``{"n", "clean_accuracy", "radii": {key: {"certified", "robust_apgd", "certified_but_broken",
    "certified_by", ...}}, "certificate", "bound", "certified_radius", "workdir", "member", "test_data",
    "checkpoint_step", "wall_time_s"}`` (fractions in [0, 1]; radius keys as given; the attack's entries None
    without ``attack``). Checks in this order, each before anything more expensive: the radii (> 0) and the attack
    name, the workdir and member choice, then the model's bounds (an operation without a bound rule is named).

    Raises:
      ConfigError: a bad radius, attack or count; a model the bounds cannot handle; an unusable workdir or choice.
      FileNotFoundError: no trained run in ``workdir``. DatasetError: the test data cannot be found.
    """
    from lcnn_jax import data as data_lib
    from lcnn_jax import runs

    t0 = time.time()
    parsed = check_certify_args(radii, attack, num_examples)
    wd = runs.inspect_workdir(workdir)
    chosen = runs.select_members(wd, member=member, seed=seed, method=method)
    if len(chosen) != 1:
        raise ConfigError(f"certify takes one network; {workdir} holds {len(chosen)} that match: choose one with "
                          f"--member, --seed or --method.")
    m, config, model, state, info = next(iter(runs.load_members(chosen)))
    variables = {"params": state.params, **state.model_state}
    bound = _bound_or_error(model, variables, info.image_shape)
    name = test_data or config.data.name
    data_dir = test_data_dir if test_data else config.data.get("data_dir")
    split = data_lib.load_split(name, "test", data_dir=data_dir)
    count = len(split.images) if num_examples is None else min(int(num_examples), len(split.images))
    xs, ys = split.images[:count], split.labels[:count]
    rep = certify_model(model, variables, xs, ys, [k for k, _ in parsed], attack=attack, key=key,
                        batch_size=batch_size, bound=bound)
    rep.update(workdir=os.path.abspath(workdir), member=m.label, test_data=name,
               test_data_dir=os.path.abspath(data_dir) if data_dir else None,
               checkpoint_step=int(jax.device_get(state.step)), attack=attack,
               wall_time_s=round(time.time() - t0, 2))
    return rep


def format_certify(rep: dict) -> str:
    """A small table: one row per radius (certified %, APGD robust %, certified but broken, certificates)."""
    lines = [f"{rep.get('member', '')}: n={rep['n']}  clean accuracy {100 * rep['clean_accuracy']:.1f} %  "
             f"(certificate: {rep['certificate']}; network Lipschitz bound {rep['bound']['network_lipschitz']:.4g})",
             f"{'radius':>8}  {'certified %':>11}  {'APGD robust %':>13}  {'cert.&broken':>12}  certified by"]
    for key, e in rep["radii"].items():
        rob = "-" if e["robust_apgd"] is None else f"{100 * e['robust_apgd']:.1f}"
        cb = "-" if e["certified_but_broken"] is None else str(e["certified_but_broken"])
        by = ", ".join(f"{k} {v}" for k, v in e["certified_by"].items()) or "-"
        lines.append(f"{key:>8}  {100 * e['certified']:>11.1f}  {rob:>13}  {cb:>12}  {by}")
    return "\n".join(lines)


def broken_message(rep: dict) -> str | None:
    """The loud message when any certified example was broken by the attack (None when none was)."""
    bad = {k: e["certified_but_broken"] for k, e in rep["radii"].items() if e.get("certified_but_broken")}
    if not bad:
        return None
    return ("CERTIFIED BUT BROKEN: the attack broke examples that were certified at the same radius (" +
            ", ".join(f"r={k}: {v} (ids {rep['radii'][k]['certified_but_broken_ids']})" for k, v in bad.items()) +
            "). A certificate or bound is wrong (or float32 rounding at the boundary); please report this.")

