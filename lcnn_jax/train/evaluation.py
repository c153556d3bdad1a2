"""Evaluation over a whole split in fixed-shape padded batches, and the *dead network* check.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcnn_jax.train.distributed import place_global, to_host
from lcnn_jax.train.state import TrainState

__all__ = ["evaluation_totals", "evaluate", "DEAD_SPREAD_RTOL", "DEAD_COLLAPSE", "dead_network",
           "dead_network_report"]


def evaluation_totals(eval_batch: Callable[[dict], dict], images: np.ndarray, labels: np.ndarray, *,
                      batch_size: int) -> dict:
    """Sum ``eval_batch(batch)`` (``{"loss_sum", "correct", "count", ...}``: every key it returns) over a whole
    split in batches of ``batch_size``; the last batch is padded to that size and masked (``batch["mask"]``), so
    one compiled shape serves every batch. Returns float64 NumPy totals of whatever shape ``eval_batch`` returns
    (scalars for one model, ``(K,)`` for a vmapped sweep of K members)."""
    totals: dict = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        pad = batch_size - len(x)
        mask = np.concatenate([np.ones(len(x), np.float32), np.zeros(pad, np.float32)])
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
        out = to_host(eval_batch({"image": x, "label": y, "mask": mask}))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
    return totals


def evaluate(state: TrainState, eval_step, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
             mesh: Mesh) -> dict:
    """Accuracy and mean cross-entropy over a whole split; the last batch is padded and masked."""
    n_dev = mesh.devices.size
    batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
    sharding = NamedSharding(mesh, P("data"))
    totals = evaluation_totals(lambda b: eval_step(state, place_global(b, sharding)), images, labels,
                               batch_size=batch_size)
    n = max(float(totals["count"]), 1.0)
    return {"accuracy": float(totals["correct"]) / n, "loss": float(totals["loss_sum"]) / n,
            "count": int(totals["count"]), "logit_spread": float(totals.get("logit_spread", math.nan)),
            "logit_scale": float(totals.get("logit_scale", math.nan)),
            "pred_counts": np.asarray(totals.get("pred_counts", []), np.float64).tolist()}


DEAD_SPREAD_RTOL = 1e-5  # ~100 float32 ulps: a live network's logits differ between inputs by O(1)
DEAD_COLLAPSE = 0.99  # share of the images predicted as one class beyond which a classifier has collapsed


def dead_network(logit_spread: float, logit_scale: float, pred_counts=None) -> bool:
    """True when a trained classifier is *dead*: its logits are the same for every evaluated input within float32
    rounding (``logit_spread <= 1e-5 * max(logit_scale, 1)``), or it predicts one class for at least 99 % of them
    (``max(pred_counts) >= 0.99 * sum(pred_counts)``); all three are totals from :func:`evaluation_totals`.

    Typical cause: a learning rate so large that every ReLU ends up off for (nearly) every input. Such a network
    has the accuracy of one constant guess and input gradients of exactly 0 wherever its output is constant, so
    every smoothness measure reports a perfectly "smooth" function. Its loss is finite, so the divergence check
    misses it."""
    if math.isfinite(logit_spread) and math.isfinite(logit_scale) and \
            logit_spread <= DEAD_SPREAD_RTOL * max(logit_scale, 1.0):
        return True
    counts = np.asarray(pred_counts if pred_counts is not None else [], np.float64)
    return bool(counts.sum() > 0 and counts.max() >= DEAD_COLLAPSE * counts.sum())


def dead_network_report(logit_spread: float, logit_scale: float, pred_counts, *, train_accuracy: float,
                        num_classes: int, learning_rate: float | None = None) -> dict:
    """``{"dead": bool, "logit_spread": float}`` for the final evaluation on the training set, plus, for a dead
    network (:func:`dead_network`), ``"dead_reason"`` (what was seen, one clause) and ``"warning"``: one paragraph
    for the log and ``results.json`` saying what was seen, why the smoothness measures of this network mislead,
    and what to change."""
    dead = dead_network(logit_spread, logit_scale, pred_counts)
    out = {"dead": bool(dead), "logit_spread": float(logit_spread)}
    if dead:
        counts = np.asarray(pred_counts, np.float64)
        if logit_spread <= DEAD_SPREAD_RTOL * max(logit_scale, 1.0):
            seen = f"gives the same output for every training image (logit spread {logit_spread:.3g})"
        else:
            seen = (f"predicts class {int(counts.argmax())} for {100 * counts.max() / counts.sum():.1f} % of the "
                    f"training images")
        lr = f" (it was {learning_rate:g})" if learning_rate is not None else ""
        out["dead_reason"] = f"the model {seen}"
        out["warning"] = (
            f"dead network: the trained model {seen}, so its training accuracy {train_accuracy:.3f} is that of one "
            f"constant guess (chance is {1.0 / num_classes:.3f}). The loss did not become NaN, but training failed: "
            f"its input gradients are 0 wherever the output is constant, so Jacobian, curvature and Lipschitz "
            f"values near 0 describe a constant function, not a smooth one. Lower optim.learning_rate{lr} or set "
            f"optim.clip_grad_norm, and train again in a new --workdir.")
    return out
