"""Tables and figures of ``experiments/random_labels.py``, read from its run files: the measures and their
labels, the Kendall tau of each measure with the generalization gap, the reference's minimum sharpness (its
SGD on the per-layer traces), the figures, the reference's own archived runs and the table of both protocols."""
from __future__ import annotations

import functools
import glob
import json
import math
import os
from typing import Sequence

import numpy as np
import scipy.stats

from lcnn_jax.io import save_figure_atomic, write_json_atomic, write_text_atomic

MEASURES = ("minimum_sharpness", "normalized_sharpness", "hessian_trace", "top_eigenvalue")
MEASURE_LABELS = {
    "minimum_sharpness": "minimum sharpness (with biases)",
    "normalized_sharpness": "normalized sharpness",
    "hessian_trace": "Hutchinson trace of the loss Hessian",
    "top_eigenvalue": "top Hessian eigenvalue",
}
SHORT_LABELS = {"ms_mlp": "MLP", "lenet": "LeNet"}
SHORT_MEASURES = {"minimum_sharpness": "min. sharpness", "normalized_sharpness": "norm. sharpness",
                  "hessian_trace": "Hessian trace", "top_eigenvalue": "top eigenvalue"}
# Not sharpness measures: shown under the table to expose confounds (e.g. the loss level at which training stopped).
DIAGNOSTICS = {"train_loss": "final training loss (diagnostic, not a measure)",
               "minimum_sharpness_nobias": "minimum sharpness without biases (closed form)",
               "minimum_sharpness_reference_sgd": "minimum sharpness as the reference minimises it (10,000 SGD steps)"}
MODEL_LABELS = {"ms_mlp": "MLP 784-512-128-512-10", "lenet": "LeNet"}
# SPEC 1.5, from the reference's archived runs: Kendall tau of MS with the gap, and LeNet's MS at three ratios.
PAPER_TAU = {("minimum_sharpness", "lenet"): 0.68, ("minimum_sharpness", "ms_mlp"): 0.86}
PAPER_LENET_MS = {0.0: 5.8, 0.5: 81.6, 1.0: 92.2}
# Final-epoch training loss of the reference's archived runs (02-sharpness-comparison/ARCHIVEs/train/<model>/<trial>/
# <r>/log.txt, last "train loss" line), median over its 10 trials; runs that never trained (loss 2.30) excluded.
REFERENCE_FINAL_TRAIN_LOSS = {
    "ms_mlp": {0.0: 9.8e-05, 0.1: 7.9e-04, 0.2: 1.1e-03, 0.3: 1.0e-03, 0.4: 1.2e-03, 0.5: 1.3e-03, 0.6: 1.4e-03,
               0.7: 1.6e-03, 0.8: 1.6e-03, 0.9: 1.7e-03, 1.0: 1.8e-03},
    "lenet": {0.0: 4.1e-05, 0.1: 1.7e-04, 0.2: 2.2e-04, 0.3: 2.7e-04, 0.4: 3.0e-04, 0.5: 3.6e-04, 0.6: 4.7e-04,
              0.7: 4.4e-04, 0.8: 8.1e-04, 0.9: 4.2e-04, 1.0: 3.3e-04},
}



def kendall_tau(x: Sequence[float], y: Sequence[float]) -> dict:
    """Kendall tau-b of ``x`` with ``y`` (``scipy.stats.kendalltau``) over the pairs where both are finite."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length; got {x.shape} and {y.shape}.")
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return {"tau": float("nan"), "pvalue": float("nan"), "n": int(ok.sum())}
    res = scipy.stats.kendalltau(x[ok], y[ok])
    return {"tau": float(res.statistic), "pvalue": float(res.pvalue), "n": int(ok.sum())}



def reference_sgd_ms(weight_traces, bias_traces, lr: float = 1e-3, steps: int = 10_000, decay: float = 1e-3) -> float:
    """Minimum sharpness as the reference code computes it from the per-layer traces (``sharpness/Minimum.py``, read
    for its method): traces divided by their sum ``S``; ``L - 1`` free log-scales ``e`` from 0; objective
    ``sum_{l<L} (W_l e^{-2 e_l} + B_l / P_l^2) + W_L P_{L-1}^2 + B_L`` with ``P_l = exp(e_1 + .. + e_l)``;
    ``steps`` plain gradient steps of ``lr / (1 + decay t)``; returns ``S`` times the objective evaluated before the
    last step. It stops short of the minimum when the optimal scales are far from 1 (our
    :func:`lcnn_jax.measures.minimum_sharpness_from_traces` runs Newton to convergence). NumPy, float64."""
    tw, tb = np.asarray(weight_traces, np.float64), np.asarray(bias_traces, np.float64)
    scale = tw.sum() + tb.sum()
    w, b = tw / scale, tb / scale
    n_free = len(w) - 1
    e = np.zeros(n_free)
    value = float("nan")
    for t in range(steps):
        a2 = np.exp(-2.0 * e)  # a_l^-2
        p2 = np.exp(2.0 * np.cumsum(e))  # P_l^2
        value = float(np.sum(w[:n_free] * a2) + np.sum(b[:n_free] / p2) + w[n_free] * p2[-1] + b[n_free])
        # d/de_j: -2 W_j a_j^-2  - 2 sum_{l >= j} B_l / P_l^2  + 2 W_L P^2
        tail = np.cumsum((b[:n_free] / p2)[::-1])[::-1]
        grad = -2.0 * w[:n_free] * a2 - 2.0 * tail + 2.0 * w[n_free] * p2[-1]
        e = e - lr / (1.0 + decay * t) * grad
    return value * scale


@functools.lru_cache(maxsize=None)
def _reference_sgd_ms_cached(weight_traces: tuple, bias_traces: tuple) -> float:
    return reference_sgd_ms(weight_traces, bias_traces)  # ~0.7 s each: once per run and process



def protocol_note(pr: dict) -> str:
    if pr.get("protocol") == "reference":
        return (f"mnist5k, {pr['n_train']} training images (stratified subset of the 4000, seed {pr['data_seed']}); "
                f"test = mnist5k test split (1000 images). Reference protocol: SGD lr {pr['lr']} / "
                f"(1 + {pr['lr_decay']:.4g} t), momentum {pr['momentum']}, batch min({pr['batch_size']}, n) with a "
                f"short last batch per epoch, weight decay {pr['weight_decay']} on all parameters, a fixed budget of "
                f"{pr['steps']} steps, measured at the last step. Measures on the first {pr['n_measure']} training "
                f"images with the trained labels; Hutchinson {pr['hutchinson_probes']} probes, Lanczos "
                f"{pr['lanczos_iters']} steps.")
    return (f"mnist5k, {pr['n_train']} training images (stratified subset of the 4000, seed {pr['data_seed']}); "
            f"test = mnist5k test split (1000 images). SGD lr {pr['lr']}, momentum {pr['momentum']}, batch "
            f"{pr['batch_size']}, until train accuracy 1.0"
            + (f" and train loss <= {pr['target_loss']}" if pr.get("target_loss") is not None else "")
            + f" (checked every {pr['eval_every']} steps) or "
            f"{pr['max_steps']} steps. Measures on the first {pr['n_measure']} training images with the trained "
            f"labels; Hutchinson {pr['hutchinson_probes']} probes, Lanczos {pr['lanczos_iters']} steps.")



def load_runs(out: str) -> list:
    """The run files of ``out``; ``minimum_sharpness_reference_sgd`` is added from the stored per-layer traces."""
    runs = []
    for path in sorted(glob.glob(os.path.join(out, "runs", "*.json"))):
        with open(path) as fh:
            rec = json.load(fh)
        if "minimum_sharpness_reference_sgd" not in rec and rec.get("weight_traces"):
            rec["minimum_sharpness_reference_sgd"] = _reference_sgd_ms_cached(tuple(rec["weight_traces"]),
                                                                              tuple(rec["bias_traces"]))
        runs.append(rec)
    return runs


def tau_table(runs: Sequence[dict], models: Sequence[str]) -> dict:
    """``{model: {measure: kendall_tau(measure, gap)}}`` over all finished runs of each model."""
    table = {}
    for m in models:
        rs = [r for r in runs if r["model"] == m]
        gaps = [r["gap"] for r in rs]
        table[m] = {meas: kendall_tau([r.get(meas, float("nan")) for r in rs], gaps)
                    for meas in MEASURES + tuple(DIAGNOSTICS)}
        losses = [r.get("train_loss", float("nan")) for r in rs]
        table[m]["_tau_with_train_loss"] = {meas: kendall_tau([r[meas] for r in rs], losses)["tau"]
                                            for meas in MEASURES}
        table[m]["_runs"] = len(rs)
        table[m]["_ratios"] = sorted({r["ratio"] for r in rs})
        table[m]["_min_train_acc"] = min((r["train_acc"] for r in rs), default=float("nan"))
    return table


def fit_steps(rs: Sequence[dict]) -> str:
    """Median step of the first full fit over the runs that fitted, and how many did not."""
    fit = [r["reached_full_fit_at_step"] for r in rs if r.get("reached_full_fit_at_step", -1) >= 0]
    out = f"{np.median(fit):.0f}" if fit else "never"
    return out + (f" ({len(rs) - len(fit)} never)" if fit and len(fit) < len(rs) else "")


def fmt(x, spec=".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)




def loss_curves(runs: Sequence[dict], models: Sequence[str], path: str) -> None:
    """Per network: the training loss of every run along its budget (coloured by r), and the final training loss
    against r beside the reference's archived final losses (``REFERENCE_FINAL_TRAIN_LOSS``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in models if any("curve" in r and r["model"] == m for r in runs)]
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.4 * len(models)), squeeze=False, layout="constrained")
    norm = matplotlib.colors.Normalize(0.0, 1.0)
    cmap = matplotlib.colormaps["viridis"]
    for i, m in enumerate(models):
        rs = [r for r in runs if r["model"] == m and "curve" in r]
        ax = axes[i, 0]
        for r in rs:
            steps = np.asarray(r["curve"]["step"])
            ax.plot(steps[1:], np.asarray(r["curve"]["train_loss"])[1:], color=cmap(norm(r["ratio"])), lw=0.8,
                    alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel("training loss (full training set)", fontsize=8)
        pr = rs[0]["protocol"]
        ax.set_title(f"{SHORT_LABELS.get(m, m)}: {pr['n_train']} images, {pr['steps']} steps, lr {pr['lr']} / "
                     f"(1 + {pr['lr_decay']:.3g} t)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax = axes[i, 1]
        ratios = np.array([r["ratio"] for r in rs])
        ax.scatter(ratios, [r["train_loss"] for r in rs], c=ratios, cmap="viridis", norm=norm, s=22,
                   edgecolors="k", linewidths=0.3, label="ours, end of the budget (each run)")
        ref = REFERENCE_FINAL_TRAIN_LOSS.get(m)
        if ref:
            ax.plot(list(ref), list(ref.values()), "k--", marker="x", lw=1,
                    label="reference, last epoch (archived, median of 10)")
        ax.set_yscale("log")
        ax.set_xlabel("fraction r of shuffled labels", fontsize=8)
        ax.set_ylabel("final training loss", fontsize=8)
        ax.set_title(f"{SHORT_LABELS.get(m, m)}: final training loss vs r", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[:, 0], label="r", shrink=0.9)
    save_figure_atomic(fig, path, dpi=110)


def scatter(runs: Sequence[dict], models: Sequence[str], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), len(MEASURES), figsize=(3.6 * len(MEASURES) + 1, 3.2 * len(models)),
                             squeeze=False, layout="constrained")
    norm = matplotlib.colors.Normalize(0.0, 1.0)
    for i, m in enumerate(models):
        rs = [r for r in runs if r["model"] == m]
        gaps = np.array([r["gap"] for r in rs])
        colours = np.array([r["ratio"] for r in rs])
        for j, meas in enumerate(MEASURES):
            ax = axes[i, j]
            vals = np.array([r[meas] for r in rs], np.float64)
            sc = ax.scatter(gaps, vals, c=colours, cmap="viridis", norm=norm, s=22, edgecolors="k", linewidths=0.3)
            if np.all(vals > 0):
                ax.set_yscale("log")
            tau = kendall_tau(vals, gaps)["tau"]
            ax.set_title(f"{SHORT_LABELS.get(m, m)}: {SHORT_MEASURES[meas]} (tau {fmt(tau)})", fontsize=9)
            ax.set_xlim(-0.03, 1.0)
            if i == len(models) - 1:
                ax.set_xlabel("generalization gap (train acc - test acc)", fontsize=8)
            ax.grid(alpha=0.3)
    fig.colorbar(sc, ax=axes, label="fraction r of shuffled labels", shrink=0.9)
    save_figure_atomic(fig, path, dpi=110)


# Archive folder of each network; keyed like PAPER_TAU ("lenet" there is the reference code's LeNet = our ms_lenet).
REFERENCE_MODEL_DIRS = {"ms_mlp": "MLP", "lenet": "LeNet"}
REFERENCE_MODEL_LABELS = {"ms_mlp": "MLP 784-512-128-512-10", "lenet": "LeNet (the reference code's, = our `ms_lenet`)"}


def _pickled_floats(blob: bytes) -> dict:
    """``{key: float}`` of a pickled flat ``dict[str, float]``, read with ``pickletools`` (nothing is unpickled,
    so no code from the file runs)."""
    import pickletools

    out, key = {}, None
    for op, arg, _ in pickletools.genops(blob):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            key = arg
        elif op.name in ("BINFLOAT", "FLOAT") and key is not None:
            out[key], key = float(arg), None
    return out


def _last_epoch(log_path: str) -> dict:
    """Final-epoch train loss / accuracy and test accuracy of one reference training log."""
    train = test = None
    with open(log_path) as fh:
        for line in fh:
            if "train loss:" in line:
                train = line.split()
            elif "test  loss:" in line or "test loss:" in line:
                test = line.split()
    if train is None or test is None:
        raise ValueError(f"{log_path}: no 'train loss' / 'test loss' lines")
    return {"train_loss": float(train[train.index("loss:") + 1]),
            "train_acc": float(train[train.index("accuracy:") + 1]),
            "test_acc": float(test[test.index("accuracy:") + 1])}


def reference_archive_table(repo: str, out: str) -> dict:
    """Kendall taus of the reference's OWN archived runs (a checkout of ``ibayashi-hikaru/minimum-sharpness``):
    minimum sharpness at the last epoch (``ARCHIVEs/proposal/last-epoch/<model>/<trial>/sharpness.pkl``) and the
    final training loss (``ARCHIVEs/train/<model>/<trial>/<r>/log.txt``), each against the gap (train - test
    accuracy at the last epoch), and with each other. Runs that never trained (final loss > 1) are reported apart.
    Writes ``reference_archive.{md,json}`` in ``out``."""
    base = os.path.join(repo, "02-sharpness-comparison", "ARCHIVEs")
    result, lines = {}, ["# The reference's archived runs: what their minimum sharpness orders", "",
                         f"Read from `{os.path.basename(os.path.abspath(repo))}/02-sharpness-comparison/ARCHIVEs` "
                         "(60,000 MNIST images per run, last epoch; 10 trials x 11 ratios). Gap = train accuracy - "
                         "test accuracy at the last epoch.", "",
                         "| network | runs | tau(MS, gap) | tau(final train loss, gap) | tau(MS, final train loss) | "
                         "runs that never trained | tau(MS, gap), all runs |", "|---|---|---|---|---|---|---|"]
    for model, mdir in REFERENCE_MODEL_DIRS.items():
        rows = []
        trials = sorted(int(t) for t in os.listdir(os.path.join(base, "train", mdir)) if t.isdigit())
        for t in trials:
            with open(os.path.join(base, "proposal", "last-epoch", mdir, str(t), "sharpness.pkl"), "rb") as fh:
                ms = _pickled_floats(fh.read())
            for rdir in sorted(os.listdir(os.path.join(base, "train", mdir, str(t)))):
                last = _last_epoch(os.path.join(base, "train", mdir, str(t), rdir, "log.txt"))
                rows.append({"trial": t, "ratio": float(rdir), "ms": ms.get(rdir, float("nan")), **last,
                             "gap": last["train_acc"] - last["test_acc"]})
        ok = [r for r in rows if r["train_loss"] < 1.0]
        col = lambda rs, k: [r[k] for r in rs]  # noqa: E731
        res = {"runs": len(ok), "never_trained": len(rows) - len(ok),
               "tau_ms_gap": kendall_tau(col(ok, "ms"), col(ok, "gap"))["tau"],
               "tau_loss_gap": kendall_tau(col(ok, "train_loss"), col(ok, "gap"))["tau"],
               "tau_ms_loss": kendall_tau(col(ok, "ms"), col(ok, "train_loss"))["tau"],
               "tau_ms_gap_all_runs": kendall_tau(col(rows, "ms"), col(rows, "gap"))["tau"]}
        result[model] = res
        lines.append(f"| {REFERENCE_MODEL_LABELS[model]} | {res['runs']} | {res['tau_ms_gap']:.2f} | "
                     f"{res['tau_loss_gap']:.2f} | "
                     f"{res['tau_ms_loss']:.2f} | {res['never_trained']} | {res['tau_ms_gap_all_runs']:.2f} |")
    os.makedirs(out, exist_ok=True)
    write_text_atomic(os.path.join(out, "reference_archive.md"), "\n".join(lines) + "\n")
    write_json_atomic(os.path.join(out, "reference_archive.json"), result)
    return result


def write_protocol_comparison(ours_dir: str, ref_dir: str, path: str) -> str:
    """One table of both protocols from their ``kendall_tau.json`` files (and ``reference_archive.json``, when
    present beside ``path``): tau of each measure with the gap, and the confound check (tau with the final loss)."""
    def load(p):
        try:
            with open(os.path.join(p, "kendall_tau.json")) as fh:
                return json.load(fh)["ours"]
        except (OSError, ValueError, KeyError):
            return {}

    ours, ref = load(ours_dir), load(ref_dir)
    archive = {}
    try:
        with open(os.path.join(os.path.dirname(path), "reference_archive.json")) as fh:
            archive = json.load(fh)
    except (OSError, ValueError):
        pass
    models = [m for m in ("ms_mlp", "lenet", "ms_lenet") if m in ours or m in ref]
    cell = lambda tab, m, meas: (  # noqa: E731
        f"{fmt(tab[m][meas]['tau'])} (n={tab[m][meas]['n']})" if m in tab and meas in tab[m] else "not run")
    conf = lambda tab, m, meas: (  # noqa: E731
        fmt(tab[m]["_tau_with_train_loss"].get(meas)) if m in tab else "not run")
    lines = ["# Kendall tau with the generalization gap: our protocol vs the reference's", "",
             f"Our protocol: `{ours_dir}/kendall_tau.md` (stop at the first check with train accuracy 1.0). Reference "
             f"protocol: `{ref_dir}/kendall_tau.md` (fixed budget far past 100 %, the reference's optimizer, weight "
             "decay and schedule, measured at the last step). Paper: SPEC 1.5 (the reference's archived runs, "
             "60,000 images).", ""]
    head = "| measure | " + " | ".join(f"{SHORT_LABELS.get(m, m)}: ours | {SHORT_LABELS.get(m, m)}: reference protocol"
                                      f" | {SHORT_LABELS.get(m, m)}: paper" for m in models) + " |"
    lines += [head, "|---" * (1 + 3 * len(models)) + "|"]
    for meas in MEASURES + ("train_loss",):
        row = []
        for m in models:
            paper = PAPER_TAU.get((meas, m))
            if meas == "train_loss" and m in archive:
                paper = archive[m]["tau_loss_gap"]
            row += [cell(ours, m, meas), cell(ref, m, meas), fmt(paper)]
        label = MEASURE_LABELS.get(meas) or DIAGNOSTICS[meas]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += ["", "Confound check: Kendall tau of each measure with the final training loss.", "",
              head, "|---" * (1 + 3 * len(models)) + "|"]
    for meas in MEASURES:
        row = []
        for m in models:
            paper = archive[m]["tau_ms_loss"] if (meas == "minimum_sharpness" and m in archive) else None
            row += [conf(ours, m, meas), conf(ref, m, meas), fmt(paper)]
        lines.append(f"| {MEASURE_LABELS[meas]} | " + " | ".join(row) + " |")
    if archive:
        lines += ["", "Paper column of the final-loss rows: computed from the reference's archived runs "
                  "(`reference_archive.md`)."]
    text = "\n".join(lines) + "\n"
    write_text_atomic(path, text)
    return text

