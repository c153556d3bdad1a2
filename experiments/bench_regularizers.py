"""Train-step cost of each gradient regularizer relative to the plain step, the vectorized ablation's throughput,
and the float32 accuracy of the derivative penalty's secant.

    python experiments/bench_regularizers.py [--batch_size 64] [--repeats 5] [--model small_cnn]
                                             [--only datagrad,spectreg,...] [--sweep] [--out experiments/results/regularizers]
    python experiments/bench_regularizers.py --derivative_accuracy

Step cost. Every row is the real training step: :func:`lcnn_jax.train.make_train_step` with one regularizer from
:func:`lcnn_jax.regularizers.make_regularizer`, jitted by :func:`lcnn_jax.train.jit_train_step` (replicated,
donated state; batch sharded over the local devices), on the same model, initial parameters and mnist5k batch.
Each step is compiled and run twice before timing; then the variants are timed round-robin (one step of each per
round, ``--repeats`` rounds), so load from other processes hits all of them alike, and the table reports the
median step time of each divided by the median plain step, all measured in this one run. Coefficients do not
change the cost. Targets (issue 5): SpectReg, DataGrad and the derivative penalty <= 3x, JacReg <= (K + 2)x with
K = 10 classes. Written to ``<out>/step_cost.{json,md}``.

``--sweep``: the vectorized ablation (seeds x coefficients in one ``jit(vmap(step))``) against the same runs one
after another, by running ``experiments/bench_sweep.py`` (its logic, unchanged) for an MLP and for LeNet; written
to ``<out>/sweep_throughput.{json,md}``.

``--derivative_accuracy``: the derivative penalty (SPEC 1.4) computed in float32 by the plain difference quotient
``(f(x + d u) - f(x)) / d`` and by the library's Gauss-Legendre form (:func:`lcnn_jax.regularizers.derivative.
secant_slope`), each against a float64 difference-quotient oracle, on 784-input networks at initialisation (64
mnist5k images, one unit direction each, d = 1/255). Enables float64 in this process only. Written to
``<out>/derivative_accuracy.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcnn_jax import train as training
from lcnn_jax import io as lio
from lcnn_jax.configs import default_config
from lcnn_jax.data import dataset_info, load_split
from lcnn_jax.nn import make_model
from lcnn_jax.regularizers import make_regularizer

# name -> (constructor kwargs, target ratio or None). Coefficients are typical values; they do not affect cost.
VARIANTS = {
    "datagrad": ({"coeff": 1e-2}, 3.0),
    "spectreg": ({"coeff": 1e-2}, 3.0),
    "jacreg": ({"coeff": 1e-2}, None),  # target K + 2, filled in from the number of classes
    "derivative": ({"resolution": 1 / 255}, 3.0),
    "confidence_penalty": ({"coeff": 1e-1}, None),
    "weight_l2": ({"coeff": 5e-4}, None),
    "lcnn_gradnorm": ({"coeff": 1e-3, "batch_size": 128}, None),
    "cure": ({"coeff": 1e-3, "h": 1.0, "batch_size": 128}, None),
}
DEFAULT = ("datagrad", "spectreg", "jacreg", "derivative", "confidence_penalty")
HERE = os.path.dirname(os.path.abspath(__file__))


def round_robin_times(steps: dict, states: dict, batch, *, repeats: int, warmup: int = 2) -> dict:
    """Median wall time of one call of each ``steps[name](state, batch) -> (state, metrics)``.

    The state is threaded through (the jitted steps donate it). ``warmup`` calls per variant (the first one
    compiles) precede ``repeats`` timed rounds of one call per variant each.
    """
    for name, step in steps.items():
        for _ in range(warmup):
            states[name], m = step(states[name], batch)
        jax.block_until_ready(m)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            states[name], m = step(states[name], batch)
            jax.block_until_ready((states[name], m))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def step_cost(names, *, model_name: str, batch_size: int, repeats: int) -> dict:
    info = dataset_info("mnist5k")
    train = load_split("mnist5k", "train")
    batch = {"image": train.images[:batch_size], "label": train.labels[:batch_size]}
    model = make_model(model_name, info.num_classes)
    mesh = training.data_mesh()
    tx, _ = training.make_optimizer(default_config().optim, 1000, None)
    key = jax.random.PRNGKey(0)

    regs = {"plain": []}
    targets = {"plain": None}
    for name in names:
        kwargs, target = VARIANTS[name]
        regs[name] = [make_regularizer(name, dataset_info=info, **kwargs)]
        targets[name] = float(info.num_classes + 2) if name == "jacreg" else target
    # Same key -> same initial parameters for every variant.
    states = {n: training.replicate(training.create_train_state(model, tx, r, key, batch), mesh)
              for n, r in regs.items()}
    steps = {n: training.jit_train_step(training.make_train_step(model, r), mesh) for n, r in regs.items()}
    sharded = training.shard_batch(batch, mesh)
    t0 = time.perf_counter()
    times = round_robin_times(steps, states, sharded, repeats=repeats)
    wall = time.perf_counter() - t0
    ref = times["plain"]
    dev = jax.devices()[0]
    rows = [{"regularizer": n, "ms_per_step": 1000 * t, "x_plain": t / ref, "target": targets[n],
             "met": None if targets[n] is None else bool(t / ref <= targets[n])} for n, t in times.items()]
    return {"rows": rows, "model": model_name, "batch_size": batch_size, "repeats": repeats,
            "devices": f"{jax.device_count()} x {dev.device_kind} ({dev.platform})", "wall_s": wall,
            "load_average_1min": os.getloadavg()[0]}


def step_cost_md(res: dict) -> str:
    lines = [f"# Train-step cost / plain step ({res['model']}, batch {res['batch_size']} of mnist5k)", "",
             "| regularizer | ms/step | x plain | target | met |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        tgt = f"<= {r['target']:g}" if r["target"] else ""
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"| {r['regularizer']} | {r['ms_per_step']:.1f} | {r['x_plain']:.2f} | {tgt} | {met} |")
    lines += ["", f"Median of {res['repeats']} round-robin steps after 2 warm-up steps each, one process; "
              f"{res['devices']}; shared machine, 1-min load average {res['load_average_1min']:.1f} at the end "
              f"(ratios are robust to load, absolute times are not). Benchmark wall time {res['wall_s']:.0f} s.",
              "Command: `python experiments/bench_regularizers.py`"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ sweep throughput
SWEEP_CASES = (
    {"model": "mlp", "regularizer": "datagrad", "seeds": 5, "coeffs": "1,10,100", "steps": 20},
    {"model": "lenet", "regularizer": "datagrad", "seeds": 5, "coeffs": "1,10,100", "steps": 5},
)


def sweep_throughput() -> dict:
    """Run ``experiments/bench_sweep.py`` per case and keep its report lines (and the two speedups)."""
    out = []
    for case in SWEEP_CASES:
        cmd = [sys.executable, os.path.join(HERE, "bench_sweep.py"), "--model", case["model"], "--regularizer",
               case["regularizer"], "--seeds", str(case["seeds"]), "--coeffs", case["coeffs"], "--steps",
               str(case["steps"]), "--warmup", "2"]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.strip()]
        rec = {**case, "command": " ".join(["python", "experiments/bench_sweep.py"] + cmd[2:]), "output": lines,
               "returncode": proc.returncode, "wall_s": time.time() - t0}
        for l in lines:
            if l.startswith("speedup (steady state"):
                rec["speedup_steady"] = float(l.rsplit(":", 1)[1].strip().rstrip("x"))
            if l.startswith("speedup end-to-end"):
                rec["speedup_end_to_end"] = float(l.rsplit(":", 1)[1].strip().rstrip("x"))
        if proc.returncode:
            rec["stderr_tail"] = proc.stderr[-2000:]
        print("\n".join(lines), flush=True)
        out.append(rec)
    return {"cases": out, "load_average_1min": os.getloadavg()[0]}


def sweep_md(res: dict) -> str:
    lines = ["# Vectorized ablation (one jit(vmap(step)) over seeds x coefficients) vs the same runs one after another",
             "", "| model | regularizer | members | steady-state speedup | end-to-end speedup (incl. compiles) |",
             "|---|---|---|---|---|"]
    for c in res["cases"]:
        k = c["seeds"] * len(c["coeffs"].split(","))
        lines.append(f"| {c['model']} | {c['regularizer']} | {k} | {c.get('speedup_steady', float('nan')):.2f}x | "
                     f"{c.get('speedup_end_to_end', float('nan')):.2f}x |")
    lines.append("")
    for c in res["cases"]:
        lines += [f"`{c['command']}`", "", "```"] + c["output"] + ["```", ""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ derivative accuracy
def derivative_accuracy(num: int = 64) -> dict:
    """float32 difference quotient and float32 quadrature vs a float64 difference-quotient oracle."""
    jax.config.update("jax_enable_x64", True)  # this process only; the library never does this
    from lcnn_jax.regularizers.derivative import QUADRATURE_ORDER, secant_slope

    d = 1.0 / 255

    def penalty(s, t):
        gap = jnp.sum((s - t) ** 2, -1)
        return gap / (jnp.sum(t ** 2, -1) + jnp.sum(s ** 2, -1) + jnp.finfo(gap.dtype).eps ** 2)

    def direct(f, x, u, dd):
        y, t = jax.jvp(f, (x,), (u,))
        return penalty((f(x + dd * u) - y) / dd, t)

    def quad(f, x, u, dd):
        _, t = jax.jvp(f, (x,), (u,))
        return penalty(secant_slope(f, x, u, dd), t)

    def mlp(act):
        rng = np.random.default_rng(0)
        ws = [rng.standard_normal((784, 256)) * np.sqrt(2 / 784), rng.standard_normal((256, 256)) * np.sqrt(2 / 256),
              rng.standard_normal((256, 10)) / 16]
        bs = [0.1 * rng.standard_normal(256), 0.1 * rng.standard_normal(256), np.zeros(10)]

        def apply(p, x):
            h = x.reshape(x.shape[0], -1)
            for i in range(2):
                h = act(h @ p["w"][i] + p["b"][i])
            return h @ p["w"][2] + p["b"][2]
        return {"w": [jnp.asarray(w) for w in ws], "b": [jnp.asarray(b) for b in bs]}, apply

    def cnn():
        m = make_model("small_cnn", 10)
        v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)
        return jax.tree.map(lambda a: a.astype(jnp.float64), v), (lambda v, x: m.apply(v, x, train=False))

    cases = {"mlp 784-256-256-10 tanh": mlp(jnp.tanh), "mlp 784-256-256-10 softplus": mlp(jax.nn.softplus),
             "mlp 784-256-256-10 relu": mlp(jax.nn.relu), "small_cnn (relu, max-pool)": cnn()}
    x64 = jnp.asarray(load_split("mnist5k", "train").images[:num], jnp.float64)
    g = np.random.default_rng(1).standard_normal(x64.shape)
    u64 = jnp.asarray(g / np.linalg.norm(g.reshape(num, -1), axis=1)[:, None, None, None])
    rows = []
    for name, (p, apply) in cases.items():
        p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        x32, u32 = x64.astype(jnp.float32), u64.astype(jnp.float32)
        oracle = np.asarray(jax.jit(lambda x, u: direct(lambda z: apply(p, z), x, u, d))(x64, u64))
        naive = np.asarray(jax.jit(lambda x, u: direct(lambda z: apply(p32, z), x, u, np.float32(d)))(x32, u32))
        q32 = np.asarray(jax.jit(lambda x, u: quad(lambda z: apply(p32, z), x, u, np.float32(d)))(x32, u32))
        q64 = np.asarray(jax.jit(lambda x, u: quad(lambda z: apply(p, z), x, u, d))(x64, u64))
        rows.append({"network": name, "oracle_f64_mean": float(oracle.mean()),
                     "direct_f32_over_oracle": float(naive.mean() / oracle.mean()),
                     "quadrature_f32_over_oracle": float(q32.mean() / oracle.mean()),
                     "quadrature_f64_over_oracle": float(q64.mean() / oracle.mean())})
        print(rows[-1], flush=True)
    jax.config.update("jax_enable_x64", False)
    return {"rows": rows, "num_examples": num, "delta": d, "quadrature_order": QUADRATURE_ORDER}


def derivative_md(res: dict) -> str:
    lines = ["# Derivative penalty (SPEC 1.4) in float32: difference quotient vs Gauss-Legendre secant", "",
             f"Batch-mean penalty over {res['num_examples']} mnist5k images (one unit direction each, "
             f"d = 1/255), networks at initialisation; each column divided by the float64 difference-quotient "
             f"oracle (1.00 = exact). Quadrature order {res['quadrature_order']}.", "",
             "| network | float64 oracle | f32 difference quotient | f32 quadrature | f64 quadrature |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['network']} | {r['oracle_f64_mean']:.3e} | {r['direct_f32_over_oracle']:.2f}x | "
                     f"{r['quadrature_f32_over_oracle']:.3f}x | {r['quadrature_f64_over_oracle']:.3f}x |")
    lines += ["", "Command: `python experiments/bench_regularizers.py --derivative_accuracy`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--sweep", action="store_true", help="also the vectorized-ablation throughput")
    p.add_argument("--skip_steps", action="store_true", help="skip the step-cost table")
    p.add_argument("--derivative_accuracy", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "regularizers"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.derivative_accuracy:
        res = derivative_accuracy()
        lio.write_json_atomic(os.path.join(args.out, "derivative_accuracy.json"), res)
        lio.write_text_atomic(os.path.join(args.out, "derivative_accuracy.md"), derivative_md(res))
        print(derivative_md(res))
        return
    names = [n for n in args.only.split(",") if n] or list(DEFAULT)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown regularizer(s) {unknown}; choose among {list(VARIANTS)}")
    if not args.skip_steps:
        res = step_cost(names, model_name=args.model, batch_size=args.batch_size, repeats=args.repeats)
        lio.write_json_atomic(os.path.join(args.out, "step_cost.json"), res)
        lio.write_text_atomic(os.path.join(args.out, "step_cost.md"), step_cost_md(res))
        print(step_cost_md(res), flush=True)
    if args.sweep:
        res = sweep_throughput()
        lio.write_json_atomic(os.path.join(args.out, "sweep_throughput.json"), res)
        lio.write_text_atomic(os.path.join(args.out, "sweep_throughput.md"), sweep_md(res))
        print(sweep_md(res))


if __name__ == "__main__":
    main()
