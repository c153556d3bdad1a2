"""Aggregating compare cells over seeds and writing the tables (markdown, compact terminal table, CSV, JSON).
"""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Mapping, Sequence

import numpy as np

from lcnn_jax.compare.methods import several_models

__all__ = ["finite", "aggregate", "best_methods", "is_accuracy", "format_markdown", "COMPACT_PRIORITY",
           "compact_priority", "format_compact", "json_safe", "write_results"]



# ----------------------------------------------------------------------------------------------------------
# Aggregation and output


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def aggregate(cells: Sequence[dict], names: Sequence[str], methods: Sequence[str]) -> dict:
    """``method -> column -> {"mean", "std", "n"}``: mean and sample std (ddof=1; 0 for one value) over the
    cells of that method that did not diverge and have a finite value (mean/std NaN when there is none)."""
    out = {}
    for method in methods:
        rows = [c for c in cells if c["method"] == method and not c.get("diverged")]
        out[method] = {}
        for name in names:
            vals = np.array([c[name] for c in rows if finite(c.get(name))], np.float64)
            out[method][name] = {"mean": float(vals.mean()) if vals.size else math.nan,
                                 "std": float(vals.std(ddof=1)) if vals.size > 1 else (0.0 if vals.size else math.nan),
                                 "n": int(vals.size)}
    return out


def best_methods(agg: dict, cols: Sequence[dict]) -> dict:
    """``column -> [methods]`` whose mean is the best (max for ``higher``, min for ``lower``; ties all kept);
    unranked columns and columns without finite means are left out."""
    best = {}
    for col in cols:
        if col["direction"] is None:
            continue
        means = {m: agg[m][col["name"]]["mean"] for m in agg if finite(agg[m][col["name"]]["mean"])}
        if not means:
            continue
        target = max(means.values()) if col["direction"] == "higher" else min(means.values())
        best[col["name"]] = [m for m, v in means.items() if v == target]
    return best


def is_accuracy(name: str) -> bool:
    return (name.endswith("accuracy") and name != "gradient_stability"
            or name.startswith(("pgd_", "apgd_", "noise_", "certified_l2_")))


def _cell_text(name: str, st: dict) -> str:
    mean, std = st["mean"], st["std"]
    if not finite(mean):
        return "n/a"
    if is_accuracy(name):
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:.4g} ± {std:.2g}"


def format_markdown(agg: dict, cols: Sequence[dict], best: dict, *, title: str = "", notes: Sequence[str] = (),
                    models: Mapping[str, str] | None = None) -> str:
    """The results table: one row per method, ``mean ± std`` per column (accuracies in %), the best entry
    per ranked column in bold; the header marks the direction (↑ higher is better, ↓ lower is better). With
    ``models`` (``method -> model``, :func:`method_models`) naming more than one model, a ``model`` column follows
    the method."""
    arrow = {"higher": " ↑", "lower": " ↓", None: ""}
    lines = [f"### {title}", ""] if title else []
    lines += list(notes) + ([""] if notes else [])
    show = several_models(models)
    lines.append("| method | " + ("model | " if show else "") + " | ".join(c["label"] + arrow[c["direction"]]
                                                                        for c in cols) + " |")
    lines.append("|---|" + ("---|" if show else "") + "---|" * len(cols))
    for method in agg:
        cells = [models.get(method, "")] if show else []
        for c in cols:
            text = _cell_text(c["name"], agg[method][c["name"]])
            cells.append(f"**{text}**" if method in best.get(c["name"], ()) else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Which columns a terminal shows first when they do not all fit (see lcnn_jax.tables.priority_order): accuracy,
# one robust accuracy, input smoothness, then the other robustness columns, sharpness and cost.
COMPACT_PRIORITY = ("test_accuracy", ("apgd_l2_*", "pgd_l2_*", "apgd_linf_*", "pgd_linf_*"), "curvature",
                    "jacobian_frobenius", "apgd_*", "pgd_*", "certified_l2_*", "noise_*", "local_lipschitz",
                    "hessian_trace", "minimum_sharpness", "train_time_s")


def compact_priority(cols: Sequence[dict]) -> list[int]:
    """Column indices (of ``cols``) in :data:`COMPACT_PRIORITY` order, then the others in table order."""
    from lcnn_jax.tables import priority_order

    return priority_order([c["name"] for c in cols], COMPACT_PRIORITY)


def format_compact(agg: dict, cols: Sequence[dict], best: dict, *, width: int = 120,
                   models: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """The results table for a terminal: one row per method, ``mean ± std`` (accuracies in %), ``*`` after the best
    mean of a ranked column, limited to the columns that fit ``width`` characters (chosen by
    :func:`compact_priority`); returns the text and the labels of the columns left out (they are in
    ``results.md`` / ``results.csv`` / ``results.json``). A ``model`` column follows the method where ``models``
    names more than one model (as in :func:`format_markdown`)."""
    from lcnn_jax.tables import format_table

    arrow = {"higher": "↑", "lower": "↓", None: ""}
    lead = ["method", "model"] if several_models(models) else ["method"]
    header = lead + [f"{c['label']}{' %' if is_accuracy(c['name']) else ''} {arrow[c['direction']]}".strip()
                     for c in cols]
    rows = []
    for method in agg:
        row = [method] + ([models.get(method, "")] if len(lead) > 1 else [])
        for c in cols:
            text = _cell_text(c["name"], agg[method][c["name"]])
            row.append(text + ("*" if method in best.get(c["name"], ()) else " "))
        rows.append(row)
    k = len(lead)
    priority = list(range(k)) + [i + k for i in compact_priority(cols)]
    text, hidden = format_table(header, rows, fixed=k, priority=priority, width=width)
    return text, [cols[i - k]["label"] for i in hidden]


def json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if (isinstance(v, float) and not math.isfinite(v)) else v for v in r])
    return buf.getvalue()


def write_results(workdir: str, cells: Sequence[dict], cols: Sequence[dict], methods: Sequence[str], *,
                  meta: dict) -> dict:
    """Write ``results.csv``, ``results_summary.csv``, ``results.json`` and ``results.md`` (atomically) and
    return the JSON object."""
    from lcnn_jax.io import write_json_atomic, write_text_atomic

    names = [c["name"] for c in cols]
    agg = aggregate(cells, names, methods)
    best = best_methods(agg, cols)
    write_text_atomic(os.path.join(workdir, "results.csv"), _csv_text(
        ["method", "seed", "member", "diverged"] + names,
        [[c["method"], c["seed"], c.get("member", ""), int(bool(c.get("diverged")))]
         + [c.get(n, math.nan) for n in names]
         for c in cells]))
    write_text_atomic(os.path.join(workdir, "results_summary.csv"), _csv_text(
        ["method", "num_seeds"] + [f"{n}_{s}" for n in names for s in ("mean", "std")],
        [[m, sum(1 for c in cells if c["method"] == m and not c.get("diverged"))]
         + [agg[m][n][s] for n in names for s in ("mean", "std")] for m in methods]))
    obj = {"columns": list(cols), "methods": list(methods), "cells": list(cells), "aggregate": agg, "best": best,
           **meta}
    write_json_atomic(os.path.join(workdir, "results.json"), json_safe(obj))
    notes = meta.get("notes", ())
    write_text_atomic(os.path.join(workdir, "results.md"),
                       format_markdown(agg, cols, best, title=meta.get("title", ""), notes=notes,
                                       models=meta.get("models")))
    return obj
