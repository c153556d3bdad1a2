"""Cost of each measure relative to one plain gradient of the batch loss (quickstart CNN, batch 128).

    python experiments/bench_measures.py [--batch_size 128] [--repeats 5] [--model small_cnn]

Every function is jitted and compiled first; the table reports the median wall time of ``--repeats`` runs
divided by the median time of ``jax.grad`` of the mean cross-entropy of the same batch (w.r.t. the parameters),
all measured in this one run. Targets (issue 3): one input HVP <= 4x, one-probe Jacobian estimate <= 3x,
10-iteration curvature <= 40x.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcnn_jax import attacks
from lcnn_jax.autodiff import batched_input_hvp
from lcnn_jax.data import load_split
from lcnn_jax.measures import (gradient_stability, hessian_trace, input_curvature, jacobian_frobenius,
                               local_lipschitz)
from lcnn_jax.nn import make_model
from lcnn_jax.report import model_functions


def median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default="small_cnn")
    args = p.parse_args()

    split = load_split("mnist5k", "test")
    xs, ys = jnp.asarray(split.images[:args.batch_size]), jnp.asarray(split.labels[:args.batch_size])
    model = make_model(args.model, 10)
    variables = model.init(jax.random.PRNGKey(0), xs[:1], train=False)
    key = jax.random.PRNGKey(1)

    def batch_loss(params, xs, ys):
        logits = model.apply({**variables, "params": params}, xs, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

    f_of = lambda v: model_functions(model, v)  # noqa: E731
    vs = jax.random.normal(key, xs.shape)
    items = {
        "plain gradient (reference)": jax.jit(lambda v, x, y: jax.grad(batch_loss)(v["params"], x, y)),
        "input HVP (one per example)": jax.jit(lambda v, x, y: batched_input_hvp(f_of(v)[1], x, y, vs)),
        "Jacobian Frobenius, 1-probe estimate": jax.jit(
            lambda v, x, y: jacobian_frobenius(f_of(v)[0], x, key=key, num_probes=1)),
        "Jacobian Frobenius, exact": jax.jit(lambda v, x, y: jacobian_frobenius(f_of(v)[0], x)),
        "curvature, 10 iterations": jax.jit(lambda v, x, y: input_curvature(f_of(v)[1], x, y, key=key, num_iters=10)),
        "gradient stability": jax.jit(lambda v, x, y: gradient_stability(f_of(v)[1], x, y, key=key, noise_std=0.01)),
        "local Lipschitz, 20 iterations": jax.jit(lambda v, x, y: local_lipschitz(f_of(v)[0], x, key=key,
                                                                                  num_iters=20)),
        "PGD-Linf, 20 steps": jax.jit(lambda v, x, y: attacks.pgd(f_of(v)[2], x, y, norm="linf", eps=0.1,
                                                                  step_size=0.0125, num_steps=20, key=key)),
        "parameter Hessian trace, 1 probe": jax.jit(
            lambda v, x, y: hessian_trace(functools.partial(lambda p: batch_loss(p, x, y)), v["params"], key=key,
                                          num_probes=1)),
    }
    times = {name: median_time(fn, variables, xs, ys, repeats=args.repeats) for name, fn in items.items()}
    ref = times["plain gradient (reference)"]
    print(f"devices: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); model {args.model}; "
          f"batch {args.batch_size}; median of {args.repeats}")
    print(f"{'measure':<40}{'ms':>10}{'x gradient':>12}")
    for name, t in times.items():
        print(f"{name:<40}{1000 * t:>10.2f}{t / ref:>12.2f}")


if __name__ == "__main__":
    main()
