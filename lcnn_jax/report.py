"""The measurement report of a trained network: every smoothness measure and attack on train and test examples.

This composes :mod:`lcnn_jax.measures` and :mod:`lcnn_jax.attacks` around a Flax model in eval mode; it is what
``lcnn-jax measure --workdir DIR`` runs. Per-example items are reported as ``{"mean", "std", "n"}`` (``std``: the
spread over the ``n`` examples); the parameter-space items as ``{"mean", "se", "n", "converged"}`` for the Hessian
trace by Hutchinson (``se``: the standard error of the mean of the ``n`` probes, ``std(ddof=1) / sqrt(n)``, printed
as ``s.e.``; files written before it was renamed say ``std`` for the same number) and
``{"mean", "n", "converged", "relative_residual"}`` for the top Hessian eigenvalue by Lanczos (``n`` its steps).
:func:`trace_warning` says when a trace estimate is too noisy to read (the report prints it).

Example::

    import jax
    from lcnn_jax import data, report
    from lcnn_jax import train as training
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

from lcnn_jax import attacks, loops
from lcnn_jax.batching import map_chunks
from lcnn_jax.estimators import MIN_TOL_PROBES, hutchinson_trace, lanczos_top_eigenvalues
from lcnn_jax.measures import (gradient_stability, hessian_top_eigenvalues, hessian_trace, input_curvature,
                               jacobian_frobenius, local_lipschitz)

from lcnn_jax.measure_config import (ROBUST_ATTACKS, measure_config_problems, measure_defaults,  # noqa: F401
                                     validate_measure_config)

# Item names in report order (per-split items first).
PER_EXAMPLE_ITEMS = ("jacobian_frobenius", "curvature", "hessian_norm", "grad_norm", "gradient_stability",
                     "local_lipschitz")


def check_finite_images(name: str, xs) -> None:
    """Raise :class:`lcnn_jax.data.DatasetError` when ``xs`` holds a NaN or infinite value, on the host, before
    anything is compiled: inside ``jit`` a NaN pixel gives NaN for some measures and finite, meaningless values
    for others (the ReLU Jacobian treats NaN as an inactive unit), with no message."""
    from lcnn_jax.data import DatasetError

    arr = np.asarray(xs)
    if not np.issubdtype(arr.dtype, np.floating):
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(len(arr), -1).any(axis=1))
        raise DatasetError(f"The {name} images hold {int(bad.sum())} NaN/inf pixel value(s), in {len(rows)} of "
                           f"{len(arr)} images (first: index {int(rows[0])}). The measures need finite inputs; "
                           f"remove or repair those images (e.g. xs[np.isfinite(xs).all(axis=(1, 2, 3))]).")


def _stats(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def model_functions(model, variables) -> tuple[Callable, Callable, Callable]:
    """``(f, loss_fn, logits_fn)`` of a Flax model in eval mode: one example -> logits, one example -> CE,
    and a batch -> logits. Evaluation mode is set by :func:`lcnn_jax.nn.mode_kwargs` (``train=False`` where the
    model's ``__call__`` takes it; nothing for a model without such an argument)."""
    from lcnn_jax.nn import mode_kwargs

    eval_kw = mode_kwargs(model, train=False)

    def logits_fn(xs):
        return model.apply(variables, xs, **eval_kw)

    def f(x):
        return logits_fn(x[None])[0]

    def loss_fn(x, y):
        return optax.softmax_cross_entropy_with_integer_labels(f(x), y)

    return f, loss_fn, logits_fn


def per_example_fn(model, cfg) -> Callable:
    """The jitted ``run(variables, xs, ys, key) -> {item: (B,)}`` of the per-example items. The variables and the
    data are arguments, so it compiles once and every chunk, split and network of the same architecture reuses it
    (one program per model and settings in a process)."""
    tol = cfg.get("lipschitz_tol")
    return _per_example_program(model, int(cfg.curvature_iters), float(cfg.stability_noise),
                                int(cfg.lipschitz_iters), None if tol is None else float(tol))


@functools.lru_cache(maxsize=None)
def _per_example_program(model, curvature_iters: int, stability_noise: float, lipschitz_iters: int,
                         lipschitz_tol: float | None) -> Callable:
    @jax.jit
    def run(variables, xs, ys, key):
        f, loss_fn, _ = model_functions(model, variables)
        k1, k2, k3 = jax.random.split(key, 3)
        curv = input_curvature(loss_fn, xs, ys, key=k1, num_iters=curvature_iters)
        lip = local_lipschitz(f, xs, key=k3, num_iters=lipschitz_iters, tol=lipschitz_tol, return_info=True)
        return {"jacobian_frobenius": jacobian_frobenius(f, xs),
                "curvature": curv["curvature"], "hessian_norm": curv["hessian_norm"], "grad_norm": curv["grad_norm"],
                "gradient_stability": gradient_stability(loss_fn, xs, ys, key=k2, noise_std=stability_noise),
                "local_lipschitz": lip.value, "local_lipschitz_residual": lip.relative_residual}

    return run


#: The relative residual below which ``local_lipschitz`` counts an example as converged in the report when
#: ``measure.lipschitz_tol`` is None (a fixed iteration count).
LIPSCHITZ_REPORT_TOL = 1e-3


def per_example_measures(model, variables, xs, ys, cfg, key, batch_size, run=None) -> dict:
    """Jacobian Frobenius norm (exact), LCNN curvature / Hessian norm / gradient norm, gradient stability and the
    local Lipschitz estimate, per example, as ``{item: {"mean", "std", "n"}}``."""
    run = per_example_fn(model, cfg) if run is None else run
    vals = map_chunks(functools.partial(run, variables), xs, ys, key=key, chunk_size=batch_size)
    out = {k: _stats(vals[k]) for k in PER_EXAMPLE_ITEMS}
    # How converged the power iteration is: the share of examples whose relative residual ||A u - lam u|| / lam
    # (A = J^T J) is within the tolerance, and the largest residual.
    if "local_lipschitz_residual" in vals:
        res = np.asarray(vals["local_lipschitz_residual"], np.float64)
        tol = cfg.get("lipschitz_tol") or LIPSCHITZ_REPORT_TOL
        out["local_lipschitz"]["converged_fraction"] = float(np.mean(res <= tol)) if res.size else 1.0
        out["local_lipschitz"]["max_relative_residual"] = float(res.max()) if res.size else 0.0
    # Share of examples where the output does not depend on the input at all (see dead_network_mark).
    jac = np.asarray(vals["jacobian_frobenius"], np.float64)
    out["jacobian_frobenius"]["zero_fraction"] = float(np.mean(jac < DEAD_JACOBIAN)) if jac.size else 0.0
    return out


def _attack_specs(cfg) -> list:
    """``[(column, kind, norm, eps, steps, options)]`` of the measure section's robust columns, in report order: for
    each radius of ``pgd_linf_eps`` then ``pgd_l2_eps``, ``apgd_<norm>_<eps>`` (when ``"apgd"`` is in
    ``robust_attacks``; options: losses, restarts) then ``pgd_<norm>_<eps>`` (when ``"pgd"`` is; option: the step
    factor, step = factor eps / steps), after both ``aa_<norm>_<eps>`` (when ``"autoattack"`` is: the standard
    version, 100 steps, 5000 queries)."""
    chosen = tuple(cfg.get("robust_attacks", ("pgd",)))
    apgd = (int(cfg.get("apgd_steps", 100)), {"losses": tuple(cfg.get("apgd_losses", ("ce", "dlr"))),
                                              "restarts": int(cfg.get("apgd_restarts", 1))})
    pgd = (int(cfg.pgd_steps), {"step_factor": float(cfg.pgd_step_factor)})
    out = []
    for norm, radii in (("linf", cfg.pgd_linf_eps), ("l2", cfg.pgd_l2_eps)):
        for eps in radii:
            eps = float(eps)
            if "apgd" in chosen:
                out.append((f"apgd_{norm}_{eps:g}", "apgd", norm, eps, *apgd))
            if "pgd" in chosen:
                out.append((f"pgd_{norm}_{eps:g}", "pgd", norm, eps, *pgd))
            if "autoattack" in chosen:
                out.append((f"aa_{norm}_{eps:g}", "autoattack", norm, eps, 100, {"version": "standard"}))
    return out


def attack_suite(cfg) -> dict:
    """``{column: {attack_name: attack}}`` of the measure section's attacks: ``pgd_<norm>_<eps>`` (one PGD, when
    ``"pgd"`` is in ``robust_attacks``) and ``apgd_<norm>_<eps>`` (APGD with every loss of ``apgd_losses``, when
    ``"apgd"`` is; the column is their per-example worst case), for each radius of ``pgd_linf_eps`` and
    ``pgd_l2_eps``. Every attack takes ``(logits_fn, xs, ys, key=)``. The ``aa_<norm>_<eps>`` columns are a
    cascade, not one attack: :func:`robustness` runs :func:`lcnn_jax.attacks.autoattack` for them."""
    out = {}
    for column, kind, norm, eps, steps, opts in _attack_specs(cfg):
        if kind == "autoattack":
            continue
        if kind == "apgd":
            out[column] = attacks.apgd_attacks(norm, eps, num_steps=steps, **opts)
        else:
            out[column] = {"pgd": functools.partial(attacks.pgd, norm=norm, eps=eps,
                                                    step_size=opts["step_factor"] * eps / steps, num_steps=steps)}
    return out


def robustness(model, variables, xs, ys, cfg, key, batch_size) -> dict:
    """Clean accuracy, robust accuracy at each radius under the attacks of :func:`attack_suite` (APGD worst case
    and/or PGD), and Gaussian-noise accuracy.

    Each kind of attack (APGD worst case or PGD, per norm) is ONE jitted program whose arguments are the variables,
    the chunk, the key and the radius, so it compiles once for every radius, split and network of the same
    architecture. Keys: column ``i`` (in :func:`attack_suite` order), chunk ``c``, attack ``j`` of the column get
    ``fold_in(fold_in(fold_in(key, i), c), j)``, as :func:`lcnn_jax.attacks.robust_accuracy_worst_case`; noise
    std ``i`` uses ``fold_in(fold_in(key, 1000 + i), c)``."""
    def mean_hits(program, k, *extra):
        hits = map_chunks(lambda x, y, kc: program(variables, x, y, kc, *extra), xs, ys, key=k,
                          chunk_size=batch_size)
        return float(np.mean(hits))

    out = {"accuracy": mean_hits(_clean_program(model), key)}
    stages = {}
    for i, (column, kind, norm, eps, steps, opts) in enumerate(_attack_specs(cfg)):
        if kind == "autoattack":  # the cascade chunks the points still robust itself
            res = attacks.autoattack(_batch_logits(model), xs, ys, params=variables, norm=norm, eps=eps,
                                     key=jax.random.fold_in(key, i), version=opts["version"], num_steps=steps,
                                     batch_size=batch_size, progress=False)
            out[column] = float(np.mean(res.robust))
            stages[column] = {s: int(np.sum(res.broken_by == s)) for s in res.per_stage if s != "clean"}
            continue
        out[column] = mean_hits(_robust_program(model, norm, kind, steps, **opts), jax.random.fold_in(key, i),
                                np.float32(eps))
    for i, std in enumerate(cfg.noise_std):
        out[f"noise_{std:g}"] = mean_hits(_noise_program(model), jax.random.fold_in(key, 1000 + i), np.float32(std))
    result = {k: {"mean": float(v), "std": 0.0, "n": int(xs.shape[0])} for k, v in out.items()}
    for column, counts in stages.items():  # how many points each stage broke (those it ran on were still robust)
        result[column]["broken_by"] = counts
    return result


def _attack_columns(model, cfg) -> list:
    """``[(column, program, eps)]`` in the order of :func:`attack_suite`: the radius is an argument of the program."""
    return [(column, _robust_program(model, norm, kind, steps, **opts), eps)
            for column, kind, norm, eps, steps, opts in _attack_specs(cfg) if kind != "autoattack"]


@functools.lru_cache(maxsize=None)
def _clean_program(model) -> Callable:
    @jax.jit
    def run(variables, x, y, key):
        del key
        return jax.numpy.argmax(model_functions(model, variables)[2](x), axis=-1) == y

    return run


@functools.lru_cache(maxsize=None)
def _noise_program(model) -> Callable:
    @jax.jit
    def run(variables, x, y, key, std):
        logits_fn = model_functions(model, variables)[2]
        return jax.numpy.argmax(logits_fn(attacks.gaussian_noise(x, key=key, std=std)), axis=-1) == y

    return run


@functools.lru_cache(maxsize=None)
def _batch_logits(model) -> Callable:
    """``apply(variables, xs) -> logits`` in eval mode: one function object per model, so the compiled pieces of
    :func:`lcnn_jax.attacks.apgd_stepwise` (cached per function) are shared by every network of the model."""

    def apply(variables, xs):
        return model_functions(model, variables)[2](xs)

    return apply


@functools.lru_cache(maxsize=None)
def _robust_program(model, norm: str, kind: str, steps: int, *, losses: tuple = (), restarts: int = 1,
                    step_factor: float = 2.5) -> Callable:
    """``run(variables, x, y, key, eps) -> (B,) bool``: correct on the clean input AND under every attack of the
    column (APGD with each loss, or PGD), the radius ``eps`` an argument.

    PGD (at most a few dozen steps, unrolled) is one jitted program. APGD runs through
    :func:`lcnn_jax.attacks.apgd_stepwise`, host-driven segments of 5 compiled steps: the same iterates as
    :func:`lcnn_jax.attacks.apgd`, without the rolled loop in which XLA:CPU runs a convolution's backward pass
    several times slower (:mod:`lcnn_jax.loops`; figures in ``experiments/results/loops.md``)."""
    apply = _batch_logits(model)

    @jax.jit
    def hits(variables, x, y, *advs):
        hit = jax.numpy.argmax(apply(variables, x), axis=-1) == y
        for xa in advs:
            hit = hit & (jax.numpy.argmax(apply(variables, xa), axis=-1) == y)
        return hit

    if kind == "apgd":
        def run(variables, x, y, key, eps):
            advs = [attacks.apgd_stepwise(apply, x, y, params=variables, norm=norm, eps=eps, num_steps=steps,
                                          loss=loss, restarts=restarts, key=jax.random.fold_in(key, j))
                    for j, loss in enumerate(losses)]
            return hits(variables, x, y, *advs)

        return run

    @jax.jit
    def run(variables, x, y, key, eps):
        xa = attacks.pgd(functools.partial(apply, variables), x, y, norm=norm, eps=eps,
                         step_size=step_factor * eps / steps, num_steps=steps, key=jax.random.fold_in(key, 0))
        return hits(variables, x, y, xa)

    return run


def model_bound(model, variables, input_shape):
    """The certified bounds (:func:`lcnn_jax.measures.curvature_bound`, eval mode) of a model for certified
    accuracy, or None when the model holds an operation the bounds have no rule for (then no certified items).
    The lower sides (diagnostics only) get one power iteration: the certificates use the upper sides."""
    from lcnn_jax.measures import curvature_bound

    try:
        return curvature_bound(model, variables, tuple(input_shape), num_iters=1)
    except ValueError as e:
        import warnings

        warnings.warn(f"no certified accuracy: {e}", stacklevel=2)
        return None


def certified_robustness(model, variables, xs, ys, cfg, bound, batch_size) -> dict:
    """``certified_l2_<eps>`` (the fraction of examples certified at each radius of ``certified_l2_eps``) and
    ``certified_radius`` (per-example certified L2 radius, 0 where misclassified: mean, std) from ``bound``
    (:func:`model_bound`); see :mod:`lcnn_jax.measures.certified`. Empty when there is no bound or no radius."""
    from lcnn_jax.measures import certified

    radii = tuple(cfg.get("certified_l2_eps", ()))
    if bound is None or not radii:
        return {}
    use_curv = certified.curvature_certificate_is_sound(bound)
    program = _margins_program(model, use_curv)
    terms = map_chunks(lambda x, y, k: program(variables, x, y), xs, ys, key=jax.random.PRNGKey(0),
                       chunk_size=batch_size)
    cert = certified.certified_radii(terms["logits"], ys, bound, terms.get("grad_norms"))
    n = int(xs.shape[0])
    out = {f"certified_l2_{float(e):g}": {"mean": cert.accuracy(float(e)), "std": 0.0, "n": n} for e in radii}
    out["certified_radius"] = _stats(cert.radius)
    out["certified_radius"]["method"] = cert.method
    return out


@functools.lru_cache(maxsize=None)
def _margins_program(model, gradients: bool) -> Callable:
    """``run(variables, x, y)``: :func:`lcnn_jax.measures.certified.margin_terms` of the model, compiled once."""
    from lcnn_jax.measures.certified import margin_terms

    @jax.jit
    def run(variables, x, y):
        return margin_terms(model_functions(model, variables)[2], x, y, gradients=gradients)

    return run


def parameter_hessian(model, variables, xs, ys, cfg, key) -> dict:
    """Hutchinson trace and Lanczos top eigenvalue of the parameter Hessian of the mean CE over ``xs``, from one
    program whose arguments are the parameters, the other variables and the data (compiled once per model and
    settings). With ``measure.hessian_tol`` both stop on that relative tolerance (trace: its standard error; top
    eigenvalue: its Lanczos residual), ``hessian_probes`` / ``hessian_lanczos_iters`` being the caps. Each item says
    how converged it is: ``n`` (probes or steps run), ``converged`` (None without a tolerance) and, for the
    eigenvalue, ``relative_residual`` (``||H y - lam y|| / |lam|``). The trace's ``se`` is the standard error of the
    mean of its probes, ``std(ddof=1) / sqrt(n)``; a negative trace also gets ``nonnegative`` (whether the exact
    trace is >= 0 for this network, :func:`linear_in_each_parameter`), read by :func:`trace_warning`."""
    tol = cfg.get("hessian_tol")
    tol = None if tol is None else float(tol)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    hvp = _parameter_hvp_program(model)
    if loops.host_loop(cfg.get("hessian_host_loop"), lambda p: hvp(p, rest, xs, ys, p), params):
        # one compiled HVP, the probes and Lanczos steps from the host (lcnn_jax.loops.host_loop): the same
        # estimates as the one-program path below, without compiling every probe of a convolutional net
        k1, k2 = jax.random.split(key)
        matvec = lambda v: hvp(params, rest, xs, ys, v)  # noqa: E731
        trace = hutchinson_trace(matvec, k1, params, int(cfg.hessian_probes), host_loop=True, tol=tol)
        top = lanczos_top_eigenvalues(matvec, k2, params, 1, int(cfg.hessian_lanczos_iters), host_loop=True,
                                      tol=tol)
        trace, top = jax.device_get((trace, top))
    else:
        program = _parameter_hessian_program(model, int(cfg.hessian_probes), int(cfg.hessian_lanczos_iters), tol)
        trace, top = jax.device_get(program(params, rest, xs, ys, key))
    lam, res = float(top.eigenvalues[0]), float(top.residuals[0])
    conv = lambda c: None if c is None else bool(c)  # noqa: E731
    tr = {"mean": float(trace.estimate), "se": float(trace.standard_error), "n": int(trace.num_probes),
          "converged": conv(trace.converged)}
    if tr["mean"] < 0:  # can the exact trace be negative? (checked only here: one more compiled program)
        tr["nonnegative"] = linear_in_each_parameter(model, variables, xs, jax.random.fold_in(key, 7))
    return {"hessian_trace": tr,
            "hessian_top_eigenvalue": {"mean": lam, "n": int(top.num_iters), "converged": conv(top.converged),
                                       "relative_residual": res / abs(lam) if lam else float("inf")}}


def trace_se(st: Mapping) -> float | None:
    """The standard error of a parameter-space item (``"se"``; ``"std"`` in files written before the rename,
    the same number), None where it has none."""
    v = st.get("se", st.get("std"))
    return None if v is None else float(v)


def trace_warning(st: Mapping, item: str = "hessian_trace") -> str | None:
    """One warning line for a Hutchinson trace estimate ``{"mean", "se", "n"}`` that should not be read as it
    stands, else None: one probe (no s.e.), an s.e. above ``|mean| / 2``, or a negative mean where ``st`` says
    ``"nonnegative": true`` (set by :func:`parameter_hessian` after :func:`linear_in_each_parameter`: the CE
    parameter Hessian of a network piecewise linear in each parameter, such as ReLU layers with max-pool and
    eval-mode batch norm, has the trace of its Gauss-Newton part, >= 0, so a negative estimate of it is noise).
    It names a probe count that brings the s.e. to about ``|mean| / 10`` (at least 10, the floor below which an
    s.e. is itself too noisy; s.e. falls as ``1 / sqrt(probes)``)."""
    mean, n, se = float(st["mean"]), int(st.get("n") or 0), trace_se(st) or 0.0
    reasons = []
    if n < 2:
        reasons.append("one probe gives no s.e.")
    elif se > abs(mean) / 2:
        reasons.append("its s.e. is more than half of |mean|")
    if mean < 0 and st.get("nonnegative"):
        reasons.append("it is negative, while this network is piecewise linear in each parameter (ReLU), so its "
                       "trace equals the Gauss-Newton trace, >= 0")
    if not reasons:
        return None
    if 1 < n < MIN_TOL_PROBES:
        reasons.append(f"an s.e. from {n} probes is itself unreliable")
    want = n * (se / (0.1 * abs(mean))) ** 2 if n > 1 and se > 0 and mean != 0 else 100.0
    probes = int(min(10_000, 10 * math.ceil(max(want, MIN_TOL_PROBES, 2 * n) / 10)))
    return (f"warning: {item} = {_fmt(mean)} +- {_fmt(se)} (s.e., {n} probe{'s' if n != 1 else ''}) is not "
            f"reliable: {'; '.join(reasons)}. Use about {probes} probes: --config.measure.hessian_probes={probes} "
            f"(or --config.measure.hessian_tol=0.1 with that many as the cap).")


def linear_in_each_parameter(model, variables, xs, key) -> bool:
    """Whether the logits on ``xs`` are linear in each parameter array with the others fixed (ReLU layers, max-pool,
    eval-mode batch norm: piecewise linear, so almost everywhere): the second derivative along a random direction
    inside each array is 0. Then the diagonal blocks of every logit's parameter Hessian vanish, and the trace of
    the CE parameter Hessian equals the trace of its Gauss-Newton part, which is >= 0. Cost: one forward pass with
    two tangents per parameter array."""
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    second = np.asarray(_second_derivatives_program(model)(params, rest, xs, key))
    return bool(np.all(second[:, 0] <= 1e-6 * np.maximum(second[:, 1], 1e-30)))


@functools.lru_cache(maxsize=None)
def _second_derivatives_program(model) -> Callable:
    from lcnn_jax.nn import mode_kwargs

    eval_kw = mode_kwargs(model, train=False)

    @jax.jit
    def run(params, rest, xs, key):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        out = []
        for i, leaf in enumerate(leaves):  # (max |d^2 logits / dt^2|, max |d logits / dt|) along leaf + t v
            v = jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)

            def logits(t, i=i, leaf=leaf, v=v):
                moved = leaves[:i] + [leaf + t * v] + leaves[i + 1:]
                return model.apply({"params": treedef.unflatten(moved), **rest}, xs, **eval_kw)

            zero = jax.numpy.zeros((), leaf.dtype)
            first, second = jax.jvp(lambda t: jax.jvp(logits, (t,), (jax.numpy.ones_like(t),))[1], (zero,),
                                    (jax.numpy.ones_like(zero),))
            out.append(jax.numpy.stack([jax.numpy.abs(second).max(), jax.numpy.abs(first).max()]))
        return jax.numpy.stack(out)

    return run


def _mean_ce(model, eval_kw: dict, params, *, rest, xs, ys):
    """The mean cross-entropy of ``model`` (eval mode) on ``(xs, ys)`` as a function of its parameters."""
    logits = model.apply({"params": params, **rest}, xs, **eval_kw)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()


@functools.lru_cache(maxsize=None)
def _parameter_hvp_program(model) -> Callable:
    """``hvp(params, rest, xs, ys, v)``: the parameter-Hessian-vector product of the mean CE, one jitted program
    per model (forward-over-reverse)."""
    from lcnn_jax.nn import mode_kwargs

    eval_kw = mode_kwargs(model, train=False)

    @jax.jit
    def hvp(params, rest, xs, ys, v):
        loss = functools.partial(_mean_ce, model, eval_kw, rest=rest, xs=xs, ys=ys)
        return jax.jvp(jax.grad(loss), (params,), (v,))[1]

    return hvp


@functools.lru_cache(maxsize=None)
def _parameter_hessian_program(model, probes: int, lanczos_iters: int, tol: float | None) -> Callable:
    from lcnn_jax.nn import mode_kwargs

    eval_kw = mode_kwargs(model, train=False)

    @jax.jit
    def run(params, rest, xs, ys, key):
        loss = functools.partial(_mean_ce, model, eval_kw, rest=rest, xs=xs, ys=ys)
        k1, k2 = jax.random.split(key)
        return (hessian_trace(loss, params, key=k1, num_probes=probes, tol=tol),
                hessian_top_eigenvalues(loss, params, key=k2, k=1, num_iters=lanczos_iters, tol=tol))

    return run


def measure_state(model, variables, splits: Mapping[str, tuple], cfg, *, key, train_for_hessian=None) -> dict:
    """The full report: ``{split: {item: stats}}`` plus ``"parameter_space"`` from ``train_for_hessian``
    (``(xs, ys)``; skipped when None). ``splits`` maps a name to ``(xs, ys)`` numpy arrays.

    Raises:
      lcnn_jax.data.DatasetError: an input image holds NaN/inf (checked on the host before anything compiles).
    """
    from tqdm.auto import tqdm

    for name, (xs, _) in splits.items():
        check_finite_images(name, xs)
    if train_for_hessian is not None:
        check_finite_images("parameter-Hessian (training)", train_for_hessian[0])
    bs = int(cfg.batch_size)
    tasks = [(name, part) for name in splits for part in ("measures", "robustness")]
    if train_for_hessian is not None:
        tasks.append(("parameter_space", "hessian"))
    report: dict = {}
    run = per_example_fn(model, cfg)
    bound = None
    if cfg.get("certified_l2_eps", ()) and splits:
        bound = model_bound(model, variables, np.shape(next(iter(splits.values()))[0])[1:])
    with tqdm(total=len(tasks), disable=not cfg.get("progress", True), desc="measure", unit="item") as bar:
        for i, (name, part) in enumerate(tasks):
            bar.set_postfix_str(f"{name}/{part}")
            k = jax.random.fold_in(key, i)
            if part == "measures":
                report.setdefault(name, {}).update(per_example_measures(model, variables, *splits[name], cfg, k, bs, run))
            elif part == "robustness":
                report.setdefault(name, {}).update(robustness(model, variables, *splits[name], cfg, k, bs))
                report[name].update(certified_robustness(model, variables, *splits[name], cfg, bound, bs))
            else:
                report[name] = parameter_hessian(model, variables, *train_for_hessian, cfg, k)
            bar.update(1)
    return report


def measure_settings(config, overrides: list[str] | None = None, compare_config=None) -> ml_collections.ConfigDict:
    """The validated ``measure`` section for a run trained with ``config``: :func:`measure_defaults`, updated by
    a compare run's ``compare.measure`` (and its ``compare.test_data``) when the run is one of its methods, then
    by the run's own ``measure`` section, then by ``overrides`` (``"key=value"`` or ``"measure.key=value"``).

    Raises:
      ConfigError: an unknown key or a bad value (every problem listed).
    """
    from lcnn_jax.configs import apply_overrides

    cfg = measure_defaults()
    cmp = compare_config.get("compare") if compare_config is not None else None
    if cmp:
        section = cmp.get("measure") or {}
        section = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        cfg.update({k: v for k, v in section.items() if k in cfg})
        if cmp.get("test_data"):
            cfg.test_data, cfg.test_data_dir = cmp.test_data, cmp.get("test_data_dir")
    if "measure" in config:
        cfg.update(config.measure)
    holder = ml_collections.ConfigDict({"measure": cfg})
    apply_overrides(holder, [o if o.startswith("measure.") else f"measure.{o}" for o in (overrides or [])])
    validate_measure_config(holder.measure)
    return holder.measure


def _measure_data(config, cfg, cache: dict) -> tuple[dict, tuple]:
    """``(splits, train_for_hessian)``: the first ``cfg.num_examples`` of each measured split and the first
    ``cfg.hessian_examples`` training examples of ``config``'s dataset (``cfg.test_data`` replaces the test split);
    ``cache`` keeps loaded splits across the members of one invocation."""
    from lcnn_jax import data as data_lib

    d = config.data

    def load(name, split, data_dir):
        key = (name, split, data_dir)
        if key not in cache:
            cache[key] = data_lib.load_split(name, split, data_dir=data_dir, download=d.get("download", False))
        return cache[key]

    loaded = {}
    for s in cfg.splits:
        name, data_dir = d.name, d.get("data_dir")
        if s == "test" and cfg.test_data:
            name, data_dir = cfg.test_data, cfg.test_data_dir
        split = load(name, s, data_dir)
        n = min(int(cfg.num_examples), len(split.images))
        loaded[s] = (split.images[:n], split.labels[:n])
    train = load(d.name, "train", d.get("data_dir"))
    nh = min(int(cfg.hessian_examples), len(train.images))
    return loaded, (train.images[:nh], train.labels[:nh])


def measure_members(workdir: str, overrides: list[str] | None = None, *, member=None, seed: int | None = None,
                    method: str | None = None) -> list[tuple]:
    """Measure the trained networks of ``workdir`` that the selectors name and return ``[(RunMember, report)]``.

    ``workdir`` is a training run, a sweep, a sweep's ``members/<id>`` folder or a compare run
    (:func:`lcnn_jax.runs.inspect_workdir`); ``member`` (an id, an index or ``"all"``), ``seed`` and ``method``
    choose among its members (:func:`lcnn_jax.runs.select_members`; a workdir of one network needs none).
    Each report is written atomically to the member's ``measures.json`` (the run's directory, or
    ``<sweep>/members/<id>/``); a compare run's members start from its ``compare.measure`` settings.
    Selection and settings are checked before anything is loaded; a damaged newest checkpoint is skipped with a
    warning (``checkpoint_step`` says which one was measured); a network that computes the same output for
    every input is marked ``dead`` (:func:`dead_network_mark`).

    Raises:
      lcnn_jax.runs.MemberChoiceError: a missing, ambiguous or wrong choice (the message lists the members).
      ConfigError: a bad measurement setting (all of them listed), or an unusable run directory.
      FileNotFoundError: no trained run in ``workdir``.
      lcnn_jax.data.DatasetError: a dataset cannot be found, or holds NaN/inf pixels.
    """
    from lcnn_jax import runs
    from lcnn_jax.io import write_json_atomic

    wd = runs.inspect_workdir(workdir)
    chosen = runs.select_members(wd, member=member, seed=seed, method=method)
    settings = [measure_settings(runs.member_config(m), overrides, wd.config) for m in chosen]
    out, cache = [], {}
    for (m, config, model, state, _), cfg in zip(runs.load_members(chosen), settings):
        splits, train_xy = _measure_data(config, cfg, cache)
        variables = {"params": state.params, **state.model_state}
        rep = measure_state(model, variables, splits, cfg, key=jax.random.PRNGKey(int(cfg.seed)),
                            train_for_hessian=train_xy)
        rep["measure_config"] = cfg.to_dict()
        rep["test_data"] = cfg.test_data or config.data.name
        rep["checkpoint_step"] = int(jax.device_get(state.step))
        rep["dead"] = dead_network_mark(rep, runs.member_results(m))
        if m.index is not None:
            rep["member"] = {"id": m.id, "index": m.index, "seed": m.seed, "grid": dict(m.values),
                             "method": m.method, "sweep_workdir": os.path.abspath(m.run_dir)}
        os.makedirs(m.out_dir, exist_ok=True)
        write_json_atomic(os.path.join(m.out_dir, "measures.json"), rep)
        out.append((m, rep))
    return out


def measure_workdir(workdir: str, overrides: list[str] | None = None, *, member=None, seed: int | None = None,
                    method: str | None = None) -> dict:
    """Load the newest intact checkpoint of a training run (or of the one member of a sweep or compare run the
    selectors name), measure it, write its ``measures.json`` atomically and return the report. ``overrides`` are
    ``"key=value"`` strings for the ``measure`` section (e.g. ``num_examples=64``). See :func:`measure_members`,
    which this is for exactly one network.

    Raises:
      lcnn_jax.runs.MemberChoiceError: ``workdir`` holds several networks and the selectors do not name one.
      ConfigError: a bad measurement setting (all of them listed), or an unusable run directory.
      FileNotFoundError: no trained run in ``workdir``.
      lcnn_jax.data.DatasetError: a dataset cannot be found, or holds NaN/inf pixels.
    """
    from lcnn_jax import runs

    if isinstance(member, str) and member.strip().lower() == "all":
        raise runs.MemberChoiceError("measure_workdir measures one network; use measure_members for member='all'.")
    return measure_members(workdir, overrides, member=member, seed=seed, method=method)[0][1]


DEAD_JACOBIAN = 1e-6  # inputs in [0, 1]: a live network's input-Jacobian Frobenius norm is O(1) or more
DEAD_SHARE = 0.99  # as training.DEAD_COLLAPSE: the share of examples beyond which the network counts as dead


def dead_network_mark(rep: dict, results: dict | None = None) -> dict | None:
    """None for a live network; for a dead one, ``{"reason": ...}``.

    Dead when training flagged it (``results["dead"]``, see :func:`lcnn_jax.train.dead_network`), or when the
    input-Jacobian Frobenius norm is below 1e-6 (exactly 0 where every ReLU is off) on at least 99 % of the
    examples of every measured split. Then Jacobian, curvature and Lipschitz values near 0 describe a constant
    function, not a smooth classifier, and must not be read as the best smoothness of a table."""
    if results and results.get("dead"):
        return {"reason": f"flagged by training: {results.get('dead_reason', 'a constant output')}, train "
                          f"accuracy {results.get('train_accuracy', float('nan')):.3f}"}
    shares = [rep[s]["jacobian_frobenius"].get("zero_fraction", 0.0) for s in ("train", "test")
              if s in rep and "jacobian_frobenius" in rep[s]]
    if shares and all(x >= DEAD_SHARE for x in shares):
        return {"reason": f"the input-Jacobian is 0 on {100 * min(shares):.0f} % or more of the measured examples: "
                          f"the output does not depend on the input there"}
    return None


def format_report(rep: dict) -> str:
    """A plain-text table: one row per item, one column per split (mean +- std over the examples), then the
    parameter-space items (mean +- s.e. of the estimator where it has one) and a :func:`trace_warning` line
    where the trace estimate is too noisy to read. A dead network (``rep["dead"]``) is marked above the header and
    in every smoothness row, so its zeros are not read as smoothness."""
    splits = [s for s in ("train", "test") if s in rep]
    items = list(dict.fromkeys(k for s in splits for k in rep[s]))
    w = max([len(i) for i in items] + [22])
    lines = []
    dead = rep.get("dead")
    if dead:
        lines.append("DEAD NETWORK: smoothness values near 0 below describe a constant function, not a smooth "
                     f"one ({dead['reason']})")
    lines.append(f"{'item':<{w}}" + "".join(f"{s:>28}" for s in splits))
    for item in items:
        row = f"{item:<{w}}"
        for s in splits:
            st = rep[s].get(item)
            row += f"{'-':>28}" if st is None else f"{_fmt(st['mean']):>14} +- {_fmt(st['std']):<10}"
        lines.append(row + ("  (dead network)" if dead and item in PER_EXAMPLE_ITEMS else ""))
    warnings = []
    for item, st in rep.get("parameter_space", {}).items():
        se = trace_se(st) if item == "hessian_trace" else None
        spread = f"{'':14}" if se is None else f" +- {_fmt(se):<10}"
        what = f"s.e. of {st.get('n', '?')} probes" if se is not None else f"{st.get('n', '?')} Lanczos steps"
        lines.append(f"{item:<{w}}{_fmt(st['mean']):>14}{spread}  (parameter space; {what})")
        warnings += [trace_warning(st, item)] if item == "hessian_trace" else []
    for s in splits:  # AutoAttack: which stage broke how many points
        for item, st in rep[s].items():
            if isinstance(st, Mapping) and st.get("broken_by"):
                broke = ", ".join(f"{stage} {count}" for stage, count in st["broken_by"].items())
                lines.append(f"{item} ({s}): broken by {broke}")
    return "\n".join(lines + [x for x in warnings if x])


# Which items a terminal shows first when a table of several networks does not fit (see
# lcnn_jax.tables.priority_order): accuracy, one robust accuracy, input smoothness, then the rest.
MEMBERS_PRIORITY = ("accuracy", ("aa_l2_*", "apgd_l2_*", "pgd_l2_*", "aa_linf_*", "apgd_linf_*", "pgd_linf_*"),
                    "curvature", "jacobian_frobenius", "aa_*", "apgd_*", "pgd_*", "certified_l2_*", "noise_*",
                    "local_lipschitz",
                    "hessian_trace", "gradient_stability", "hessian_norm", "grad_norm", "hessian_top_eigenvalue")


def format_members(results, *, width: int = 120) -> tuple[str, list[str]]:
    """One row per measured network (``[(RunMember, report)]`` from :func:`measure_members`), one column per
    item: the mean on the test split (else the first split measured), then the parameter-space items; limited to
    the columns that fit ``width`` characters; below it, a :func:`trace_warning` line per network whose Hessian
    trace is too noisy to read. Returns the text and the items left out (each network's ``measures.json`` has
    them all)."""
    from lcnn_jax.tables import format_table, priority_order

    def split_of(rep):
        return "test" if "test" in rep else next((s for s in ("train",) if s in rep), None)

    items = []
    for _, rep in results:
        s = split_of(rep)
        items += [("split", k) for k in (rep[s] if s else {})] + [("parameter_space", k)
                                                                  for k in rep.get("parameter_space", {})]
    items = list(dict.fromkeys(items))
    items = [items[i] for i in priority_order([k for _, k in items], MEMBERS_PRIORITY)]  # shown in that order
    split_names = sorted({split_of(rep) for _, rep in results} - {None})
    header = ["network"] + [k for _, k in items]
    rows = []
    for m, rep in results:
        s = split_of(rep)
        row = [m.label.removeprefix("member ") + (" DEAD" if rep.get("dead") else "")]
        for where, k in items:
            st = (rep.get("parameter_space", {}) if where == "parameter_space" else rep.get(s, {})).get(k)
            row.append("-" if st is None else _fmt(st["mean"]))
        rows.append(row)
    text, hidden = format_table(header, rows, fixed=1, width=width)
    note = (f"means over the measured {'/'.join(split_names)} examples; hessian_trace and hessian_top_eigenvalue: "
            f"parameter Hessian of the training loss")
    warnings = [f"{m.label.removeprefix('member ')}: {w}" for m, rep in results
                if "hessian_trace" in rep.get("parameter_space", {})
                and (w := trace_warning(rep["parameter_space"]["hessian_trace"]))]
    return "\n".join([note, text] + warnings), [header[i] for i in hidden]


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)
