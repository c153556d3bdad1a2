"""Where the LCNN ResNet-18 train step spends its time: the step against its plain ResNet-18 baseline, and against
itself with one LCNN component at a time swapped for the plain one (a profile by ablation).

    python experiments/bench_resnet.py [--batch_size 32] [--repeats 10] [--width 1.0] [--classes 100]
                                       [--rows plain,lcnn,lcnn_rolled,no_spectral,no_lipbn,no_softplus,no_block,
                                               softplus,plain_fused,softplus_fused]
                                       [--out experiments/results/resnet] [--profile 3]

Every row is the library's train step (``train.make_train_step`` jitted by ``train.jit_train_step``, state
donated) on one synthetic CIFAR-100-shaped batch (32x32x3 images in [0, 1], ``--classes`` labels), SGD with
momentum 0.9 and weight decay 5e-4 (the LCNN recipe), compiled before timing (``lower().compile()``; the compile
time is reported apart). Rows are timed round-robin, one step of each per round, so background load hits every row
alike; the table reports the median step time, its quartiles, and the ratio to ``plain``, all from this one run.

Rows:

* ``plain``: ``resnet18`` (ReLU, batch norm, plain convolutions), no regularizer.
* ``lcnn``: ``lcnn_resnet18`` (centred softplus, Lipschitz batch norm, convolutions normalised by their true
  operator norm with one power-iteration step per training call, the LCNN block, a spectral dense head) with the
  LCNN penalty on beta and gamma: what ``experiments/configs/lcnn_cifar100.py`` trains.
* ``lcnn_rolled``: ``lcnn`` with the power-iteration step inside a rolled ``lax.fori_loop`` (what the library did
  before ``lcnn_jax.loops.auto_unroll`` unrolled it): the transposed convolution inside a ``while`` loop.
* ``no_spectral`` / ``no_lipbn`` / ``no_softplus`` / ``no_block``: ``lcnn`` with plain convolutions and dense head,
  plain batch norm, ReLU, or the plain residual block, one at a time: the step time each LCNN component costs.
* ``softplus``: ``plain`` with softplus (beta 10, the LCNN table's ``softplus10`` network) instead of ReLU.
* ``plain_fused`` / ``softplus_fused``: those rows traced with ``lcnn_jax.loops.MATERIALIZE`` off, so the
  ResNet blocks' inputs are not stored and XLA:CPU fuses them into every consumer, the backward pass's
  transposes included (the library before ``loops.materialize``; the LCNN block never stores them).

``--profile N``: after the timing, each row runs N more steps under ``jax.profiler`` and the table gains where
the time went, by kind of XLA operation (the executed thunks' names without their numbers: ``ynn_fusion`` are the
convolutions and dots, ``transpose_copy_fusion`` the layout transposes of the backward pass, ...), in ms per step;
thunks may overlap on the two cores, so a row's kinds can add up to more than its step time.

The figures are written to ``--out`` (``bench.json``, ``bench.md``). Compare with the PyTorch reference
(``kylematoba/lcnn``) in a throwaway script of your own; PyTorch is not a dependency of this project.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lcnn_jax import io as lio
from lcnn_jax import loops
from lcnn_jax import train
from lcnn_jax.configs import default_config
from lcnn_jax.nn import make_model
from lcnn_jax.nn.layers import Activation, BatchNorm, Conv, Dense
from lcnn_jax.nn.lcnn import lcnn_model_kwargs
from lcnn_jax.nn.models import BasicBlock
from lcnn_jax.regularizers import make_regularizer

ROWS = ("plain", "lcnn", "lcnn_rolled", "no_spectral", "no_lipbn", "no_softplus", "no_block", "softplus",
        "plain_fused", "softplus_fused")
_SWAPS = {"no_spectral": {"conv": Conv, "dense": Dense}, "no_lipbn": {"norm": BatchNorm},
          "no_softplus": {"act": Activation}, "no_block": {"block": BasicBlock}}


def build_row(row: str, *, classes: int, width: float):
    """``(model, regularizers, rolled)`` of a row (see the module docstring); a ``_fused`` row is built like its
    base row (:func:`compiled_step` turns materialization off for it)."""
    row = row.removesuffix("_fused")
    if row == "plain":
        return make_model("resnet18", classes, width_mult=width), [], False
    if row == "softplus":
        return make_model("resnet18", classes, width_mult=width, act="softplus", act_kwargs={"beta": 10.0}), [], False
    kwargs = {**lcnn_model_kwargs("resnet18"), **_SWAPS.get(row, {})}
    regs = [make_regularizer("lcnn", beta_coeff=1e-2, gamma_coeff=1e-2)]
    if row == "no_lipbn":
        regs = [make_regularizer("lcnn", beta_coeff=1e-2, gamma_coeff=0.0)]
    return make_model("resnet18", classes, width_mult=width, **kwargs), regs, row == "lcnn_rolled"


def compiled_step(model, regs, batch: dict, *, rolled: bool, materialize: bool = True):
    """``(step, state, placed_batch, compile_s)``: the jitted train step compiled for ``batch``
    (``materialize``: :data:`lcnn_jax.loops.MATERIALIZE` while it is traced)."""
    mesh = train.data_mesh()
    cfg = default_config().optim
    cfg.weight_decay, cfg.momentum, cfg.learning_rate = 5e-4, 0.9, 0.1
    tx, _ = train.make_optimizer(cfg, 10_000, None)
    saved, saved_materialize = loops.MAX_AUTO_UNROLL, loops.MATERIALIZE
    loops.MAX_AUTO_UNROLL = 0 if rolled else saved  # read while tracing: rolled keeps every loop a while loop
    loops.MATERIALIZE = materialize
    try:
        state = train.replicate(train.create_train_state(model, tx, regs, jax.random.PRNGKey(0), batch), mesh)
        placed = train.place_global(batch, NamedSharding(mesh, P("data")))
        t0 = time.perf_counter()
        step = train.jit_train_step(train.make_train_step(model, regs), mesh).lower(state, placed).compile()
        compile_s = time.perf_counter() - t0
    finally:
        loops.MAX_AUTO_UNROLL, loops.MATERIALIZE = saved, saved_materialize
    return step, state, placed, compile_s


def round_robin(steps: dict, *, repeats: int, warmup: int = 2) -> dict:
    """Step times of each row, one step of each row per round (``steps[name] = [step, state, batch]``)."""
    for name, (step, state, batch) in steps.items():
        for _ in range(warmup):
            state, m = step(state, batch)
        jax.block_until_ready((state, m))
        steps[name][1] = state
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, entry in steps.items():
            step, state, batch = entry
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready((state, m))
            times[name].append(time.perf_counter() - t0)
            entry[1] = state
    return times


def _gflop(compiled) -> float | None:
    """Floating-point operations of one call of ``compiled`` by XLA's cost analysis (GFLOP), None if it has none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (a backend without cost analysis: the column is left empty)
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / 1e9 if cost and cost.get("flops") else None


def profile_kinds(step, state, batch, *, steps: int, top: int = 6) -> tuple[dict, object]:
    """``({kind: ms per step}, state)``: ``steps`` steps under ``jax.profiler``, the executed XLA thunks' durations
    summed by kind (the name without its trailing number), the ``top`` largest kinds."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                state, m = step(state, batch)
            jax.block_until_ready((state, m))
        trace = json.load(gzip.open(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kinds = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(("ThunkExecutor", "$", "end:", "Pjit", "Slinky", "Common")):
            kinds[re.sub(r"[.\d]+$", "", name)] += e.get("dur", 0) / 1e3 / steps
    return dict(kinds.most_common(top)), state


def to_markdown(res: dict) -> str:
    meta = res["meta"]
    lines = [f"# LCNN ResNet-18 train step, profiled by ablation ({meta['device']})", "",
             f"`{meta['command']}`", "",
             f"Batch {meta['batch_size']} of 32x32x3, {meta['classes']} classes, width x{meta['width']}, "
             f"{meta['repeats']} round-robin rounds; median and quartiles of the step time; ratio = median / plain's "
             f"median, all from this one run. GFLOP per step: XLA's cost analysis of the compiled step; GFLOP/s: "
             f"that over the median step time.", "",
             "| row | median ms | q25-q75 ms | / plain | compile s | GFLOP per step | GFLOP/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        gflop = r.get("gflop")
        lines.append(f"| {r['row']} | {r['median_ms']:.1f} | {r['q25_ms']:.1f}-{r['q75_ms']:.1f} | "
                     f"{r['ratio_to_plain']:.2f} | {r['compile_s']:.1f} | "
                     + (f"{gflop:.1f} | {gflop / r['median_ms'] * 1e3:.0f} |" if gflop else "- | - |"))
    profiled = [r for r in res["rows"] if r.get("profile_ms")]
    if profiled:
        lines += ["", f"Where the time went ({meta['profile_steps']} profiled steps per row, `jax.profiler`): the "
                  "largest kinds of XLA thunk, ms per step (thunks overlap on several cores).", "",
                  "| row | kinds |", "|---|---|"]
        lines += [f"| {r['row']} | " + ", ".join(f"{k} {v:.0f}" for k, v in r["profile_ms"].items()) + " |"
                  for r in profiled]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--out", default=None, help="folder for bench.json / bench.md (default: print only)")
    p.add_argument("--profile", type=int, default=0, help="profiled steps per row after the timing (0: none)")
    args = p.parse_args(argv)
    if args.profile < 0:
        p.error(f"--profile must be >= 0, got {args.profile}")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or "plain" not in rows:
        p.error(f"--rows must include plain and name rows among {ROWS}; got {rows}")
    k_x, k_y = jax.random.split(jax.random.PRNGKey(1))
    batch = {"image": np.asarray(jax.random.uniform(k_x, (args.batch_size, 32, 32, 3), jnp.float32)),
             "label": np.asarray(jax.random.randint(k_y, (args.batch_size,), 0, args.classes), np.int32)}
    steps, compile_s = {}, {}
    for row in rows:
        model, regs, rolled = build_row(row, classes=args.classes, width=args.width)
        step, state, placed, compile_s[row] = compiled_step(model, regs, batch, rolled=rolled,
                                                            materialize=not row.endswith("_fused"))
        steps[row] = [step, state, placed]
        print(f"compiled {row} in {compile_s[row]:.1f} s", flush=True)
    times = round_robin(steps, repeats=args.repeats)
    ref = float(np.median(times["plain"]))
    out_rows = [{"row": r, "median_ms": 1e3 * float(np.median(t)), "q25_ms": 1e3 * float(np.percentile(t, 25)),
                 "q75_ms": 1e3 * float(np.percentile(t, 75)), "ratio_to_plain": float(np.median(t)) / ref,
                 "compile_s": compile_s[r], "gflop": _gflop(steps[r][0])} for r, t in times.items()]
    for r in out_rows if args.profile else ():
        step, state, placed = steps[r["row"]]
        r["profile_ms"], steps[r["row"]][1] = profile_kinds(step, state, placed, steps=args.profile)
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform})"
    res = {"rows": out_rows, "meta": {"batch_size": args.batch_size, "classes": args.classes, "width": args.width,
                                      "repeats": args.repeats, "profile_steps": args.profile, "device": device,
                                      "command": "python experiments/bench_resnet.py " + " ".join(argv or sys.argv[1:])}}
    text = to_markdown(res)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        lio.write_json_atomic(os.path.join(args.out, "bench.json"), res)
        lio.write_text_atomic(os.path.join(args.out, "bench.md"), text)
    return res


if __name__ == "__main__":
    main()
