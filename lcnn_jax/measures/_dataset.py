"""A data set seen as fixed-size, masked chunks: the plumbing of the measures' data-set mode.

Every batch of the data is split into (or padded up to) chunks of one size ``c``, so that a jitted per-chunk
function compiles ONCE whatever the batch sizes are. Padding repeats the last real example (always a valid
input, so no NaN can appear) and the returned boolean mask marks the real examples; the per-chunk functions
weigh padded examples by 0. ``c`` is ``chunk_size`` when the data are arrays, else the size of the first batch
(capped by ``chunk_size`` when given).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.autodiff import check_positive_int

DATA_FORMS = ("a list (or any re-iterable) of batches, a zero-argument function returning a fresh iterator of "
              "batches, or arrays with chunk_size=")


def _is_array(a: Any) -> bool:
    return isinstance(a, (np.ndarray, jax.Array))


def _leading(batch: Any, name: str) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError(f"a batch of {name} holds no arrays; each batch must be a pytree of arrays with the "
                         "examples along the leading axis (e.g. (x, y) or {'image': x, 'label': y}).")
    sizes = {int(np.shape(a)[0]) if np.ndim(a) >= 1 else -1 for a in leaves}
    if len(sizes) != 1 or -1 in sizes:
        shapes = [tuple(np.shape(a)) for a in leaves]
        raise ValueError(f"the arrays of a batch of {name} must share their leading (example) axis; got shapes "
                         f"{shapes}.")
    return sizes.pop()


@functools.partial(jax.jit, static_argnums=2)
def _dynamic_chunk(a, start, size: int):
    return jax.lax.dynamic_slice_in_dim(a, start, size)


def _slice(a, start: int, size: int):
    """``a[start:start + size]``; for a device array one compiled program for every full chunk (a static slice
    at each offset would compile one program per offset)."""
    if isinstance(a, jax.Array) and start + size <= a.shape[0]:
        return _dynamic_chunk(a, start, size)
    return a[start:start + size]


def _pad(a, size: int):
    m = a.shape[0]
    if m == size:
        return a
    xp = jnp if isinstance(a, jax.Array) else np
    return xp.concatenate([a, xp.repeat(a[-1:], size - m, axis=0)], axis=0)


class Batches:
    """``data`` as a source of ``(chunk, mask)`` pairs of a fixed chunk size; see the module docstring.

    Args:
      data: arrays (a pytree of arrays with a common leading axis; needs ``chunk_size``), or an iterable of
        batches (each a pytree of arrays), or a zero-argument function returning such an iterable.
      chunk_size: examples per chunk (required for arrays; a cap for iterables).
      multi_pass: the measure passes over the data several times; a one-shot iterator is then refused.
      name: the argument's name, for error messages.
      select: applied to every batch before chunking (e.g. keep the inputs of an ``(x, y)`` batch).
    """

    def __init__(self, data: Any, chunk_size: int | None, *, multi_pass: bool, name: str = "data",
                 select: Callable[[Any], Any] | None = None):
        self.name = name
        self.chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True)
        self.select = select or (lambda b: b)
        self.size: int | None = None
        self.num_examples: int | None = None
        self._passes = 0
        if _is_array(data) or isinstance(data, Mapping) or (
                isinstance(data, tuple) and data and all(_is_array(a) for a in data)):
            if self.chunk_size is None:
                raise ValueError(f"{name} is {'an array' if _is_array(data) else 'a tuple/dict of arrays'}: pass "
                                 f"chunk_size=B to split it into batches of B examples, or pass {name} as a list "
                                 "of batches.")
            n = _leading(data, name)
            self._one_shot = False
            self._source = lambda: (jax.tree_util.tree_map(lambda a: _slice(a, i, self.chunk_size), data)
                                    for i in range(0, n, self.chunk_size))
            return
        if callable(data):
            self._one_shot = False
            self._source = data
            return
        try:
            first_iter = iter(data)
        except TypeError:
            raise ValueError(f"{name} must be {DATA_FORMS}; got {type(data).__name__}.") from None
        self._one_shot = first_iter is data
        if self._one_shot and multi_pass:
            raise ValueError(f"{name} is a one-shot iterator (e.g. a generator), but this measure passes over the "
                             "data several times (once per Lanczos step). Pass a list of batches, a re-iterable "
                             "loader, or a zero-argument function that returns a fresh iterator.")
        self._source = lambda: iter(data)

    def chunks(self) -> Iterator[tuple[Any, np.ndarray]]:
        """One pass over the data: ``(chunk, mask)`` with every leaf of ``chunk`` of leading size ``self.size``.
        At the end of the pass checks that the data were not empty and did not change size between passes."""
        if self._one_shot and self._passes:
            raise ValueError(f"{self.name} is a one-shot iterator that was already consumed; pass a list of batches.")
        self._passes += 1
        total = 0
        for batch in self._source():
            batch = self.select(batch)
            batch = jax.tree_util.tree_map(lambda a: a if _is_array(a) else np.asarray(a), batch)
            n = _leading(batch, self.name)
            if n == 0:
                continue
            if self.size is None:
                self.size = n if self.chunk_size is None else min(n, self.chunk_size)
            for start in range(0, n, self.size):
                piece = batch if (start == 0 and n <= self.size) else jax.tree_util.tree_map(
                    lambda a: _slice(a, start, self.size), batch)
                m = min(self.size, n - start)
                yield jax.tree_util.tree_map(lambda a: _pad(a, self.size), piece), np.arange(self.size) < m
            total += n
        if total == 0:
            raise ValueError(f"{self.name} has no examples; pass at least one non-empty batch.")
        if self.num_examples is not None and total != self.num_examples:
            raise ValueError(f"{self.name} changed between passes ({self.num_examples} examples, then {total}); the "
                             "Hessian of a fixed data set needs the same examples on every pass (no drop_last with "
                             "shuffling, no infinite or resampling loader).")
        self.num_examples = total


def inputs_of(batch: Any) -> Any:
    """The inputs of a batch: the batch itself (an array), its first element (``(x, y)``), or its ``"image"``."""
    if _is_array(batch):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        if "image" in batch:
            return batch["image"]
        raise ValueError(f"a batch dict must hold the inputs under 'image'; got keys {sorted(batch)}.")
    raise ValueError(f"a batch must be an array of inputs, an (inputs, labels) tuple or a dict with 'image'; got "
                     f"{type(batch).__name__}.")
