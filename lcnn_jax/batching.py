"""Applying a jitted per-example computation to a dataset in fixed-size chunks.

Evaluation code (attacks, measures, tables) runs one jitted function over thousands of examples. Feeding it
chunks of one fixed size keeps it to a single compilation: the last, short chunk is padded by repeating its first
row and the padding rows are dropped from the result. Chunk ``c`` gets the key ``fold_in(key, c)``, so results
depend on the chunk size but not on anything else.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

__all__ = ["map_chunks", "pad_rows"]


def pad_rows(a, size: int):
    """``a`` with its leading axis padded to ``size`` by repeating its first row (``a`` itself when full)."""
    short = size - a.shape[0]
    return a if short == 0 else np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[:1], short, axis=0)])


def map_chunks(fn: Callable, xs, ys, *, key, chunk_size: int):
    """Concatenation over chunks of ``fn(x, y, key_c)``, which returns one per-example array ``(B, ...)`` or a
    dict of them, for ``x = xs[start:start + B]`` (``B = min(chunk_size, len(xs))``, the last chunk padded) and
    ``key_c = fold_in(key, c)``. Returns numpy arrays (a dict when ``fn`` returns one) with ``len(xs)`` rows.

    Cost: ``ceil(len(xs) / B)`` calls of ``fn`` on ``B`` rows each (at most ``B - 1`` padding rows computed and
    dropped) and one host transfer per chunk; one compilation when ``fn`` is jitted.

    Raises:
      ValueError: ``chunk_size`` is not a positive integer, or ``xs`` and ``ys`` differ in length.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    n = len(xs)
    if len(ys) != n:
        raise ValueError(f"xs and ys must have the same number of rows, got {n} and {len(ys)}.")
    size = min(int(chunk_size), n)
    parts: dict = {}
    single = False
    for c, start in enumerate(range(0, n, size)):
        x, y = xs[start:start + size], ys[start:start + size]
        real = len(x)
        res = fn(pad_rows(x, size), pad_rows(y, size), jax.random.fold_in(key, c))
        if not isinstance(res, dict):
            single, res = True, {"": res}
        for k, v in res.items():
            parts.setdefault(k, []).append(np.asarray(v)[:real])
    out = {k: np.concatenate(v) for k, v in parts.items()}
    return out[""] if single else out
