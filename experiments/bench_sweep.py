"""Throughput of a sweep (K members in one jitted step, vmapped and unrolled: ``loops.MEMBER_LOOPS``) against the
same K runs one after another, measured in one process on the devices present.

    python experiments/bench_sweep.py [--seeds 3] [--coeffs 0,0.01] [--regularizer datagrad] [--steps 30]
                                      [--model mlp] [--batch_size 64]

Both sides train the same K = seeds x coeffs members on mnist5k for ``--steps`` steps each, with per-seed batch
order (what :func:`lcnn_jax.train.fit_sweep` does by default): the sequential side uses the single-run step of
:func:`lcnn_jax.train.fit` (compiled once and reused for the K runs, which flatters it: K separate ``fit``
calls would compile K times); the one-program side uses :func:`lcnn_jax.train.jit_sweep_step` with each member
loop. Host batching and transfer are inside the timed loops on every side. Prints compile times, steady-state
member-steps/s and their ratio to the sequential side, the end-to-end ratio including compilation, and which loop
``member_loop="auto"`` picks here.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from lcnn_jax import data as data_lib
from lcnn_jax import train as training
from lcnn_jax.train import sweep
from lcnn_jax import loops
from lcnn_jax.configs import default_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--coeffs", default="0,0.01")
    p.add_argument("--regularizer", default="datagrad")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model", default="mlp")
    p.add_argument("--batch_size", type=int, default=64)
    args = p.parse_args()

    config = default_config()
    config.model.name = args.model
    config.train.batch_size = args.batch_size
    config.train.num_steps = args.steps + args.warmup
    config.regularizers = {args.regularizer: {"coeff": 0.0}}
    coeffs = tuple(float(c) for c in args.coeffs.split(","))
    members = training.sweep_members(range(args.seeds), {f"{args.regularizer}.coeff": coeffs})
    k = len(members)
    setup = training.prepare_run(config)
    mesh, n = setup.mesh, args.steps + args.warmup

    per_seed = {m.seed: list(data_lib.batches(setup.train, setup.batch_size, seed=m.seed, epoch=0))
                for m in members}
    nb = len(per_seed[members[0].seed])

    def batch(seed, t):
        return per_seed[seed][t % nb]

    # ---- sequential: K runs one after another, one compiled single-run step reused
    single = training.jit_train_step(setup.step_fn, mesh)
    st = training.replicate(training.init_member_state(setup, members[0]), mesh)
    t0 = time.perf_counter()
    single = single.lower(st, training.shard_batch(batch(0, 0), mesh)).compile()
    compile_single = time.perf_counter() - t0
    seq_time = 0.0
    for m in members:
        st = training.replicate(training.init_member_state(setup, m), mesh)
        for t in range(args.warmup):
            st, met = single(st, training.shard_batch(batch(m.seed, t), mesh))
        jax.block_until_ready(met)
        t0 = time.perf_counter()
        for t in range(args.warmup, n):
            st, met = single(st, training.shard_batch(batch(m.seed, t), mesh))
        jax.block_until_ready(met)
        seq_time += time.perf_counter() - t0

    # ---- one program: all K members in one jitted step, vmapped or unrolled (loops.MEMBER_LOOPS)
    layout = training.sweep_layout(mesh, k)
    stacked = training.init_stacked_state(setup, members)

    def stacked_batch(t):
        rows = [batch(m.seed, t) for m in members]
        return training.place_batch({key: np.stack([r[key] for r in rows]) for key in rows[0]}, layout)

    def time_loop(loop):
        st = training.place_state(training.init_stacked_state(setup, members), layout)
        step = training.jit_sweep_step(setup.step_fn, layout, loop=loop)
        t0 = time.perf_counter()
        step = step.lower(st, stacked_batch(0)).compile()
        compile_s = time.perf_counter() - t0
        for t in range(args.warmup):
            st, met = step(st, stacked_batch(t))
        jax.block_until_ready(met)
        t0 = time.perf_counter()
        for t in range(args.warmup, n):
            st, met = step(st, stacked_batch(t))
        jax.block_until_ready(met)
        return compile_s, time.perf_counter() - t0

    auto = training.resolve_member_loop("auto", layout, lambda: sweep.step_convolves(setup, stacked))
    timed = {loop: time_loop(loop) for loop in loops.MEMBER_LOOPS[1:]}

    member_steps = k * args.steps
    seq_rate = member_steps / seq_time
    e2e_seq = k * compile_single + seq_time  # K separate fit() calls compile K times
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); "
          f"sweep layout: {layout.axis} axis sharded; member_loop='auto' picks {auto!r}")
    print(f"model: {args.model}   regularizer: {args.regularizer} coeffs {coeffs} x {args.seeds} seeds = K={k} "
          f"members   batch {args.batch_size}   {args.steps} timed steps per member (+{args.warmup} warm-up)")
    print(f"sequential (K runs, one compiled single-run step): compile {compile_single:.2f} s, run {seq_time:.2f} s, "
          f"{seq_rate:,.1f} member-steps/s ({seq_rate * args.batch_size:,.0f} examples/s)")
    for loop, (compile_s, run_s) in timed.items():
        rate = member_steps / run_s
        print(f"one program, member_loop={loop!r}: compile {compile_s:.2f} s, run {run_s:.2f} s, "
              f"{rate:,.1f} member-steps/s ({rate * args.batch_size:,.0f} examples/s); throughput / sequential "
              f"{rate / seq_rate:.2f}x; end-to-end incl. compilation (K compiles vs 1) "
              f"{e2e_seq / (compile_s + run_s):.2f}x")


if __name__ == "__main__":
    main()
