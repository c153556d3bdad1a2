"""Compile time and run time of each measure, and the share of `lcnn-jax measure` spent compiling.

    python experiments/bench_measures.py [--model small_cnn] [--width 1.0] [--batch_size 128] [--repeats 3]
    python experiments/bench_measures.py --model resnet18 --width 0.125          # 32x32x3 inputs (random pixels)
    python experiments/bench_measures.py --measure_workdir runs/quickstart [--config.measure.KEY=VALUE ...]
    python experiments/bench_measures.py --one_shot --model resnet18 --width 0.125   # first call vs steady call

One-shot mode (``--one_shot``): what a researcher pays to measure a trained network once, outside ``jit``: the wall
time of the first call of ``hessian_trace`` (10 probes) and of ``hessian_top_eigenvalues`` (Lanczos, 20 steps) on the
mean cross-entropy of the batch, compilation included (JAX's caches cleared before each measure), against a second
call with the same loss (steady), and their ratio. ``--compilation_cache DIR`` turns on JAX's persistent cache there
(what the CLI does by default): run the command twice and the second run shows a fresh process whose programs were
compiled before (``jax.clear_caches`` empties only the in-memory caches). The library picks its loop itself (on the
CPU, for a loss that convolves: one compiled HVP called from the host per probe or Lanczos step,
:func:`lcnn_jax.loops.host_loop`).

Table mode: every measure is a ``jax.jit`` program whose arguments are the model variables and the batch (nothing
large is closed over), called with the library's defaults (unrolling included). ``compile`` is the time of
``jit(...).lower(...).compile()`` (tracing, lowering and XLA compilation), ``run`` the median wall time of
``--repeats`` calls of the compiled program, ``x grad`` the run time over that of ``jax.grad`` of the mean
cross-entropy of the same batch (w.r.t. the parameters), ``total`` = compile + one run: what a one-off call costs.
The small CNN gets the first ``--batch_size`` mnist5k test images; the ResNet-18 random uniform 32x32x3 images
(costs do not depend on the pixel values).

``--measure_workdir``: runs ``lcnn_jax.report.measure_members`` (what ``lcnn-jax measure --workdir DIR`` runs) and
adds up, from ``jax.monitoring``'s compile events, the wall time spent tracing, lowering and compiling (overlapping
nested traces counted once); prints the wall time, the compile time and their ratio, and the count of compiled
programs. The persistent compilation cache is off unless ``--compilation_cache DIR`` is given (the CLI's default
cache would make a second run of this benchmark measure cache reads, not compiles).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcnn_jax import attacks
from lcnn_jax.autodiff import batched_input_hvp
from lcnn_jax.measures import (gradient_stability, hessian_top_eigenvalues, hessian_trace, input_curvature,
                               jacobian_frobenius, local_lipschitz)
from lcnn_jax.nn import make_model, mode_kwargs


def compile_and_run(fn, args, repeats: int) -> tuple[float, float]:
    """``(compile seconds, median run seconds)`` of ``jax.jit(fn)`` on ``args``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    t_compile = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return t_compile, float(np.median(times))


def table_items(model, rows: str):
    """``{name: fn(variables, xs, ys, key)}`` of the benchmarked measures."""
    eval_kw = mode_kwargs(model, train=False)

    def logits_fn(v):
        return lambda xs: model.apply(v, xs, **eval_kw)

    def f(v):
        return lambda x: model.apply(v, x[None], **eval_kw)[0]

    def loss(v):
        return lambda x, y: optax.softmax_cross_entropy_with_integer_labels(f(v)(x), y)

    def batch_loss(params, v, xs, ys):
        logits = model.apply({**v, "params": params}, xs, **eval_kw)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

    items = {"plain gradient (reference)": lambda v, x, y, k: jax.grad(batch_loss)(v["params"], v, x, y)}
    if rows == "all":
        items.update({
            "input HVP (one per example)": lambda v, x, y, k: batched_input_hvp(
                loss(v), x, y, jax.random.normal(k, x.shape)),
            "Jacobian Frobenius, 1-probe estimate": lambda v, x, y, k: jacobian_frobenius(f(v), x, key=k),
            "Jacobian Frobenius, exact": lambda v, x, y, k: jacobian_frobenius(f(v), x),
            "curvature, 10 iterations": lambda v, x, y, k: input_curvature(loss(v), x, y, key=k, num_iters=10),
            "gradient stability": lambda v, x, y, k: gradient_stability(loss(v), x, y, key=k),
            "local Lipschitz, 20 iterations": lambda v, x, y, k: local_lipschitz(f(v), x, key=k, num_iters=20),
        })
    items.update({
        "PGD-Linf, 20 steps": lambda v, x, y, k: attacks.pgd(logits_fn(v), x, y, norm="linf", eps=0.1,
                                                             step_size=0.0125, num_steps=20, key=k),
        "APGD-CE L2, 100 steps": lambda v, x, y, k: attacks.apgd(logits_fn(v), x, y, norm="l2", eps=1.0,
                                                                 num_steps=100, key=k),
        "Hessian trace, 10 probes": lambda v, x, y, k: tuple(hessian_trace(
            lambda p: batch_loss(p, v, x, y), v["params"], key=k, num_probes=10)),
        "Hessian top eigenvalue, Lanczos 20": lambda v, x, y, k: hessian_top_eigenvalues(
            lambda p: batch_loss(p, v, x, y), v["params"], key=k, k=1, num_iters=20).eigenvalues,
    })
    return items


def _setup(args):
    """``(model, variables, xs, ys)`` of the table and one-shot modes."""
    if args.model == "resnet18":
        xs = jax.random.uniform(jax.random.key(2), (args.batch_size, 32, 32, 3))
        ys = jnp.arange(args.batch_size) % 10
        model = make_model("resnet18", 10, width_mult=args.width)
    else:
        from lcnn_jax.data import load_split

        split = load_split("mnist5k", "test")
        xs, ys = jnp.asarray(split.images[:args.batch_size]), jnp.asarray(split.labels[:args.batch_size])
        model = make_model(args.model, 10, **({"width_mult": args.width} if args.width != 1.0 else {}))
    variables = model.init(jax.random.PRNGKey(0), xs[:1], **mode_kwargs(model, train=False))
    return model, variables, xs, ys


def run_one_shot(args) -> None:
    if args.compilation_cache:  # JAX's persistent cache at its default thresholds, as the CLI sets it
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    model, variables, xs, ys = _setup(args)
    eval_kw = mode_kwargs(model, train=False)

    def loss(params):
        logits = model.apply({**variables, "params": params}, xs, **eval_kw)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

    n_params = sum(a.size for a in jax.tree_util.tree_leaves(variables["params"]))
    print(f"devices: {jax.devices()[0].platform}; model {args.model} width {args.width:g} ({n_params} parameters); "
          f"batch {args.batch_size}; load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'measure':<36}{'first call s':>14}{'steady s':>10}{'first / steady':>16}", flush=True)
    items = {"Hessian trace, 10 probes": lambda: hessian_trace(loss, variables["params"], key=jax.random.PRNGKey(1),
                                                                num_probes=10)[0],
             "Hessian top eigenvalue, Lanczos 20": lambda: hessian_top_eigenvalues(
                 loss, variables["params"], key=jax.random.PRNGKey(1), k=1, num_iters=20).eigenvalues}
    for name, call in items.items():
        if args.only and not any(o in name for o in args.only):
            continue
        jax.clear_caches()  # each measure's first call compiles everything it needs, as in a fresh process
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - t0)
        print(f"{name:<36}{times[0]:>14.2f}{times[1]:>10.2f}{times[0] / times[1]:>16.2f}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


def run_table(args) -> None:
    model, variables, xs, ys = _setup(args)
    key = jax.random.PRNGKey(1)
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(variables["params"]))
    print(f"devices: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); model {args.model} width "
          f"{args.width:g} ({n_params} parameters); batch {args.batch_size}; run = median of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'measure':<40}{'compile s':>11}{'run s':>10}{'total s':>10}{'x grad':>9}", flush=True)
    ref = None
    for name, fn in table_items(model, args.rows).items():
        if args.only and name != "plain gradient (reference)" and not any(s in name for s in args.only):
            continue
        tc, tr = compile_and_run(fn, (variables, xs, ys, key), args.repeats)
        ref = tr if ref is None else ref
        print(f"{name:<40}{tc:>11.2f}{tr:>10.3f}{tc + tr:>10.2f}{tr / ref:>9.2f}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


class CompileClock:
    """Wall time spent tracing, lowering and compiling, from ``jax.monitoring`` duration events; the intervals of
    nested traces overlap and are counted once."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.intervals: list[tuple[float, float]] = []
        self.backend_compiles = 0
        self.backend_seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_) -> None:
        if event in self.EVENTS:
            end = time.perf_counter()
            self.intervals.append((end - duration, end))
            if event == self.EVENTS[2]:
                self.backend_compiles += 1
                self.backend_seconds += duration

    def seconds(self, since: float = -np.inf) -> float:
        total, cur_start, cur_end = 0.0, None, None
        for s, e in sorted((max(s, since), e) for s, e in self.intervals if e > since):
            if cur_end is None or s > cur_end:
                total += 0.0 if cur_end is None else cur_end - cur_start
                cur_start, cur_end = s, e
            else:
                cur_end = max(cur_end, e)
        return total + (0.0 if cur_end is None else cur_end - cur_start)


def run_measure(args, overrides) -> None:
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    clock = CompileClock()
    from lcnn_jax.report import measure_members

    overrides = ["progress=False"] + overrides
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    results = measure_members(args.measure_workdir, overrides)
    wall = time.perf_counter() - t0
    comp = clock.seconds(since=t0)
    print(f"lcnn-jax measure --workdir {args.measure_workdir} {' '.join('--config.measure.' + o for o in overrides)}")
    print(f"devices: {jax.devices()[0].platform}; load average {load0:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end; persistent cache: {args.compilation_cache or 'off'}")
    print(f"wall {wall:.1f} s, compiling {comp:.1f} s ({100 * comp / wall:.0f} %; XLA backend alone "
          f"{clock.backend_seconds:.1f} s in {clock.backend_compiles} programs), running {wall - comp:.1f} s")
    rep = results[0][1]
    print({k: round(v["mean"], 4) for k, v in rep.get("test", {}).items()})


def main() -> None:
    argv = sys.argv[1:]
    overrides = [a[len("--config.measure."):] for a in argv if a.startswith("--config.measure.")]
    argv = [a for a in argv if not a.startswith("--config.measure.")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", choices=("all", "cost"), default="all",
                   help="'cost': only the gradient, PGD, APGD and Hessian rows")
    p.add_argument("--only", nargs="*", help="substrings of the row names to run (the gradient always runs)")
    p.add_argument("--one_shot", action="store_true", help="first call vs steady call of the Hessian measures")
    p.add_argument("--measure_workdir")
    p.add_argument("--compilation_cache", help="a directory for JAX's persistent compilation cache (default: off)")
    args = p.parse_args(argv)
    if args.measure_workdir:
        run_measure(args, overrides)
    elif args.one_shot:
        run_one_shot(args)
    else:
        run_table(args)


if __name__ == "__main__":
    main()
