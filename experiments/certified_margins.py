"""Why a network certifies little: its certified Lipschitz bound (``lcnn_jax.report.model_bound``, a product of
layer norms) against its logit margins, for seed 0 of each method of a ``lcnn-jax compare`` run, on the first 256
mnist5k test images (the images the compare table measures).

    python experiments/certified_margins.py runs/compare

Prints per method: the largest bound on a logit's gradient norm, the median pairwise bound ``L_yj`` over class
pairs, the median margin ``z_y - max_j z_j`` and their ratio (an example is certified at radius eps when its margin
exceeds ``L_yj eps`` for every j).
"""
import sys

import numpy as np

from lcnn_jax import report, runs
from lcnn_jax.data import load_split


def main(workdir: str) -> None:
    wd = runs.inspect_workdir(workdir)
    test = load_split("mnist5k", "test")
    xs, ys = test.images[:256], test.labels[:256]
    methods = sorted({m.method for m in wd.members}, key=[m.method for m in wd.members].index)
    for method in methods:
        for _, _, model, state, _ in runs.load_members(runs.select_members(wd, method=method, seed=0)):
            variables = {"params": state.params, **(state.model_state or {})}
            bound = report.model_bound(model, variables, xs.shape[1:])
            if bound is None:
                print(f"{method:18s} no certified bound")
                continue
            z = np.asarray(report.model_functions(model, variables)[2](xs))
            rows = np.arange(len(ys))
            others = z.copy()
            others[rows, ys] = -np.inf
            margin = z[rows, ys] - others.max(1)
            pairwise = np.asarray(bound.pairwise_lipschitz)
            pairwise = pairwise[pairwise > 0]
            print(f"{method:18s} L max {float(np.max(bound.lipschitz)):9.1f}  pairwise median {np.median(pairwise):9.1f}"
                  f"  margin median {np.median(margin):7.2f}  ratio {np.median(margin) / np.median(pairwise):.4f}",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/compare")
