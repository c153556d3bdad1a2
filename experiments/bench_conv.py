"""First-layer convolutions on the CPU: ``lcnn_jax.nn.conv``'s sums of shifted images against ``lax``'s convolution,
in one run, on the programs researchers wait for (issue 29, item 3).

    python experiments/bench_conv.py                      # all rows, 10 interleaved rounds
    python experiments/bench_conv.py --rows small_cnn --repeats 20 --out experiments/results/conv

For each model both versions of every program are compiled (``conv.FEW_CHANNEL_CONV`` is read while tracing), then
timed in interleaved rounds (one call of each per round); the table gives the medians and the ratio lax / ours
(> 1: the shifted sums are faster). Programs: the loss (forward), its input gradient (what an attack step costs),
PGD-L-inf with 20 steps (eps 0.1, step 0.0125, unrolled: ``attacks.pgd``), APGD-CE with 100 steps (L2, eps 1,
``attacks.apgd_stepwise``: compiled 5-step segments driven from the host), and the parameter gradient (a training
step's backward pass, in eval mode). Images: mnist5k test images (28x28x1) for the MNIST nets, uniform noise of
32x32x3 for the ResNet.
"""
import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcnn_jax import attacks
from lcnn_jax import io as lio
from lcnn_jax.data import load_split
from lcnn_jax.nn import conv, make_lcnn_model, make_model

ROWS = {  # name: (model factory, batch, image shape)
    "small_cnn": (lambda: make_model("small_cnn", 10, width_mult=0.5), 256, (28, 28, 1)),
    "lcnn_small_cnn": (lambda: make_lcnn_model("small_cnn", 10, width_mult=0.5), 256, (28, 28, 1)),
    "lenet": (lambda: make_model("lenet", 10), 256, (28, 28, 1)),
    "resnet18": (lambda: make_model("resnet18", 10, width_mult=0.125), 32, (32, 32, 3)),
}


def _programs(model, variables, xs, ys):
    def apply(v, u):  # a new function per flag: apgd_stepwise caches its programs by it
        return model.apply(v, u, train=False)

    def loss(z, v):
        return optax.softmax_cross_entropy_with_integer_labels(apply(v, z), ys).sum()

    pgd = jax.jit(lambda v, z, k: attacks.pgd(lambda u: apply(v, u), z, ys, norm="linf", eps=0.1, step_size=0.0125,
                                              num_steps=20, key=k))
    key = jax.random.PRNGKey(2)
    apgd = functools.partial(attacks.apgd_stepwise, apply, xs, ys, norm="l2", eps=1.0, num_steps=100, loss="ce",
                             key=key)
    progs = {"forward": (jax.jit(loss), (xs, variables)),
             "input gradient": (jax.jit(jax.grad(loss)), (xs, variables)),
             "PGD-20": (pgd, (variables, xs, key)),
             "APGD-CE-100": (lambda v: apgd(params=v), (variables,)),
             "parameter gradient": (jax.jit(jax.grad(loss, argnums=1)), (xs, variables))}
    for fn, args in progs.values():
        jax.block_until_ready(fn(*args))  # compile now, while the flag has this run's value
    return progs


def bench_row(name: str, repeats: int) -> list:
    factory, batch, shape = ROWS[name]
    model = factory()
    if shape == (28, 28, 1):
        split = load_split("mnist5k", "test")
        xs, ys = jnp.asarray(split.images[:batch]), jnp.asarray(split.labels[:batch])
    else:
        xs = jax.random.uniform(jax.random.PRNGKey(0), (batch,) + shape)
        ys = jnp.arange(batch) % 10
    variables = model.init(jax.random.PRNGKey(1), xs[:2], train=False)
    built = {}
    for flag in (False, True):
        conv.FEW_CHANNEL_CONV = flag
        built[flag] = _programs(model, variables, xs, ys)
    conv.FEW_CHANNEL_CONV = True
    times = {(flag, p): [] for flag in built for p in built[flag]}
    for _ in range(repeats):
        for flag, progs in built.items():
            for p, (fn, args) in progs.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[(flag, p)].append(time.perf_counter() - t0)
    out = []
    for p in built[True]:
        lax_ms, ours_ms = (1e3 * float(np.median(times[(f, p)])) for f in (False, True))
        out.append({"model": name, "program": p, "batch": batch, "lax_ms": lax_ms, "shifted_ms": ours_ms,
                    "ratio": lax_ms / ours_ms})
        print(f"{name:15s} {p:19s} lax {lax_ms:8.1f} ms   shifted sums {ours_ms:8.1f} ms   lax / ours "
              f"{lax_ms / ours_ms:.2f}", flush=True)
    return out


def to_markdown(res: dict) -> str:
    meta = res["meta"]
    lines = [f"# First-layer convolutions: shifted sums against lax ({meta['device']})", "",
             f"`{meta['command']}`", "",
             f"{meta['repeats']} interleaved rounds, medians; ratio = lax / shifted sums (> 1: the shifted sums are "
             f"faster), both measured in this one run.", "",
             "| model | batch | program | lax ms | shifted sums ms | lax / ours |", "|---|---:|---|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['program']} | {r['lax_ms']:.1f} | {r['shifted_ms']:.1f} | "
                     f"{r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None, help="folder for bench.md and bench.json")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or args.repeats < 1:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}" if unknown else "--repeats must be >= 1")
    res = {"meta": {"command": "python experiments/bench_conv.py " + " ".join(argv if argv is not None
                                                                              else sys.argv[1:]),
                    "device": f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores", "repeats": args.repeats},
           "rows": [r for name in rows for r in bench_row(name, args.repeats)]}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        lio.write_json_atomic(os.path.join(args.out, "bench.json"), res)
        lio.write_text_atomic(os.path.join(args.out, "bench.md"), to_markdown(res))


if __name__ == "__main__":
    main()
