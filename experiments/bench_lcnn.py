"""Train-step cost of the LCNN small CNN relative to the standard small CNN (the lcnn_mnist5k configs, batch 64).

    python experiments/bench_lcnn.py [--repeats 20] [--variants standard,lcnn,gradreg,lcnn_gradreg,softplus10]
                                     [--config experiments/configs/lcnn_mnist5k.py] [--out experiments/results/lcnn]

Each row is built from its config exactly as training builds it: ``load_config("<config>:<variant>")`` and
:func:`lcnn_jax.train.prepare_run` (data, model, regularizers, optimizer and the un-jitted step), then
:func:`lcnn_jax.train.create_train_state` and :func:`lcnn_jax.train.jit_train_step`, as in
:func:`lcnn_jax.train.fit`. All rows use the same first training batch (the batch size of the config, 64).
Each step is compiled and run twice before timing; the rows are then timed round-robin (one step of each per
round, ``--repeats`` rounds) and the table reports median step times (and their quartiles) and the ratio of
medians to ``standard`` (softplus beta 1000, batch norm, average pooling), all measured in this one run. Target
(issue: LCNN): the ``lcnn`` row (centred softplus with trainable beta, spectrally normalised conv/dense layers with
power iteration, Lipschitz batch norm, the beta/gamma penalty) <= 1.5x ``standard``.

The table is printed and written to ``--out``: ``bench.json`` (``{"ratios": {variant: ratio}, "rows": [...],
"meta": {...}}``, read by ``experiments/lcnn_table.py --bench``) and ``bench.md``, both through a temporary file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from lcnn_jax import train as training
from lcnn_jax import io as lio
from lcnn_jax.configs import load_config

TARGETS = {"lcnn": 1.5}


def round_robin_times(steps: dict, states: dict, batches: dict, *, repeats: int, warmup: int = 2) -> dict:
    """Median wall time of one call of each ``steps[name](state, batch) -> (state, metrics)``.

    The state is threaded through (the jitted steps donate it). ``warmup`` calls per row (the first one
    compiles) precede ``repeats`` timed rounds of one call per row each, so background load hits every row alike.
    """
    for name, step in steps.items():
        for _ in range(warmup):
            states[name], m = step(states[name], batches[name])
            jax.block_until_ready((states[name], m))
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            states[name], m = step(states[name], batches[name])
            jax.block_until_ready((states[name], m))
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: dict, ref_name: str) -> list[dict]:
    """One record per variant: median and quartiles (s) of its step times and ``ratio`` = its median / the
    median of ``ref_name``; ``target``/``met`` for the variants in :data:`TARGETS`."""
    ref = float(np.median(times[ref_name]))
    rows = []
    for name, t in times.items():
        med = float(np.median(t))
        target = TARGETS.get(name)
        rows.append({"variant": name, "median_s": med, "q25_s": float(np.percentile(t, 25)),
                     "q75_s": float(np.percentile(t, 75)), "ratio": med / ref, "target": target,
                     "met": None if target is None else bool(med / ref <= target)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/configs/lcnn_mnist5k.py")
    p.add_argument("--variants", default="standard,lcnn,gradreg,lcnn_gradreg,softplus10",
                   help="comma-separated config variants; the first is the reference")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=os.path.join("experiments", "results", "lcnn"),
                   help="folder for bench.json / bench.md ('' to skip writing)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if not variants:
        p.error("--variants is empty")

    steps, states, batches, info = {}, {}, {}, {}
    for v in variants:
        setup = training.prepare_run(load_config(f"{args.config}:{v}"))
        state = training.create_train_state(setup.model, setup.tx, setup.regularizers,
                                            jax.random.PRNGKey(args.seed), setup.sample)
        states[v] = training.replicate(state, setup.mesh)
        steps[v] = training.jit_train_step(setup.step_fn, setup.mesh)
        batches[v] = training.shard_batch(setup.sample, setup.mesh)
        n_params = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
        info[v] = (setup.batch_size, n_params, ",".join(r.name for r in setup.regularizers) or "-")

    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    times = round_robin_times(steps, states, batches, repeats=args.repeats)
    wall = time.perf_counter() - t0
    # other processes on a shared machine inflate every row alike (round robin) but widen the spread: say so
    load = f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs"
    ref_name = variants[0]
    rows = summarize(times, ref_name)

    dev = jax.devices()[0]
    device = f"{jax.device_count()} x {dev.device_kind} ({dev.platform})"
    head = (f"devices: {device}; config {args.config}; median of {args.repeats} round-robin steps "
            f"(after 2 warm-up steps each); benchmark wall time {wall:.0f} s; {load}")
    lines = [head, f"{'variant':<14}{'batch':>6}{'params':>11}  {'regularizers':<22}{'ms/step':>9}{'IQR ms':>15}"
                   f"{'x ' + ref_name:>12}{'target':>9}{'met':>5}"]
    md = [f"Train-step time per variant of `{args.config}` (batch {info[ref_name][0]}, one seed), median of "
          f"{args.repeats} round-robin steps in one process; {device}; {load}; "
          f"command `python experiments/bench_lcnn.py {' '.join(sys.argv[1:])}`.".replace("  ", " "), "",
          f"| variant | params | regularizers | ms/step (median) | IQR ms | × {ref_name} | target | met |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bs, n_params, regs = info[r["variant"]]
        tgt = f"<= {r['target']:g}" if r["target"] else ""
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        iqr = f"{1000 * r['q25_s']:.1f}-{1000 * r['q75_s']:.1f}"
        lines.append(f"{r['variant']:<14}{bs:>6}{n_params:>11,}  {regs:<22}{1000 * r['median_s']:>9.1f}{iqr:>15}"
                     f"{r['ratio']:>12.2f}{tgt:>9}{met:>5}")
        md.append(f"| {r['variant']} | {n_params:,} | {regs} | {1000 * r['median_s']:.1f} | {iqr} | "
                  f"{r['ratio']:.2f} | {tgt} | {met} |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"config": args.config, "repeats": args.repeats, "device": device, "wall_s": wall, "load": load,
                "reference": ref_name, "command": "python experiments/bench_lcnn.py " + " ".join(sys.argv[1:]),
                "batch_size": info[ref_name][0]}
        lio.write_text_atomic(os.path.join(args.out, "bench.json"), json.dumps(
            {"meta": meta, "ratios": {r["variant"]: r["ratio"] for r in rows},
             "rows": [{**r, "params": info[r["variant"]][1], "regularizers": info[r["variant"]][2]} for r in rows]},
            indent=2))
        lio.write_text_atomic(os.path.join(args.out, "bench.md"), "\n".join(md) + "\n")
        print(f"wrote {args.out}/bench.json and bench.md")


if __name__ == "__main__":
    main()
