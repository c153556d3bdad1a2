"""Training throughput and compile time of the quickstart model on the devices present.

    python experiments/bench_train.py [--steps 100] [--batch_size 64] [--model small_cnn]

Prints the jit compile time of the train step and the steady-state throughput (examples/s, steps/s) measured
over ``--steps`` steps after a warm-up, with the batch sharded over all local devices.
"""
from __future__ import annotations

import argparse
import time

import jax

from lcnn_jax import train as training
from lcnn_jax.configs import default_config
from lcnn_jax.data import batches, dataset_info, load_split
from lcnn_jax.nn import make_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--model", default="small_cnn")
    args = p.parse_args()

    info = dataset_info("mnist5k")
    train = load_split("mnist5k", "train")
    mesh = training.data_mesh()
    model = make_model(args.model, info.num_classes)
    data = list(batches(train, args.batch_size, seed=0, epoch=0))
    cfg = default_config()
    tx, _ = training.make_optimizer(cfg.optim, 1000, None)
    state = training.replicate(training.create_train_state(model, tx, [], jax.random.PRNGKey(0), data[0]), mesh)
    step = training.jit_train_step(training.make_train_step(model, []), mesh)

    first = training.shard_batch(data[0], mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, first).compile()
    compile_s = time.perf_counter() - t0

    for b in data[:5]:  # warm-up
        state, m = compiled(state, training.shard_batch(b, mesh))
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, m = compiled(state, training.shard_batch(data[i % len(data)], mesh))
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0

    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
    print(f"model: {args.model}   global batch: {args.batch_size}   steps timed: {args.steps}")
    print(f"jit compile time of the train step: {compile_s:.2f} s")
    print(f"throughput: {args.steps * args.batch_size / dt:,.0f} examples/s  ({args.steps / dt:.1f} steps/s, "
          f"{1000 * dt / args.steps:.2f} ms/step)")


if __name__ == "__main__":
    main()
