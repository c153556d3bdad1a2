"""How tight is the certified curvature bound of a trained LCNN, factor by factor (issue 13)?

    python experiments/curvature_bound_report.py --workdir runs/lcnn_mnist5k_lcnn \\
        [--mnist_test_dir ../shared/data/mnist] [--num_examples 100] [--resnet] [--out experiments/results/curvature_bound]

``--workdir`` is a finished ``lcnn-jax train`` run, e.g. of ``experiments/configs/lcnn_mnist5k.py:lcnn``. The script
computes :func:`lcnn_jax.measures.curvature_bound` of the trained model (eval mode) and reports:

* the certified bound on ``||d^2 logit_k / dx^2||_2`` per logit, and the same algebra evaluated with every
  factor's LOWER side (``factor_side="lower"``: not a bound, the value if every certified factor were exact;
  this is what a power-iteration-only computation gives, as the library did before the certified norms);
* the largest input-Hessian norm of each logit measured on ``--num_examples`` test images (power iteration,
  20 Hessian-vector products from a random start: an estimate from below) -- the bound's total slack;
* every factor (convolution / dense norms, constant scalings, pooling, activations) with ``lower <= . <= upper``
  and ``upper / lower``, and each nonlinearity's share of the network's curvature bound (what dominates);
* with ``--resnet``: the factor table of an LCNN ResNet-18 at initialisation on 32x32x3 (CIFAR shape), for the
  looseness of the certified convolution norms at full width.

Files in ``--out``: ``report.json`` and ``report.md`` (written atomically).
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax import data as data_lib
from lcnn_jax.io import write_json_atomic, write_text_atomic
from lcnn_jax.measures import curvature_bound, input_curvature
from lcnn_jax.train import load_trained


def _factor_rows(res) -> list[dict]:
    return [{"path": f.path or "(model)", "op": f.op, "lower": f.lower, "upper": f.upper,
             "looseness": f.looseness, "curvature": f.curvature} for f in res.factors]


def _shares(res) -> list[dict]:
    total = res.network.curvature
    return sorted(({"site": k, "value": v, "share": v / total if total else 0.0} for k, v in res.curvature_terms),
                  key=lambda r: -r["value"])


def _measured_logit_hessians(model, variables, images, key, num_iters=20):
    """(K,) max over images of the power-iteration estimate of ||d^2 z_k / dx^2|| (from below)."""
    f = lambda x: model.apply(variables, x[None], train=False)[0]  # noqa: E731
    k = int(jax.eval_shape(f, jax.ShapeDtypeStruct(images.shape[1:], jnp.float32)).shape[0])

    @jax.jit
    def norms(xs, key):
        n = xs.shape[0]
        out = input_curvature(lambda x, c: f(x)[c], jnp.repeat(xs, k, axis=0), jnp.tile(jnp.arange(k), n), key=key,
                              num_iters=num_iters, batch_size=64)
        return out["hessian_norm"].reshape(n, k)

    chunks = [np.asarray(norms(jnp.asarray(images[i:i + 20]), jax.random.fold_in(key, i)))
              for i in range(0, len(images), 20)]
    return np.concatenate(chunks).max(axis=0)


def _table(rows: list[dict]) -> str:
    lines = ["| module | factor | lower | upper (certified) | upper / lower | K |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['op']} | {r['lower']:.4g} | {r['upper']:.4g} | {r['looseness']:.4f} | "
                     f"{r['curvature']:.4g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a finished lcnn-jax train run of an LCNN model")
    p.add_argument("--mnist_test_dir", default=None, help="official MNIST IDX folder (else: mnist5k test split)")
    p.add_argument("--num_examples", type=int, default=100)
    p.add_argument("--resnet", action="store_true", help="also the factor table of an LCNN ResNet-18 at init")
    p.add_argument("--out", default="experiments/results/curvature_bound")
    args = p.parse_args(argv)
    if args.num_examples < 1:
        p.error("--num_examples must be >= 1")
    if not os.path.isdir(args.workdir):
        p.error(f"--workdir {args.workdir!r} is not a directory (train first, e.g. lcnn-jax train --config "
                "experiments/configs/lcnn_mnist5k.py:lcnn --workdir runs/lcnn_mnist5k_lcnn)")

    config, model, state, info = load_trained(args.workdir)
    variables = {"params": state.params, **state.model_state}
    shape = tuple(info.image_shape)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    res = curvature_bound(model, variables, shape, key=key)
    t_bound = time.perf_counter() - t0
    est = curvature_bound(model, variables, shape, key=key, factor_side="lower")
    if args.mnist_test_dir:
        test = data_lib.load_split("mnist", "test", data_dir=args.mnist_test_dir)
        test_name = "official MNIST test"
    else:
        test = data_lib.load_split(config.data.name, "test")
        test_name = f"{config.data.name} test"
    t0 = time.perf_counter()
    measured = _measured_logit_hessians(model, variables, np.asarray(test.images[:args.num_examples]),
                                        jax.random.PRNGKey(1))
    t_measured = time.perf_counter() - t0
    bound, lower_alg = np.asarray(res.curvature, np.float64), np.asarray(est.curvature, np.float64)
    out = {
        "workdir": args.workdir, "model": config.model.name, "test_set": test_name,
        "num_examples": args.num_examples, "bound_seconds": t_bound, "measure_seconds": t_measured,
        "curvature_bound": bound.tolist(), "lower_side_algebra": lower_alg.tolist(), "measured_max": measured.tolist(),
        "lipschitz_bound": np.asarray(res.lipschitz).tolist(),
        "network": {"lipschitz": res.network.lipschitz, "curvature": res.network.curvature},
        "network_lower_side": {"lipschitz": est.network.lipschitz, "curvature": est.network.curvature},
        "factors": _factor_rows(res), "curvature_shares": _shares(res),
        "device": f"{jax.device_count()} x {jax.devices()[0].platform}",
    }
    md = [f"# Certified curvature bound of `{config.model.name}` ({args.workdir})", "",
          f"Command: `python experiments/curvature_bound_report.py --workdir {args.workdir}"
          + (f" --mnist_test_dir {args.mnist_test_dir}" if args.mnist_test_dir else "")
          + f" --num_examples {args.num_examples}" + (" --resnet" if args.resnet else "") + "`; "
          f"{out['device']}; bound computed in {t_bound:.1f} s.", "",
          "| logit | certified bound | same algebra, lower sides | measured max (estimate from below) | "
          "bound / measured |", "|---|---|---|---|---|"]
    for k, (b, lo, m) in enumerate(zip(bound, lower_alg, measured)):
        md.append(f"| {k} | {b:.4g} | {lo:.4g} | {m:.4g} | {b / m:.3g} |")
    md += ["", f"Measured: max over the first {args.num_examples} {test_name} images of 20 power iterations on the "
               "logit's input Hessian.", "", "## Factors", "", _table(out["factors"]), "",
           "## Share of the network's curvature bound per nonlinearity", "",
           "| site | K share | % |", "|---|---|---|"]
    md += [f"| {r['site']} | {r['value']:.4g} | {100 * r['share']:.1f} |" for r in out["curvature_shares"]]
    if args.resnet:
        from lcnn_jax.nn import make_lcnn_model

        net = make_lcnn_model("resnet18", 10)
        v = jax.jit(lambda k: net.init(k, jnp.zeros((1, 32, 32, 3))))(jax.random.PRNGKey(0))
        t0 = time.perf_counter()
        rn = curvature_bound(net, v, (32, 32, 3), key=key)
        out["resnet18_init"] = {"factors": _factor_rows(rn), "seconds": time.perf_counter() - t0,
                                "curvature_bound_max": float(np.max(rn.curvature))}
        convs = [r for r in out["resnet18_init"]["factors"] if r["op"] == "conv"]
        loose = np.array([r["looseness"] for r in convs])
        md += ["", "## LCNN ResNet-18 at initialisation, 32x32x3: certified conv norms", "",
               f"{len(convs)} convolutions, upper / lower: median {np.median(loose):.4f}, max {loose.max():.4f} "
               f"(bound computed in {out['resnet18_init']['seconds']:.1f} s).", "", _table(convs)]
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "report.json"), out)
    write_text_atomic(os.path.join(args.out, "report.md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
