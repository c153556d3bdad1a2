"""Throughput of the library's train steps and measures on one accelerator (written for one GPU; runs anywhere).

    python experiments/bench_gpu.py                      # the full benchmark, < 8 minutes on one GPU
    python experiments/bench_gpu.py --smoke              # tiny sizes, a minute on a CPU: checks that it works
    python experiments/bench_gpu.py --out experiments/results/gpu --budget_s 450

What it prints (and writes to ``<out>/bench_gpu.{json,md}``), each with its compile time apart from its run time:

1. **Train steps** of ResNet-18 (CIFAR stem, 11.2M parameters, batch norm) on synthetic 32x32x3 images in [0, 1]
   with 10 classes, at ``--batch_size`` 256: images per second of the plain step, SpectReg (``coeff`` 1e-3, one
   extra backward), DataGrad (1e-2, double backprop), CLIP (``--clip_pairs`` 500 pairs, the reference's pool:
   every step ascends all of them) and LCNN (the LCNN ResNet-18, ``lcnn_resnet18``: centred softplus, spectrally
   normalised convolutions by their true operator norm with one power iteration per step, Lipschitz batch norm,
   plus the beta / gamma penalty). Each is the library's own step (:func:`lcnn_jax.train.make_train_step`,
   jitted with a donated state by :func:`lcnn_jax.train.jit_train_step`), compiled with ``lower().compile()``
   (the compile time), run ``--warmup`` times, then ``--steps`` steps are timed as one block.
2. **Input curvature** (the LCNN protocol, :func:`lcnn_jax.measures.curvature.input_curvature`: 10 power
   iterations on each image's input Hessian of the cross-entropy, eval mode) of both networks at initialisation on
   ``--curvature_images`` images in batches of ``--batch_size``: images per second and ms per image.
3. **Exact per-layer Hessian traces** (:func:`lcnn_jax.measures.sharpness.layer_hessian_traces`, one forward and
   K = 10 backward passes per example) of the minimum-sharpness MLP 784-512-128-512-10 at initialisation on
   ``--ms_images`` (10,000) synthetic 28x28 images: the first call compiles and runs, the second only runs; the
   compile time is their difference.

Networks are at initialisation and the data synthetic, so the figures are costs, not accuracies. The header states
the device, JAX version, ``XLA_FLAGS`` and the JAX precision settings in force. ``--budget_s`` (default 450 s)
skips the rows that would start after it (marked ``skipped``), so the whole script ends within 8 minutes even
where compilation is slower than expected. ``--smoke``: ResNet-18 at width 1/16 on batch 8 (2 steps), 16 curvature
images, 256 MS-MLP images, 8 CLIP pairs; a test runs it on the CPU.

Not yet run on a GPU: no GPU was available to the project when this was written (see the README).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcnn_jax import train as training
from lcnn_jax import io as lio
from lcnn_jax.configs import default_config
from lcnn_jax.measures.curvature import input_curvature
from lcnn_jax.measures.sharpness import layer_hessian_traces
from lcnn_jax.nn import make_model, mode_kwargs
from lcnn_jax.regularizers import make_regularizer

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_CLASSES = 10
# row -> (model name, regularizers as (registry name, kwargs)); CLIP's pair count is filled in from the flags
STEP_ROWS = {
    "plain": ("resnet18", ()),
    "spectreg": ("resnet18", (("spectreg", {"coeff": 1e-3}),)),
    "datagrad": ("resnet18", (("datagrad", {"coeff": 1e-2}),)),
    "clip": ("resnet18", (("clip", {"coeff": 0.1, "squared": True, "skip_above": 5000.0}),)),
    "lcnn": ("lcnn_resnet18", (("lcnn", {"beta_coeff": 1e-2, "gamma_coeff": 1e-2}),)),
}
CURVATURE_ROWS = {"curvature resnet18": "resnet18", "curvature lcnn_resnet18": "lcnn_resnet18"}


def environment() -> dict:
    """What the figures depend on besides the code: device, versions, XLA flags, precision settings."""
    dev = jax.devices()[0]
    return {"device": f"{jax.device_count()} x {dev.device_kind} ({dev.platform})", "jax": jax.__version__,
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", ""),
            "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
            "jax_enable_x64": bool(jax.config.jax_enable_x64),
            "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "")}


def synthetic(key, n: int, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images uniform in [0, 1] and labels uniform over the classes (host arrays)."""
    k_x, k_y = jax.random.split(key)
    return (np.asarray(jax.random.uniform(k_x, (n,) + shape, jnp.float32)),
            np.asarray(jax.random.randint(k_y, (n,), 0, NUM_CLASSES), np.int32))


def time_train_step(model_name: str, regs: tuple, *, batch_size: int, steps: int, warmup: int,
                    model_kwargs: dict) -> dict:
    """Compile time and steady-state images/s of the library's train step."""
    model = make_model(model_name, NUM_CLASSES, **model_kwargs)
    regularizers = [make_regularizer(name, **kw) for name, kw in regs]
    images, labels = synthetic(jax.random.PRNGKey(1), batch_size, (32, 32, 3))
    batch = {"image": images, "label": labels}
    mesh = training.data_mesh()
    tx, _ = training.make_optimizer(default_config().optim, 10_000, None)
    state = training.replicate(training.create_train_state(model, tx, regularizers, jax.random.PRNGKey(0), batch),
                               mesh)
    placed = training.place_global(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    t0 = time.perf_counter()
    step = training.jit_train_step(training.make_train_step(model, regularizers), mesh).lower(state, placed).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = step(state, placed)
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, placed)
    jax.block_until_ready((state, metrics))
    run_s = time.perf_counter() - t0
    loss = float(metrics["loss"])
    return {"compile_s": compile_s, "run_s": run_s, "steps": steps, "batch_size": batch_size,
            "images_per_s": steps * batch_size / run_s, "ms_per_step": 1e3 * run_s / steps,
            "loss_finite": math.isfinite(loss)}


def time_curvature(model_name: str, *, num_images: int, batch_size: int, model_kwargs: dict) -> dict:
    """Compile time and images/s of the LCNN curvature protocol (10 power iterations) in eval mode."""
    model = make_model(model_name, NUM_CLASSES, **model_kwargs)
    eval_kw = mode_kwargs(model, train=False)
    images, labels = synthetic(jax.random.PRNGKey(2), num_images, (32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(images[:1]), **eval_kw)

    @jax.jit
    def measure(variables, xs, ys, key):
        def loss_fn(x, y):
            logits = model.apply(variables, x[None], **eval_kw)[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y)

        return input_curvature(loss_fn, xs, ys, key=key, num_iters=10)

    bs = min(batch_size, num_images)
    n = (num_images // bs) * bs
    key = jax.random.PRNGKey(3)
    t0 = time.perf_counter()
    compiled = measure.lower(variables, images[:bs], labels[:bs], key).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(variables, images[:bs], labels[:bs], key))  # warm-up
    t0 = time.perf_counter()
    outs = [compiled(variables, images[s:s + bs], labels[s:s + bs], jax.random.fold_in(key, s))
            for s in range(0, n, bs)]
    jax.block_until_ready(outs)
    run_s = time.perf_counter() - t0
    curv = np.concatenate([np.asarray(o["curvature"]) for o in outs])
    return {"compile_s": compile_s, "run_s": run_s, "images": n, "batch_size": bs, "images_per_s": n / run_s,
            "ms_per_image": 1e3 * run_s / n, "curvature_mean": float(curv.mean()),
            "all_finite": bool(np.all(np.isfinite(curv)))}


def ms_mlp_setup(num_images: int):
    """The minimum-sharpness MLP at initialisation and ``num_images`` synthetic 28x28 inputs."""
    model = make_model("ms_mlp", NUM_CLASSES)
    xs, _ = synthetic(jax.random.PRNGKey(4), num_images, (28, 28, 1))
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(xs[:1]))["params"]

    def logits_fn(p, x):
        return model.apply({"params": p}, x[None])[0]

    return logits_fn, params, xs


def time_ms_traces(num_images: int, chunk_size: int) -> dict:
    """Exact per-layer Hessian traces of the MS MLP on ``num_images`` images: first call (compile + run), second
    call (run); compile time = their difference."""
    logits_fn, params, xs = ms_mlp_setup(num_images)
    t0 = time.perf_counter()
    first = jax.block_until_ready(layer_hessian_traces(logits_fn, params, xs, chunk_size=chunk_size))
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    traces = jax.block_until_ready(layer_hessian_traces(logits_fn, params, xs, chunk_size=chunk_size))
    run_s = time.perf_counter() - t0
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): float(v)
            for path, v in jax.tree_util.tree_flatten_with_path(traces)[0]}
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(first),
                                                                           jax.tree.leaves(traces)))
    return {"compile_s": max(first_s - run_s, 0.0), "first_call_s": first_s, "run_s": run_s, "images": num_images,
            "chunk_size": chunk_size, "images_per_s": num_images / run_s, "traces": flat,
            "repeatable": bool(same)}


def run(args) -> dict:
    t_start = time.perf_counter()
    smoke = args.smoke
    model_kwargs = {"width_mult": 1 / 16} if smoke else {}
    env = environment()
    res = {"environment": env, "smoke": smoke, "rows": {}, "skipped": [],
           "settings": {"batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                        "clip_pairs": args.clip_pairs, "curvature_images": args.curvature_images,
                        "ms_images": args.ms_images, "model_kwargs": model_kwargs, "budget_s": args.budget_s}}
    print(f"device {env['device']}, JAX {env['jax']}, XLA_FLAGS={env['XLA_FLAGS']!r}, matmul precision "
          f"{env['jax_default_matmul_precision']}" + (" [smoke sizes]" if smoke else ""), flush=True)

    def over_budget(name: str) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            res["skipped"].append(name)
            print(f"  {name}: skipped (past --budget_s {args.budget_s:g} s)", flush=True)
            return True
        return False

    for name, (model_name, regs) in STEP_ROWS.items():
        if over_budget(name):
            continue
        regs = tuple((r, {**kw, "num_pairs": args.clip_pairs}) if r == "clip" else (r, kw) for r, kw in regs)
        row = time_train_step(model_name, regs, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                              model_kwargs=model_kwargs)
        res["rows"][name] = {"kind": "train step", "model": model_name, **row}
        print(f"  train step {name:9s} ({model_name}): {row['images_per_s']:9.1f} images/s "
              f"({row['ms_per_step']:.1f} ms/step), compile {row['compile_s']:.1f} s", flush=True)
    plain = res["rows"].get("plain", {}).get("images_per_s")
    for name, row in res["rows"].items():
        if plain:
            row["x_plain_step_time"] = plain / row["images_per_s"]

    for name, model_name in CURVATURE_ROWS.items():
        if over_budget(name):
            continue
        row = time_curvature(model_name, num_images=args.curvature_images, batch_size=args.batch_size,
                             model_kwargs=model_kwargs)
        res["rows"][name] = {"kind": "measure", "model": model_name, **row}
        print(f"  {name:24s}: {row['images_per_s']:9.1f} images/s ({row['ms_per_image']:.2f} ms/image), "
              f"compile {row['compile_s']:.1f} s", flush=True)

    if not over_budget("ms_mlp traces"):
        row = time_ms_traces(args.ms_images, args.ms_chunk)
        res["rows"]["ms_mlp traces"] = {"kind": "measure", "model": "ms_mlp", **row}
        print(f"  exact per-layer Hessian traces, MS MLP, {row['images']} images: {row['run_s']:.2f} s "
              f"({row['images_per_s']:.0f} images/s), compile {row['compile_s']:.1f} s", flush=True)
    res["wall_s"] = time.perf_counter() - t_start
    print(f"total {res['wall_s']:.0f} s", flush=True)
    return res


def to_markdown(res: dict) -> str:
    env, s = res["environment"], res["settings"]
    lines = [f"# Accelerator benchmark{' (smoke sizes)' if res['smoke'] else ''}", "",
             f"{env['device']}; JAX {env['jax']}; XLA_FLAGS=`{env['XLA_FLAGS'] or '(none)'}`; "
             f"jax_default_matmul_precision={env['jax_default_matmul_precision']}; float32 throughout. "
             f"Synthetic data, networks at initialisation; batch {s['batch_size']}, {s['steps']} timed steps after "
             f"{s['warmup']} warm-up steps; CLIP with {s['clip_pairs']} pairs.", "",
             "| row | model | images/s | ms per step / image | x plain step time | compile s |",
             "|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        if r["kind"] == "train step":
            per, ratio = f"{r['ms_per_step']:.1f} / step", f"{r.get('x_plain_step_time', float('nan')):.2f}"
        elif "ms_per_image" in r:
            per, ratio = f"{r['ms_per_image']:.3f} / image", ""
        else:
            per, ratio = f"{1e3 * r['run_s'] / r['images']:.3f} / image ({r['run_s']:.2f} s for {r['images']})", ""
        lines.append(f"| {name} | {r['model']} | {r['images_per_s']:.1f} | {per} | {ratio} | {r['compile_s']:.1f} |")
    if res["skipped"]:
        lines += ["", f"Skipped (past the {s['budget_s']:g} s budget): {', '.join(res['skipped'])}."]
    lines += ["", f"Total wall time {res['wall_s']:.0f} s. Command: `python experiments/bench_gpu.py"
              + (" --smoke" if res["smoke"] else "") + "`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check)")
    p.add_argument("--batch_size", type=int, default=None, help="default 256 (smoke: 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20; smoke: 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--clip_pairs", type=int, default=None, help="default 500 (smoke: 8)")
    p.add_argument("--curvature_images", type=int, default=None, help="default 1024 (smoke: 16)")
    p.add_argument("--ms_images", type=int, default=None, help="default 10000 (smoke: 256)")
    p.add_argument("--ms_chunk", type=int, default=256)
    p.add_argument("--budget_s", type=float, default=450.0, help="rows starting later are skipped (default 450)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "gpu"))
    args = p.parse_args(argv)
    defaults = dict(batch_size=(8, 256), steps=(2, 20), clip_pairs=(8, 500), curvature_images=(16, 1024),
                    ms_images=(256, 10_000))
    for k, (small, full) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, small if args.smoke else full)
    for k in ("batch_size", "steps", "clip_pairs", "curvature_images", "ms_images", "ms_chunk"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be a positive integer, got {getattr(args, k)}")
    if args.warmup < 0 or not args.budget_s > 0:
        p.error("--warmup must be >= 0 and --budget_s > 0")
    res = run(args)
    os.makedirs(args.out, exist_ok=True)
    name = "bench_gpu_smoke" if args.smoke else "bench_gpu"
    lio.write_json_atomic(os.path.join(args.out, f"{name}.json"), res)
    lio.write_text_atomic(os.path.join(args.out, f"{name}.md"), to_markdown(res))
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    main()
