"""The compare figures: labelled scatter plots of one column against another, one point per method.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence


from lcnn_jax.compare.methods import several_models
from lcnn_jax.compare.tables import finite, is_accuracy

__all__ = ["axis_label", "scatter_figure", "plot_results"]



_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")


def axis_label(name: str, cols: Sequence[dict]) -> str:
    """A readable axis label of a metric column: ``pgd_l2_1`` -> ``"PGD-L2 ε=1 accuracy (%)"``,
    ``curvature`` -> ``"input curvature |λ| / (‖g‖ + 1e-6), test mean"``; other columns keep their table label."""
    for prefix, text in (("pgd_linf_", "PGD-L∞ ε={} accuracy (%)"), ("pgd_l2_", "PGD-L2 ε={} accuracy (%)"),
                         ("apgd_linf_", "APGD-L∞ ε={} accuracy (%)"), ("apgd_l2_", "APGD-L2 ε={} accuracy (%)"),
                         ("certified_l2_", "certified L2 ε={} accuracy (%)"),
                         ("noise_", "Gaussian-noise σ={} accuracy (%)")):
        if name.startswith(prefix):
            return text.format(name[len(prefix):])
    fixed = {"test_accuracy": "test accuracy (%)", "train_accuracy": "training accuracy (%)",
             "clean_accuracy": "clean accuracy, measured test subset (%)",
             "curvature": "input curvature |λ| / (‖g‖ + 1e-6), test mean",
             "jacobian_frobenius": "input-Jacobian norm ‖J‖_F, test mean",
             "hessian_norm": "input-Hessian norm |λ|, test mean", "grad_norm": "loss-gradient norm ‖g‖, test mean",
             "local_lipschitz": "local Lipschitz estimate, test mean",
             "gradient_stability": "gradient stability (cosine), test mean"}
    if name in fixed:
        return fixed[name]
    return next((c["label"] for c in cols if c["name"] == name), name)


def _plain_log_ticks(lo: float, hi: float) -> list[float]:
    """Tick positions for a log axis on [lo, hi], to be written as plain numbers: 1-2-5 per decade, or finer
    multiples when the range is narrow, or powers of ten when it is wide; 3 to 8 ticks where possible."""
    from matplotlib import ticker

    e0, e1 = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    best: list = []
    for mults in ((1, 2, 5), (1, 2, 3, 5), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9), (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7,
                                                                8, 9), (1,)):
        ticks = [m * 10.0 ** e for e in range(e0, e1 + 1) for m in mults if lo <= m * 10.0 ** e <= hi]
        if 3 <= len(ticks) <= 8:
            return ticks
        if len(best) < len(ticks) <= 8:
            best = ticks
    if len(best) >= 2:
        return best
    if hi / lo < 10:  # narrower than the multiples above: evenly spaced round numbers
        return [float(t) for t in ticker.MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
                if lo <= t <= hi]
    ticks = [10.0 ** e for e in range(e0, e1 + 1) if lo <= 10.0 ** e <= hi]
    while len(ticks) > 8:
        ticks = ticks[::2]
    return ticks


def _format_tick(v: float) -> str:
    return f"{v:.6g}" if 1e-4 <= abs(v) < 1e6 else f"{v:.0e}"


def _overlaps(a, b) -> bool:
    return not (a[2] < b[0] or a[0] > b[2] or a[3] < b[1] or a[1] > b[3])


def _place_labels(fig, ax, points: Sequence[dict], fontsize: float) -> list:
    """Label every point with its method name beside it: the nearest position (right or left, then moved up or
    down, with a leader line) whose box overlaps no other label, no marker and no error bar. ``points`` hold
    ``name, x, y, color`` (data coordinates), ``size`` (marker size, points) and ``xerr``/``yerr``."""
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    to_px = ax.transData.transform
    axes_box = ax.get_window_extent(renderer)
    obstacles = []
    for p in points:
        px, py = to_px((p["x"], p["y"]))
        r = 0.5 * p["size"] * px_per_pt + 2
        obstacles.append((px - r, py - r, px + r, py + r))
        if p["xerr"]:
            (x0, _), (x1, _) = to_px((max(p["x"] - p["xerr"], 1e-300), p["y"])), to_px((p["x"] + p["xerr"], p["y"]))
            obstacles.append((x0, py - 2, x1, py + 2))
        if p["yerr"]:
            (_, y0), (_, y1) = to_px((p["x"], p["y"] - p["yerr"])), to_px((p["x"], p["y"] + p["yerr"]))
            obstacles.append((px - 2, y0, px + 2, y1))
    placed, texts = [], []
    for p in sorted(points, key=lambda q: -to_px((q["x"], q["y"]))[1]):  # top to bottom: clusters stack in order
        px, py = to_px((p["x"], p["y"]))
        probe = ax.text(0, 0, p["name"], fontsize=fontsize)
        w, h = probe.get_window_extent(renderer).width + 4, probe.get_window_extent(renderer).height + 2
        probe.remove()
        gap = 0.5 * p["size"] * px_per_pt + 4
        # Candidates nearest first: right, left, above, below the marker, then right/left moved up or down.
        cands = [(px + gap, py, "left"), (px - gap, py, "right"), (px, py + gap + h / 2, "center"),
                 (px, py - gap - h / 2, "center")]
        cands += [(px + side * gap, py + sign * k * h, "left" if side == 1 else "right")
                  for k in range(1, 16) for sign in (1, -1) for side in (1, -1)]
        best = None
        for ax_x, ax_y, ha in cands:
            left = {"left": ax_x, "right": ax_x - w, "center": ax_x - w / 2}[ha]
            box = (left, ax_y - h / 2, left + w, ax_y + h / 2)
            inside = (box[0] >= axes_box.x0 and box[2] <= axes_box.x1 and box[1] >= axes_box.y0
                      and box[3] <= axes_box.y1)
            if inside and not any(_overlaps(box, o) for o in placed + obstacles):
                best = (box, ax_x, ax_y, ha)
                break
        if best is None:  # no free place inside the axes: right of the point, possibly overlapping
            best = ((px + gap, py - h / 2, px + gap + w, py + h / 2), px + gap, py, "left")
        box, ax_x, ax_y, ha = best
        placed.append(box)
        near = abs(ax_y - py) <= gap + h / 2 + 1e-6
        texts.append(ax.annotate(
            p["name"], (p["x"], p["y"]), xytext=((ax_x - px) / px_per_pt, (ax_y - py) / px_per_pt),
            textcoords="offset points", fontsize=fontsize, color=p["color"], ha=ha, va="center", zorder=20,
            bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.85),
            arrowprops=None if near else dict(arrowstyle="-", color=p["color"], lw=0.6, shrinkA=0, shrinkB=2)))
    return texts


def scatter_figure(agg: Mapping, cols: Sequence[dict], xname: str, yname: str, *, title: str,
                   subtitle: str = "", models: Mapping[str, str] | None = None):
    """One point per method at (mean of ``xname``, mean of ``yname``) over seeds, seed standard deviations as
    error bars, log x axis with plain tick labels. Methods get distinct marker shapes and decreasing marker
    sizes (so coinciding points show as nested outlines) and a direct label placed clear of the other labels
    and markers; the legend sits outside the axes. Accuracies are plotted in %. Where ``models``
    (``method -> model``) names more than one model, each label says ``method (model)``. Returns the Matplotlib
    figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(8.0, 4.8), dpi=120)
    scale = 100.0 if is_accuracy(yname) else 1.0
    points = []
    n = len(agg)
    label = (lambda m: f"{m} ({models.get(m, '?')})") if several_models(models) else (lambda m: m)  # noqa: E731
    for i, method in enumerate(agg):
        x, y = agg[method][xname], agg[method][yname]
        if not (finite(x["mean"]) and finite(y["mean"]) and x["mean"] > 0):
            continue
        color = f"C{i % 10}"
        # Drawn in order, each smaller than the one before: coinciding points show as nested outlines.
        size = 12.0 - 6.0 * i / max(n - 1, 1)
        xerr = float(x["std"]) if finite(x["std"]) else 0.0
        yerr = scale * float(y["std"]) if finite(y["std"]) else 0.0
        ax.errorbar(x["mean"], scale * y["mean"], xerr=xerr or None, yerr=yerr or None,
                    fmt=_MARKERS[i % len(_MARKERS)], markersize=size, markerfacecolor="none", markeredgewidth=1.5,
                    color=color, ecolor=color, elinewidth=0.9, alpha=0.9, capsize=2.5, label=label(method),
                    zorder=2 + i)
        points.append({"name": label(method), "x": x["mean"], "y": scale * y["mean"], "color": color, "size": size,
                       "xerr": xerr, "yerr": yerr})
    ax.set_xscale("log")
    ax.set_xlabel(f"{axis_label(xname, cols)} (log scale; lower is smoother)")
    ax.set_ylabel(axis_label(yname, cols))
    ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    if subtitle:
        ax.set_title(subtitle, fontsize=8, color="0.3")
    if points:
        ax.margins(x=0.15, y=0.12)
        ax.autoscale_view()
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(ticker.FixedLocator(_plain_log_ticks(lo, hi)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _format_tick(v)))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, title="method",
                  title_fontsize=8, frameon=False)
        fig.tight_layout()
        fig.canvas.draw()
        _place_labels(fig, ax, points, fontsize=7.5)
    else:
        ax.text(0.5, 0.5, "no finite values to plot", transform=ax.transAxes, ha="center", va="center")
        fig.tight_layout()
    return fig


def _run_title(workdir: str) -> tuple[str, str]:
    """The run's name (its directory) and, when ``results.json`` is there, the run's description line."""
    name = os.path.basename(os.path.abspath(workdir)) or workdir
    try:
        with open(os.path.join(workdir, "results.json")) as fh:
            desc = str(json.load(fh).get("title", ""))
    except (OSError, ValueError):
        desc = ""
    return name, desc.removeprefix("lcnn-jax compare: ")


def plot_results(workdir: str, agg: dict, cols: Sequence[dict], *, robust_column: str,
                 title: str | None = None, models: Mapping[str, str] | None = None) -> list[str]:
    """``figures/accuracy_vs_curvature.png`` (test accuracy against input curvature) and
    ``figures/robustness_vs_jacobian.png`` (``robust_column`` against the Jacobian Frobenius norm), drawn by
    :func:`scatter_figure`; the title names the run (``title``, else the workdir's name) and the subtitle
    describes it (dataset, model(s), seeds, epochs, from ``results.json``); ``models`` as in
    :func:`scatter_figure`. Returns the paths written."""
    from lcnn_jax.io import save_figure_atomic

    names = {c["name"] for c in cols}
    if robust_column not in names:
        robust_column = next((c["name"] for prefix in ("apgd_", "pgd_") for c in cols if c["name"].startswith(prefix)),
                             "clean_accuracy")
    run, desc = _run_title(workdir)
    run = title or run
    os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
    paths = []
    for fname, xname, yname, what in (
            ("accuracy_vs_curvature.png", "curvature", "test_accuracy", "test accuracy vs input curvature"),
            ("robustness_vs_jacobian.png", "jacobian_frobenius", robust_column,
             f"{axis_label(robust_column, cols).removesuffix(' (%)')} vs Jacobian norm")):
        fig = scatter_figure(agg, cols, xname, yname, title=f"{run}: {what}", subtitle=desc, models=models)
        paths.append(save_figure_atomic(fig, os.path.join(workdir, "figures", fname), bbox_inches="tight"))
    return paths
