"""The skeleton the table scripts share (``lcnn_table.py``, ``clip_table.py``, ``smalldata_study.py``).

A table is rows x seeds. Each row trains its seeds as one program (:func:`lcnn_jax.train.train_seeds`), evaluates
every seed with the script's own protocol, aggregates each column over seeds as mean and sample std, and is saved
as one JSON file; a row whose file holds the same settings is read back instead of recomputed (the library's one
"skip if done" rule, :func:`lcnn_jax.io.load_if_matches`), so a script resumes where it stopped. The table is
then written as ``<stem>.json`` / ``<stem>.csv`` / ``<stem>.md``. A script is its configuration (rows, settings,
columns) plus its evaluation and markdown::

    from experiments import table_runner as runner

    def compute():
        res = runner.train_and_evaluate(sweep.train_seeds, config, workdir, seeds,
                                        lambda model, state, seed: {"acc": accuracy(model, state)})
        return {**res, "row": row, "aggregate": runner.aggregate(res["per_seed"], ("acc",))}

    result = runner.cached_row(path, settings, compute, tag="my_table", name=row)
    runner.write_table(out_dir, "table", obj={"rows": [result["aggregate"]]}, columns=COLUMNS,
                       rows=[result["aggregate"]], markdown=markdown(result))
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from lcnn_jax import io

__all__ = ["cached_row", "train_and_evaluate", "aggregate", "mean_difference", "write_table", "device_description"]


def cached_row(path: str, settings: Mapping, compute: Callable[[], dict], *, force: bool = False,
               ignore: Sequence[str] = (), tag: str = "table", name: str = "") -> dict:
    """The saved result at ``path`` when it was made with ``settings`` (:func:`lcnn_jax.io.load_if_matches`; keys
    in ``ignore`` not compared), else ``compute()`` saved there with ``"settings": settings`` added (atomically).
    ``force`` recomputes whatever is saved."""
    saved = None if force else io.load_if_matches(path, dict(settings), ignore=ignore)
    if saved is not None:
        print(f"[{tag}] {name}: results exist ({path}), skipped", flush=True)
        return saved
    result = {**compute(), "settings": dict(settings)}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    io.write_json_atomic(path, result)
    return result


def train_and_evaluate(trainer: Callable, config, workdir: str, seeds: Sequence[int],
                       evaluate: Callable[[object, object, int], dict]) -> dict:
    """Train ``seeds`` of ``config`` in ``workdir`` and evaluate every seed.

    ``trainer(config, workdir, seeds) -> (model, states, trained_with, note, wall_s)`` (e.g.
    :func:`lcnn_jax.train.train_seeds`); ``evaluate(model, state, seed) -> {column: value}``, called once per seed
    in order. Returns ``{"per_seed": [... + {"seed"}], "trained_with", "note", "train_wall_s", "eval_wall_s",
    "workdir"}``."""
    model, states, trained_with, note, train_s = trainer(config, workdir, seeds)
    t0 = time.time()
    per_seed = []
    for s, state in zip(seeds, states):
        res = evaluate(model, state, int(s))
        res["seed"] = int(s)
        per_seed.append(res)
    return {"per_seed": per_seed, "trained_with": trained_with, "note": note, "train_wall_s": train_s,
            "eval_wall_s": time.time() - t0, "workdir": workdir}


def aggregate(per_seed: Sequence[Mapping], metrics: Iterable[str]) -> dict:
    """``{<metric>_mean, <metric>_std}`` over seeds for every metric (:func:`lcnn_jax.io.mean_std`: sample std,
    values that are None left out, None where no seed has one)."""
    out = {}
    for m in metrics:
        out[f"{m}_mean"], out[f"{m}_std"] = io.mean_std([s.get(m) for s in per_seed])
    return out


def mean_difference(base: Sequence[float], other: Sequence[float]) -> tuple[float, float, str]:
    """``(diff, se, move)`` of two sets of per-seed values: ``diff = mean(other) - mean(base)``, ``se`` the standard
    error of that difference, ``sqrt(var(base) / n_base + var(other) / n_other)`` (sample variances; a set of one
    value adds 0), and ``move`` the studies' significance rule: ``"up"`` when ``diff > 2 se``, ``"down"`` when
    ``diff < -2 se``, else ``"none"``."""
    a, b = np.asarray(base, np.float64), np.asarray(other, np.float64)
    diff = float(b.mean() - a.mean())
    se = float(np.sqrt((a.var(ddof=1) / len(a) if len(a) > 1 else 0.0)
                       + (b.var(ddof=1) / len(b) if len(b) > 1 else 0.0)))
    return diff, se, "up" if diff > 2 * se else ("down" if -diff > 2 * se else "none")


def write_table(out_dir: str, stem: str, *, obj, columns: Sequence[str], rows: Iterable[Mapping],
                markdown: str) -> dict:
    """``<stem>.json`` (``obj``), ``<stem>.csv`` (``rows`` under the header ``columns``; a missing or None value is
    an empty cell, keys outside the header are left out) and ``<stem>.md`` (``markdown``) in ``out_dir``, each
    written atomically; returns ``{"json", "csv", "md"}`` paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{stem}.{k}") for k in ("json", "csv", "md")}
    io.write_json_atomic(paths["json"], obj)
    io.write_csv_atomic(paths["csv"], columns, rows, extrasaction="ignore")
    io.write_text_atomic(paths["md"], markdown)
    return paths


def device_description() -> str:
    """``"<count> x <device kind> (<platform>)"`` of the devices the tables were computed on."""
    d = jax.devices()[0]
    return f"{jax.device_count()} x {d.device_kind} ({d.platform})"
