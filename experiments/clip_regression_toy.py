"""CLIP's 1-D regression toy (SPEC 1.3): fixed lambda in {10, 1, 1e-10, 0} with warm starts.

    python experiments/clip_regression_toy.py [--steps 2000] [--lr 1e-2] [--num_pairs 500] [--data_loss sum]
                                              [--out experiments/results/clip]

Setting (SPEC 1.3 where it says, ours where it does not):

* target ``f(x) = 0.5 * max(|x| - 3, 0)`` on [-4, 4]; the 100 noisy training samples of
  :func:`lcnn_jax.data.regression_toy` (``seed=0``, noise std 0.05) from [-4,-3] U [-0.3,0.3] U [3,4], so the gaps
  (-3, -0.3) and (0.3, 3) hold no data;
* MLP 1-500-200-100-1 with sigmoid activations, also after the output (``make_model("mlp", 1, ...,
  output_activation="sigmoid")``);
* loss ``sum_i (f(x_i) - y_i)^2 + lam * Lip`` with ``Lip = max_pairs |f(u) - f(v)| / |u - v|``, the unsquared
  CLIP term of SPEC 1.3, from the loss of :func:`lcnn_jax.regularizers.clip.clip`. The data term is the *sum* of
  squared errors (``--data_loss sum``; the reference repository's regression trainer sums too). With the mean
  (``--data_loss mean``) the data term is 100x weaker and already lambda = 1 flattens the fit to a constant, so
  lambda = 1 and 10 look alike;
* every epoch draws 500 fresh pairs ``(u, u + 0.1 N(0, 1))``, ``u ~ U[-4, 4]`` (``draw_pairs`` inside the compiled
  step), which the CLIP loss moves by one adaptive ascent step before penalising the maximal quotient;
* full batch, so an epoch is one step; Adam (lr ``--lr``), ``--steps`` steps per lambda;
* **warm starts in decreasing order of lambda: 10 -> 1 -> 1e-10 -> 0**: lambda = 10 starts from the random init,
  every later lambda from the previous lambda's trained weights (with a fresh Adam state). This is the order in
  which SPEC 1.3 lists the values (a continuation from strong to no regularization); the paper's own text is not
  in this repository, so the order is SPEC's, not checked against the paper. Lambda is the CLIP state's
  ``coeff`` array, so one compiled program serves all four values.

Reported per lambda (``regression_toy.json`` / ``.md``): CLIP's Lipschitz estimate of the trained network
(:func:`lcnn_jax.measures.lipschitz.lipschitz_pair_ascent` from 1000 fresh pairs to convergence, every pair
re-scored in float64: :func:`experiments.clip_table.pair_ascent_lipschitz`) and the library's raw float32 value;
as an independent check ``max |f'(x)|`` on a dense grid of [-4, 4] (autodiff, 4001 points) and on the interval the
final pairs span (by the mean value theorem an upper bound on every pair's quotient); training MSE; MSE against
the clean target on the grid and on the gaps only. ``regression_toy.png`` plots the four fitted functions over the
data and the target.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import NamedTuple, Sequence

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable like under pytest
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.clip_table import pair_ascent_lipschitz
from lcnn_jax import io
from lcnn_jax.data import regression_toy
from lcnn_jax.nn import make_model
from lcnn_jax.regularizers.clip import clip, draw_pairs

#: The paper's lambdas, in the warm-start order used here (decreasing).
LAMBDAS = (10.0, 1.0, 1e-10, 0.0)
DOMAIN = (-4.0, 4.0)
GAPS = ((-3.0, -0.3), (0.3, 3.0))  # no training data there


def toy_model(widths: Sequence[int] = (500, 200, 100)):
    """MLP 1-500-200-100-1 (``widths``), sigmoid after every layer including the output (SPEC 1.3)."""
    return make_model("mlp", 1, widths=tuple(widths), act="sigmoid", output_activation="sigmoid")


class ToyRun(NamedTuple):
    """lams: the lambdas in training order. params: trained parameters per lambda (same order).
    start_mse / final_mse: training MSE at the first / after the last step of each lambda.
    final_lip: the penalty's max quotient at the last step. steps: steps per lambda. wall_s: training time."""

    lams: tuple
    params: list
    start_mse: list
    final_mse: list
    final_lip: list
    steps: int
    wall_s: float


def fit_toy(lams: Sequence[float] = LAMBDAS, *, steps: int = 2000, lr: float = 1e-2, num_pairs: int = 500,
            perturb_scale: float = 0.1, data_loss: str = "sum", seed: int = 0, data_seed: int = 0,
            chunk: int = 250, model=None) -> ToyRun:
    """Train the toy with warm starts through ``lams`` in the given order (``steps`` full-batch Adam steps each).

    Each lambda starts from the previous lambda's final parameters with a fresh optimizer state. Every epoch
    (= step) draws ``num_pairs`` fresh pairs ``(u, u + perturb_scale N(0, 1))``, ``u ~ U[-4, 4]``
    (:func:`~lcnn_jax.regularizers.clip.draw_pairs`, inside the compiled step) into the CLIP state, with reset
    ascent steps; the CLIP loss then moves them by one ascent step and penalises the maximal quotient.
    ``data_loss``: ``"sum"`` (sum of squared errors) or ``"mean"`` (MSE). Steps run in compiled chunks of
    ``chunk`` (``lax.fori_loop``); lambda is the state's ``coeff`` array, so every lambda reuses one program.
    """
    if data_loss not in ("sum", "mean"):
        raise ValueError(f"data_loss must be 'sum' or 'mean', got {data_loss!r}.")
    model = toy_model() if model is None else model
    train = regression_toy("train", seed=data_seed)
    batch = {"image": jnp.asarray(train.images), "label": jnp.asarray(train.labels)}
    # redraw_every_epochs=None: the redraw happens inside the compiled step below, not on the host
    reg = clip(0.0, num_pairs=num_pairs, init="perturb", perturb_scale=perturb_scale, redraw_every_epochs=None)
    tx = optax.adam(lr)
    k_init, k_reg, k_steps = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = model.init(k_init, batch["image"])["params"]
    reduce = jnp.sum if data_loss == "sum" else jnp.mean

    def apply_fn(p, xs):
        return model.apply({"params": p}, xs)

    def mse_of(p):
        return jnp.mean(jnp.square(apply_fn(p, batch["image"]) - batch["label"]))

    def train_step(epoch, carry):
        p, opt_state, state, _ = carry
        k = jax.random.fold_in(k_steps, epoch)
        k_x, k_pairs, k_loss = jax.random.split(k, 3)
        xs = jax.random.uniform(k_x, (num_pairs, 1), minval=DOMAIN[0], maxval=DOMAIN[1])
        u, v = draw_pairs(k_pairs, xs, num_pairs, init="perturb", perturb_scale=perturb_scale)
        state = {**state, "u": u, "v": v, "step": jnp.ones_like(state["step"])}

        def objective(q):
            data = reduce(jnp.square(apply_fn(q, batch["image"]) - batch["label"]))
            value, new_state, metrics = reg.loss(q, state, batch, k_loss, apply_fn)
            return data + value, (new_state, metrics["max_quotient"])

        (_, (state, lip)), grads = jax.value_and_grad(objective, has_aux=True)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, state, lip

    @jax.jit
    def run_chunk(p, opt_state, state, first, length):
        return jax.lax.fori_loop(first, first + length, train_step, (p, opt_state, state, jnp.zeros(())))

    mse_jit = jax.jit(mse_of)
    state = reg.init(k_reg, params, batch)
    out_params, start_mse, final_mse, final_lip = [], [], [], []
    t0 = time.time()
    epoch = 0
    for lam in lams:
        state = {**state, "coeff": jnp.asarray(lam, jnp.float32)}
        opt_state = tx.init(params)
        start_mse.append(float(mse_jit(params)))
        lip = jnp.nan
        done = 0
        while done < int(steps):
            n = min(int(chunk), int(steps) - done)
            params, opt_state, state, lip = run_chunk(params, opt_state, state, jnp.int32(epoch), jnp.int32(n))
            done, epoch = done + n, epoch + n
        final_mse.append(float(mse_jit(params)))
        final_lip.append(float(lip))
        out_params.append(params)
    jax.block_until_ready(params)
    return ToyRun(tuple(float(l) for l in lams), out_params, start_mse, final_mse, final_lip, int(steps),
                  time.time() - t0)


def max_abs_slope(model, params, lo: float, hi: float, num: int = 4001) -> float:
    """``max |f'(x)|`` over ``num`` equally spaced points of [lo, hi] (exact derivatives by autodiff)."""
    grid = jnp.linspace(lo, hi, num)[:, None]
    f = lambda x: model.apply({"params": params}, x[None])[0, 0]  # noqa: E731
    return float(jnp.max(jnp.abs(jax.vmap(jax.grad(f))(grid))))


@functools.lru_cache(maxsize=None)
def _apply(model):
    """``(variables, xs) -> f(xs)``, one object per model so that the jitted ascent is compiled once."""
    return lambda variables, xs: model.apply(variables, xs)


def pair_ascent_estimate(model, params, *, key, num_pairs: int = 1000, perturb_scale: float = 0.1,
                         max_steps: int = 2000) -> dict:
    """The CLIP estimate ``max |f(u) - f(v)| / |u - v|`` of a trained toy network from fresh pairs
    ``(u, u + perturb_scale N(0, 1))``, ``u ~ U[-4, 4]``: :func:`lcnn_jax.measures.lipschitz.lipschitz_pair_ascent`
    to convergence, each chunk's pairs re-scored in float64 (see
    :func:`experiments.clip_table.pair_ascent_lipschitz`). Also returns the interval the final pairs span."""
    k_x, k_pairs = jax.random.split(key)
    xs = jax.random.uniform(k_x, (num_pairs, 1), minval=DOMAIN[0], maxval=DOMAIN[1])
    u, v = draw_pairs(k_pairs, xs, num_pairs, init="perturb", perturb_scale=perturb_scale)
    res = pair_ascent_lipschitz(_apply(model), {"params": params}, u, v, max_steps=max_steps)
    u, v = res.pop("pairs")
    res["span"] = [float(jnp.minimum(u, v).min()), float(jnp.maximum(u, v).max())]
    return res


def evaluate_toy(model, run: ToyRun, *, key) -> list[dict]:
    """One row per lambda: Lipschitz estimates and fit errors (see the module docstring)."""
    test = regression_toy("test", n_grid=4001)
    grid, target = jnp.asarray(test.images), np.asarray(test.labels)[:, 0]
    in_gap = np.zeros(len(grid), bool)
    for lo, hi in GAPS:
        in_gap |= (np.asarray(grid[:, 0]) > lo) & (np.asarray(grid[:, 0]) < hi)
    rows = []
    for i, (lam, params) in enumerate(zip(run.lams, run.params)):
        est = pair_ascent_estimate(model, params, key=jax.random.fold_in(key, i))
        lo, hi = est["span"]
        pred = np.asarray(model.apply({"params": params}, grid))[:, 0]
        rows.append({
            "lam": lam,
            "lipschitz_pair_ascent": est["estimate"],
            "lipschitz_raw_float32": est["raw_float32"],
            "pair_ascent_steps": est["steps"],
            "pair_ascent_converged": est["converged"],
            "max_slope_grid": max_abs_slope(model, params, *DOMAIN),
            "max_slope_pair_span": max_abs_slope(model, params, min(lo, DOMAIN[0]), max(hi, DOMAIN[1]), 20001),
            "pair_span": [lo, hi],
            "train_mse": run.final_mse[i],
            "start_train_mse": run.start_mse[i],
            "target_mse_grid": float(np.mean((pred - target) ** 2)),
            "target_mse_gaps": float(np.mean((pred[in_gap] - target[in_gap]) ** 2)),
            "final_penalty_quotient": run.final_lip[i],
        })
    return rows


def plot_toy(model, run: ToyRun, path: str, rows: Sequence[dict] | None = None) -> None:
    """The four fitted functions over the training data and the target, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = regression_toy("train", seed=0)
    test = regression_toy("test", n_grid=2001)
    x = jnp.asarray(test.images)
    fig, ax = plt.subplots(figsize=(8, 5))
    for lo, hi in GAPS:
        ax.axvspan(lo, hi, color="0.93", zorder=0)
    ax.plot(test.images[:, 0], test.labels[:, 0], "k--", lw=1.5, label="target 0.5 max(|x|-3, 0)")
    ax.scatter(train.images[:, 0], train.labels[:, 0], s=12, c="k", alpha=0.6, label="training samples", zorder=3)
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for i, (lam, params) in enumerate(zip(run.lams, run.params)):
        y = np.asarray(model.apply({"params": params}, x))[:, 0]
        lip = f", Lip = {rows[i]['lipschitz_pair_ascent']:.3g}" if rows else ""
        ax.plot(test.images[:, 0], y, color=colors[i % len(colors)], lw=1.8, label=f"lambda = {lam:g}{lip}")
    ax.set_xlim(*DOMAIN)
    ax.set_xlabel("x")
    ax.set_ylabel("f(x)")
    ax.set_title(f"CLIP regression toy: warm starts lambda {' -> '.join(f'{l:g}' for l in run.lams)}, "
                 f"{run.steps} Adam steps each\n(shaded: no training data)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    io.save_figure_atomic(fig, path, dpi=120)


def markdown_table(rows: Sequence[dict], meta: dict) -> str:
    lines = [
        f"CLIP regression toy (SPEC 1.3). Warm starts {' -> '.join(format(r['lam'], 'g') for r in rows)}, "
        f"{meta['steps']} full-batch Adam steps (lr {meta['lr']:g}) per lambda on {meta['data_loss']} of squared errors "
        f"+ lam * Lip, {meta['num_pairs']} CLIP pairs redrawn every step. "
        f"Command: `{meta['command']}`; {meta['device']}, training {meta['train_wall_s']:.0f} s.",
        "",
        "| lambda | Lip (pair ascent, float64-rescored) | raw float32 pair ascent | max abs f' on [-4,4] | "
        "max abs f' over pair span | train MSE | MSE vs target (grid) | MSE vs target (gaps) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['lam']:g} | {r['lipschitz_pair_ascent']:.4f} | {r['lipschitz_raw_float32']:.4f} | "
                     f"{r['max_slope_grid']:.4f} | "
                     f"{r['max_slope_pair_span']:.4f} | {r['train_mse']:.2e} | {r['target_mse_grid']:.2e} | "
                     f"{r['target_mse_gaps']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000, help="full-batch Adam steps per lambda")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--num_pairs", type=int, default=500)
    p.add_argument("--data_loss", choices=("sum", "mean"), default="sum")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("experiments", "results", "clip"))
    args = p.parse_args(argv)

    model = toy_model()
    run = fit_toy(LAMBDAS, steps=args.steps, lr=args.lr, num_pairs=args.num_pairs, data_loss=args.data_loss,
                  seed=args.seed)
    rows = evaluate_toy(model, run, key=jax.random.PRNGKey(args.seed + 100))
    os.makedirs(args.out, exist_ok=True)
    plot_toy(model, run, os.path.join(args.out, "regression_toy.png"), rows)
    cmd = "python experiments/clip_regression_toy.py " + " ".join(argv if argv is not None else [])
    meta = {"steps": args.steps, "lr": args.lr, "num_pairs": args.num_pairs, "seed": args.seed,
            "data_loss": args.data_loss,
            "warm_start_order": list(run.lams), "train_wall_s": run.wall_s, "command": cmd.strip(),
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform})"}
    io.write_text_atomic(os.path.join(args.out, "regression_toy.json"),
                         json.dumps({"meta": meta, "rows": rows}, indent=2))
    io.write_text_atomic(os.path.join(args.out, "regression_toy.md"), markdown_table(rows, meta))
    print(markdown_table(rows, meta))
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
