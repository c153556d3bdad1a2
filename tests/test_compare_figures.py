"""The figures of `lcnn-jax compare`: title, axis labels, plain log ticks, no hidden marker, legend outside."""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from lcnn_jax import compare  # noqa: E402
from lcnn_jax.compare import figures as compare_figures  # noqa: E402  (its private helpers are tested here)

COLS = [{"name": n, "label": n, "direction": None} for n in
        ("test_accuracy", "pgd_l2_1", "pgd_linf_0.1", "noise_0.5", "curvature", "jacobian_frobenius")]


def _stat(mean, std=0.1):
    return {"mean": mean, "std": std, "n": 2}


def _agg():
    """Three methods at exactly the same point, two elsewhere, one with no finite value."""
    same = {"test_accuracy": _stat(0.95, 0.01), "pgd_l2_1": _stat(0.7, 0.02), "curvature": _stat(3.0),
            "jacobian_frobenius": _stat(9.0)}
    return {
        "standard": dict(same), "weight_decay": dict(same), "datagrad": dict(same),
        "lcnn": {"test_accuracy": _stat(0.93), "pgd_l2_1": _stat(0.8), "curvature": _stat(1.4),
                 "jacobian_frobenius": _stat(4.0)},
        "clip": {"test_accuracy": _stat(0.91), "pgd_l2_1": _stat(0.75), "curvature": _stat(1.6),
                 "jacobian_frobenius": _stat(3.5)},
        "broken": {"test_accuracy": _stat(float("nan")), "pgd_l2_1": _stat(float("nan")),
                   "curvature": _stat(float("nan")), "jacobian_frobenius": _stat(float("nan"))},
    }


def test_axis_labels_are_readable():
    assert compare.axis_label("pgd_l2_1", COLS) == "PGD-L2 ε=1 accuracy (%)"
    assert compare.axis_label("pgd_linf_0.1", COLS) == "PGD-L∞ ε=0.1 accuracy (%)"
    assert compare.axis_label("noise_0.5", COLS) == "Gaussian-noise σ=0.5 accuracy (%)"
    assert compare.axis_label("test_accuracy", COLS) == "test accuracy (%)"


@pytest.mark.parametrize("lo,hi", [(1.3, 5.0), (3.2, 11.0), (0.02, 40.0), (2.0, 2.6), (1e-3, 1e4), (2.01, 2.04)])
def test_log_ticks_are_plain_numbers_inside_the_range(lo, hi):
    ticks = compare_figures._plain_log_ticks(lo, hi)
    assert 2 <= len(ticks) <= 8 and all(lo <= t <= hi for t in ticks)
    assert all("e" not in compare_figures._format_tick(t) for t in ticks if 1e-4 <= t < 1e6)


def test_figure_has_title_labels_plain_ticks_visible_markers_and_outside_legend():
    fig = compare.scatter_figure(_agg(), COLS, "jacobian_frobenius", "pgd_l2_1", title="runs/x: robustness",
                                 subtitle="mnist5k, small_cnn")
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        assert fig._suptitle.get_text() == "runs/x: robustness"
        assert ax.get_ylabel() == "PGD-L2 ε=1 accuracy (%)"
        assert ax.get_xlabel().startswith("input-Jacobian norm")
        ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert ticks and all(("$" not in t and "^" not in t and "times" not in t) for t in ticks), ticks
        assert not [t for t in ax.xaxis.get_minorticklabels() if t.get_text()]

        # Every plotted method (not the one without finite values) has a label, and no two labels overlap.
        renderer = fig.canvas.get_renderer()
        # Text.get_window_extent: the label itself, without its leader line.
        notes = {t.get_text(): Text.get_window_extent(t, renderer) for t in ax.texts}
        assert set(notes) == {"standard", "weight_decay", "datagrad", "lcnn", "clip"}
        boxes = list(notes.values())
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not boxes[i].overlaps(boxes[j]), (list(notes)[i], list(notes)[j])
        # The three coinciding markers differ in shape and size, so each outline stays visible.
        markers = [line for line in ax.lines if line.get_marker() not in ("None", None, "", "|", "_")
                   and line.get_xdata().size == 1]
        same = [m for m in markers if m.get_xdata()[0] == 9.0]
        assert len(same) == 3
        assert len({m.get_marker() for m in same}) == 3 and len({m.get_markersize() for m in same}) == 3
        # The legend is outside the axes.
        legend_box = ax.get_legend().get_window_extent(renderer)
        assert not legend_box.overlaps(ax.get_window_extent(renderer))
    finally:
        plt.close(fig)


def test_plot_results_names_the_run_from_its_directory_and_results(tmp_path):
    workdir = tmp_path / "compare_two"
    workdir.mkdir()
    (workdir / "results.json").write_text(json.dumps({"title": "lcnn-jax compare: mnist5k, small_cnn, 2 seed(s)"}))
    paths = compare.plot_results(str(workdir), _agg(), COLS, robust_column="pgd_l2_1")
    assert [os.path.basename(p) for p in paths] == ["accuracy_vs_curvature.png", "robustness_vs_jacobian.png"]
    assert all(os.path.getsize(p) > 10_000 for p in paths)
    assert compare_figures._run_title(str(workdir)) == ("compare_two", "mnist5k, small_cnn, 2 seed(s)")
