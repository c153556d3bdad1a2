"""Cost of exact per-layer Hessian traces (minimum sharpness) against brute force and Hutchinson, one network.

    python experiments/bench_sharpness.py [--model ms_mlp|mlp|lenet] [--num_examples 1000] [--sgd_steps 50]
                                          [--probe_entries 128] [--pilot_probes 20] [--rel_se 0.01]
                                          [--out experiments/results/sharpness]

Network: ``make_model(--model, 10)`` (default the 784-512-128-512-10 ReLU MLP of the minimum-sharpness paper),
at initialisation or after ``--sgd_steps`` plain SGD steps (lr 0.1, batch 64) on mnist5k; the loss is the mean
cross-entropy over the first ``--num_examples`` mnist5k training images. Rows:

(a) exact per-layer traces, :func:`lcnn_jax.measures.layer_hessian_traces` (1 forward + K backward passes per
    example), and :func:`lcnn_jax.measures.minimum_sharpness` in total (the traces plus the Newton solve);
(b) brute-force diagonal: entry ``e_i^T H e_i`` from one Hessian-vector product per parameter (forward-over-reverse
    HVP of the batch loss), and, cheaper, from the second directional derivative ``d^2/dt^2 L(theta + t e_i)``
    (forward-over-forward). Each is scheduled either vmapped ``--hvp_batch`` entries at a time or as a host loop of
    single jitted calls, whichever a trial on ``--hvp_batch`` entries finds faster. The full Hessian (``P^2``
    entries) is out of reach, and so is running all ``P`` products: both are timed on ``--probe_entries`` random
    parameters and the time is EXTRAPOLATED linearly to all ``P`` parameters (every entry costs the same); the
    sampled entries are checked against the exact diagonal;
(c) Hutchinson, :func:`lcnn_jax.measures.hessian_trace`, with as many Rademacher probes as a 1 % relative
    standard error needs: a pilot of ``--pilot_probes`` gives the per-probe std, ``n = (std / (rel_se * mean))^2``,
    and n probes are run and timed if that takes at most ``--max_hutchinson_s`` (else the pilot's time per probe
    times n is reported, marked as extrapolated);
(d) :func:`lcnn_jax.measures.normalized_sharpness` (exact diagonal + per-layer alternating minimisation).

Everything is compiled (or run once) before it is timed; (a) and (d) report the median of ``--repeats`` runs.
Targets (issue: minimum sharpness): exact traces >= 50x faster than the brute-force diagonal, and faster than
1 %-accurate Hutchinson. All ratios come from one run (one process, same load). The table is printed and written to
``--out`` as ``bench_<model>.json`` and ``bench_<model>.md`` (atomically).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from lcnn_jax.data import batches, load_split
from lcnn_jax.measures import hessian_trace, layer_hessian_traces, minimum_sharpness, normalized_sharpness
from lcnn_jax.nn import make_model
from lcnn_jax.io import write_text_atomic


def probes_for_relative_error(probe_std: float, mean: float, rel_se: float) -> int:
    """Hutchinson probes ``n`` with ``std / sqrt(n) <= rel_se * |mean|``: ``ceil((std / (rel_se |mean|))^2)``."""
    if not (rel_se > 0 and mean != 0 and math.isfinite(probe_std) and math.isfinite(mean)):
        raise ValueError(f"need rel_se > 0 and a finite, nonzero mean; got std={probe_std}, mean={mean}, "
                         f"rel_se={rel_se}.")
    return max(1, math.ceil((probe_std / (rel_se * abs(mean))) ** 2))


def diagonal_entry(loss_flat, method: str = "hvp"):
    """``entry(flat, i) -> H_ii`` of ``loss_flat`` at the flat parameter vector ``flat``, for one index ``i``.

    ``method="hvp"``: ``(H e_i)_i`` from one forward-over-reverse Hessian-vector product (4-5 passes).
    ``method="fwd2"``: ``d^2/dt^2 loss_flat(flat + t e_i)`` at 0 by forward-over-forward (about 3 forward passes).
    """
    if method == "hvp":
        grad = jax.grad(loss_flat)

        def entry(flat, i):
            e = jnp.zeros_like(flat).at[i].set(1.0)
            return jax.jvp(grad, (flat,), (e,))[1][i]
    elif method == "fwd2":
        def entry(flat, i):
            e = jnp.zeros_like(flat).at[i].set(1.0)
            first = lambda f: jax.jvp(loss_flat, (f,), (e,))[1]  # noqa: E731
            return jax.jvp(first, (flat,), (e,))[1]
    else:
        raise ValueError(f"method must be 'hvp' or 'fwd2', got {method!r}.")
    return entry


def brute_force_diagonal(loss_flat, flat, indices, *, method: str = "hvp", batch_size: int = 0):
    """``H_ii`` for each index in ``indices`` (see :func:`diagonal_entry`), with one of two schedules.

    ``batch_size >= 1``: one jitted ``lax.map`` that vmaps ``batch_size`` entries at a time (best for dense
    layers). ``batch_size == 0``: a host loop over one jitted single-entry program (no ``lax`` loop around the
    model: on XLA:CPU vmapped or looped convolutions can be several times slower per entry than single calls).
    Returns ``(values, seconds)``, compiled first so the time is steady-state.
    """
    entry = diagonal_entry(loss_flat, method)
    indices = jnp.asarray(indices)
    if batch_size >= 1:
        fn = jax.jit(lambda f, idx: jax.lax.map(lambda i: entry(f, i), idx, batch_size=batch_size))
        return _compiled_time(fn, flat, indices)
    one = jax.jit(entry).lower(flat, indices[0]).compile()
    t0 = time.perf_counter()
    vals = jnp.stack([one(flat, i) for i in indices])
    jax.block_until_ready(vals)
    return vals, time.perf_counter() - t0


def _median_time(fn, repeats: int):
    out = jax.block_until_ready(fn())  # compile / warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def _compiled_time(jitted, *args):
    """Compile ``jitted`` for ``args`` without running it, then time one run; returns (output, seconds)."""
    compiled = jitted.lower(*args).compile()
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, time.perf_counter() - t0


def _train(model, params, train, steps: int, *, lr: float = 0.1, batch_size: int = 64):
    if steps <= 0:
        return params
    tx = optax.sgd(lr)
    opt = tx.init(params)

    @jax.jit
    def step(p, o, x, y):
        loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            model.apply({"params": q}, x, train=True), y).mean()
        updates, o = tx.update(jax.grad(loss)(p), o)
        return optax.apply_updates(p, updates), o

    done, epoch = 0, 0
    while done < steps:
        for b in batches(train, batch_size, seed=0, epoch=epoch):
            params, opt = step(params, opt, b["image"], b["label"])
            done += 1
            if done == steps:
                break
        epoch += 1
    return params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ms_mlp", choices=("ms_mlp", "mlp", "lenet"))
    p.add_argument("--num_examples", type=int, default=1000)
    p.add_argument("--sgd_steps", type=int, default=50)
    p.add_argument("--probe_entries", type=int, default=128)
    p.add_argument("--hvp_batch", type=int, default=16)
    p.add_argument("--pilot_probes", type=int, default=20)
    p.add_argument("--rel_se", type=float, default=0.01)
    p.add_argument("--max_hutchinson_s", type=float, default=60.0)
    p.add_argument("--chunk_size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("experiments", "results", "sharpness"))
    args = p.parse_args()

    train = load_split("mnist5k", "train")
    if not 0 < args.num_examples <= len(train.images):
        p.error(f"--num_examples must be in 1..{len(train.images)}")
    xs = jnp.asarray(train.images[:args.num_examples])
    ys = jnp.asarray(train.labels[:args.num_examples])
    model = make_model(args.model, 10)
    variables = model.init(jax.random.PRNGKey(args.seed), xs[:1], train=False)
    if set(variables) != {"params"}:
        raise SystemExit(f"{args.model} has non-parameter collections {sorted(variables)}; the exact traces need a "
                         "network without normalisation layers.")
    params = _train(model, variables["params"], train, args.sgd_steps)

    logits_fn = lambda p_, x: model.apply({"params": p_}, x[None], train=False)[0]  # noqa: E731

    def loss_tree(p_):
        logits = model.apply({"params": p_}, xs, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

    flat, unravel = ravel_pytree(params)
    n_params = int(flat.size)
    loss_flat = lambda f: loss_tree(unravel(f))  # noqa: E731

    dev = jax.devices()[0]
    print(f"devices: {jax.device_count()} x {dev.device_kind} ({dev.platform}); model {args.model} "
          f"({n_params:,} parameters) after {args.sgd_steps} SGD steps; mean CE over {args.num_examples} mnist5k "
          f"training images; (a),(d): median of {args.repeats}")
    print(f"{'method':<44}{'seconds':>11}{'x exact':>10}  note", flush=True)

    rows = []

    def row(name, t, note):  # printed as soon as measured, so a slow later row never hides the earlier ones
        rows.append({"method": name, "seconds": t, "x_exact": t / t_exact, "note": note})
        print(f"{name:<44}{t:>11.2f}{t / t_exact:>10.1f}  {note}", flush=True)

    # (a) exact traces and minimum sharpness.
    traces, t_exact = _median_time(
        lambda: layer_hessian_traces(logits_fn, params, xs, chunk_size=args.chunk_size), args.repeats)
    exact_total = float(sum(float(v) for v in jax.tree.leaves(traces)))
    ms, t_ms = _median_time(lambda: minimum_sharpness(logits_fn, params, xs, chunk_size=args.chunk_size),
                            args.repeats)
    row("(a) exact per-layer traces", t_exact, "measured")
    row("(a) minimum_sharpness (traces + Newton)", t_ms, "measured")

    # (b) brute-force diagonal on sampled entries, extrapolated to all parameters.
    diag = layer_hessian_traces(logits_fn, params, xs, chunk_size=args.chunk_size, diagonal=True)
    diag_flat = ravel_pytree(diag)[0]
    m = min(args.probe_entries, n_params)
    idx = jnp.asarray(np.random.default_rng(args.seed).choice(n_params, m, replace=False))
    n_nonzero = int(jnp.sum(diag_flat[idx] != 0))
    brute = {}
    for method, label in (("hvp", "one HVP per parameter"), ("fwd2", "2nd directional derivative")):
        # Pick the faster schedule on a few entries (per-entry cost does not depend on the entry), then time the
        # whole sample with it.
        k = min(args.hvp_batch, m)
        t_loop = brute_force_diagonal(loss_flat, flat, idx[:k], method=method, batch_size=0)[1] / k
        t_vmap = brute_force_diagonal(loss_flat, flat, idx[:k], method=method, batch_size=k)[1] / k
        schedule = args.hvp_batch if t_vmap < t_loop else 0
        vals, t_sample = brute_force_diagonal(loss_flat, flat, idx, method=method, batch_size=schedule)
        ref = diag_flat[idx]
        err = float(jnp.max(jnp.abs(vals - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))
        t_all = t_sample * n_params / m
        brute[method] = (t_all, t_sample, err)
        how = f"vmapped {args.hvp_batch} at a time" if schedule else "one jitted call each"
        row(f"(b) brute force, {label}", t_all,
            f"EXTRAPOLATED: {t_sample:.2f} s for {m} entries ({how}; trial on {k}: "
            f"{1000 * t_loop:.0f} ms/entry looped, {1000 * t_vmap:.0f} vmapped) x {n_params:,}/{m}")

    # (c) Hutchinson with enough probes for the requested relative standard error.
    key = jax.random.PRNGKey(args.seed + 1)
    hutch = lambda n: jax.jit(lambda p_, k: hessian_trace(loss_tree, p_, key=k, num_probes=n))  # noqa: E731
    (est, se), t_pilot = _compiled_time(hutch(args.pilot_probes), params, key)
    probe_std = float(se) * math.sqrt(args.pilot_probes)
    n_needed = probes_for_relative_error(probe_std, float(est), args.rel_se)
    t_per_probe = t_pilot / args.pilot_probes
    hutch_measured = n_needed * t_per_probe <= args.max_hutchinson_s
    if hutch_measured:
        (est_n, se_n), t_hutch = _compiled_time(hutch(n_needed), params, jax.random.PRNGKey(args.seed + 2))
        hutch_note = (f"measured, {n_needed} probes: {float(est_n):.4g} +- {float(se_n):.2g} "
                      f"({100 * float(se_n) / abs(float(est_n)):.2f} % s.e.)")
    else:
        est_n, se_n = est, se
        t_hutch = t_per_probe * n_needed
        hutch_note = f"EXTRAPOLATED: {1000 * t_per_probe:.1f} ms/probe (pilot) x {n_needed} probes"
    # For a piecewise-linear network the exact diagonal IS the Hessian's, so Hutchinson must agree within its s.e.
    z_hutch = (float(est_n) - exact_total) / float(se_n)
    row(f"(c) Hutchinson, {100 * args.rel_se:g} % rel. s.e.", t_hutch, hutch_note)

    # (d) normalized sharpness.
    ns, t_ns = _median_time(lambda: normalized_sharpness(logits_fn, params, xs, chunk_size=args.chunk_size),
                            args.repeats)
    row("(d) normalized_sharpness", t_ns, f"measured; converged={ns.converged}, max iterations {ns.iterations}")

    print()
    print(f"exact total trace {exact_total:.4g}; Hutchinson pilot ({args.pilot_probes} probes) {float(est):.4g} "
          f"+- {float(se):.2g}, per-probe std {probe_std:.3g} -> {n_needed} probes for {100 * args.rel_se:g} %")
    print(f"minimum sharpness {ms.value:.4g} (converged={ms.converged}, {ms.iterations} Newton iterations); "
          f"normalized sharpness {ns.value:.4g}")
    for method, (t_all, t_sample, err) in brute.items():
        print(f"brute force [{method}]: sampled {m} entries ({n_nonzero} nonzero) agree with the exact diagonal "
              f"to max|diff| / max|exact| = {err:.1e}")
    best_brute = min(v[0] for v in brute.values())
    r_brute, r_hutch = best_brute / t_exact, t_hutch / t_exact
    print(f"ratio brute force (cheaper of the two, extrapolated) / exact traces = {r_brute:.0f}x "
          f"(target >= 50x: {'met' if r_brute >= 50 else 'NOT met'})")
    print(f"ratio Hutchinson-{100 * args.rel_se:g}% / exact traces = {r_hutch:.1f}x "
          f"(target > 1x: {'met' if r_hutch > 1 else 'NOT met'})")
    print(f"Hutchinson estimate - exact total trace = {z_hutch:+.2f} standard errors")
    write_report(args, {
        "model": args.model, "num_parameters": n_params, "num_examples": args.num_examples,
        "sgd_steps": args.sgd_steps, "device": f"{jax.device_count()} x {dev.device_kind} ({dev.platform})",
        "repeats": args.repeats, "rows": rows, "exact_total_trace": exact_total,
        "hutchinson": {"pilot_probes": args.pilot_probes, "pilot_estimate": float(est), "pilot_stderr": float(se),
                       "per_probe_std": probe_std, "probes_for_target": n_needed, "target_rel_se": args.rel_se,
                       "measured": hutch_measured, "estimate": float(est_n), "stderr": float(se_n),
                       "z_vs_exact": z_hutch},
        "minimum_sharpness": ms.value, "normalized_sharpness": ns.value,
        "brute_force": {k: {"extrapolated_seconds": v[0], "sample_seconds": v[1], "max_rel_diff_vs_exact": v[2]}
                        for k, v in brute.items()},
        "brute_force_entries_sampled": m, "brute_force_entries_nonzero": n_nonzero,
        "ratio_brute_over_exact": r_brute, "ratio_hutchinson_over_exact": r_hutch,
        "target_brute_50x_met": bool(r_brute >= 50), "target_faster_than_hutchinson_met": bool(r_hutch > 1),
    })


def write_report(args, report: dict) -> None:
    """``bench_<model>.json`` and ``bench_<model>.md`` in ``args.out``, each through a temporary file."""
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_{args.model}")
    lines = [f"# Exact per-layer Hessian traces vs brute force vs Hutchinson ({args.model})", "",
             f"`python experiments/bench_sharpness.py --model {args.model} --num_examples {args.num_examples} "
             f"--sgd_steps {args.sgd_steps} --probe_entries {args.probe_entries}`; {report['device']}; "
             f"{report['num_parameters']:,} parameters, mean CE over {args.num_examples} mnist5k training images "
             f"after {args.sgd_steps} SGD steps. Times in seconds, one process.", "",
             "| method | seconds | x exact | note |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['seconds']:.2f} | {r['x_exact']:.1f} | {r['note']} |" for r in report["rows"]]
    h = report["hutchinson"]
    lines += ["", f"- brute force / exact traces: **{report['ratio_brute_over_exact']:.0f}x** (target >= 50x: "
              f"{'met' if report['target_brute_50x_met'] else 'NOT met'}); extrapolated from "
              f"{report['brute_force_entries_sampled']} sampled entries, which agree with the exact diagonal to "
              + ", ".join(f"{k} {v['max_rel_diff_vs_exact']:.1e}" for k, v in report["brute_force"].items())
              + " (max |diff| / max |exact|).",
              f"- Hutchinson at {100 * h['target_rel_se']:g} % relative s.e. / exact traces: "
              f"**{report['ratio_hutchinson_over_exact']:.1f}x** (target > 1x: "
              f"{'met' if report['target_faster_than_hutchinson_met'] else 'NOT met'}); per-probe std "
              f"{h['per_probe_std']:.3g} from a {h['pilot_probes']}-probe pilot -> {h['probes_for_target']} probes; "
              f"estimate {h['estimate']:.4g} +- {h['stderr']:.2g} vs exact total trace "
              f"{report['exact_total_trace']:.4g} ({h['z_vs_exact']:+.2f} s.e.).",
              f"- minimum sharpness {report['minimum_sharpness']:.4g}, normalized sharpness "
              f"{report['normalized_sharpness']:.4g}."]
    for path, text in ((stem + ".md", "\n".join(lines) + "\n"),
                       (stem + ".json", json.dumps(report, indent=2, sort_keys=True))):
        write_text_atomic(path, text)
    print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
