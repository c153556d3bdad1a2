"""Files: atomic writers, the metrics log, "load a saved result if it was made with these settings", and the
small statistics every results table uses.

Every result file of the library and of the experiment scripts is written through :func:`write_text_atomic`
(a temporary file in the same folder, ``fsync``, ``os.replace``): a reader, or a crash, sees the whole new file or
the previous one, never half of one. Scripts that skip finished work ask :func:`load_if_matches`, one rule for
"finished": the file parses and records the same settings.

Example::

    import os, tempfile
    from lcnn_jax import io
    path, settings = os.path.join(tempfile.mkdtemp(), "row.json"), {"epochs": 3, "seeds": (0, 1)}
    io.write_json_atomic(path, {"settings": settings, "accuracy": 0.97})
    done = io.load_if_matches(path, settings)               # the dict, or None: recompute
    mean, std = io.mean_std([0.97, 0.96, None])             # (0.965, 0.00707...): None values left out
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io as _io
import json
import logging
import os
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["write_text_atomic", "write_json_atomic", "write_csv_atomic", "json_default", "parse_jsonl",
           "MetricsLog", "read_metrics_log", "is_no_space", "load_if_matches", "mean_std", "save_figure_atomic"]

_log = logging.getLogger(__name__)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, ``fsync`` and ``os.replace``, so a
    reader (or a crash) sees the whole new file or the previous one, never half of one. Newlines are written as
    given."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or Ctrl-C: leave the old file, not a stray temporary one
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def json_default(o):
    """``json.dumps(default=...)`` for the values results hold: NumPy / JAX arrays and scalars as (nested) lists,
    ``ConfigDict`` through ``to_dict``, anything else as its ``str``."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic) or type(o).__module__.startswith("jax"):
        return np.asarray(o).tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def write_json_atomic(path: str, obj: Any) -> None:
    """``obj`` as indented JSON with sorted keys (numpy / jax values as lists), written by :func:`write_text_atomic`.
    Nothing is written when ``obj`` cannot be serialised."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default))


def write_csv_atomic(path: str, fieldnames: Sequence[str], rows: Iterable[dict], *,
                     extrasaction: str = "raise") -> None:
    """The dict ``rows`` as CSV under the header ``fieldnames`` (missing keys empty; a key outside the header
    raises ``ValueError`` unless ``extrasaction="ignore"``), written by :func:`write_text_atomic`."""
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction=extrasaction)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def save_figure_atomic(fig, path: str, **savefig_kwargs) -> str:
    """Save a matplotlib figure to ``path`` through a temporary file in the same folder and ``os.replace`` (the
    format is taken from ``path``'s suffix), then close it; returns ``path``."""
    import matplotlib.pyplot as plt

    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp.{os.getpid()}{ext}"
    try:
        fig.savefig(tmp, **savefig_kwargs)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    finally:
        plt.close(fig)
    return path


def parse_jsonl(text: str) -> tuple[list[dict], list[int]]:
    """The records of a JSON-lines text and the (1-based) numbers of the lines that are not valid JSON objects.

    A run killed while appending leaves half a line at the end of ``metrics.jsonl``; it is reported among the bad
    lines instead of making the whole log unreadable."""
    records, bad = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad.append(i)
    return records, bad


class MetricsLog:
    """Append-only JSON-lines log (``metrics.jsonl``); on resume, records after the restored step are dropped
    so the log of a resumed run reads like the log of an uninterrupted one. Lines that are not JSON (half a line
    left by a run killed mid-write) are dropped with a warning that says so. ``write=False`` (the processes other
    than 0 of a multi-process run) touches nothing."""

    def __init__(self, path: str, resume_step: int | None, *, write: bool = True):
        self.path, self.enabled = path, write
        if write and os.path.exists(path):
            keep = []
            if resume_step is not None:
                with open(path) as fh:
                    records, bad = parse_jsonl(fh.read())
                if bad:
                    _log.warning("%s: dropped %d unreadable line(s) (line %s; a run killed while writing leaves "
                                 "half a line); resuming from step %d.", path, len(bad),
                                 ", ".join(map(str, bad)), resume_step)
                keep = [json.dumps(r, default=json_default) + "\n" for r in records
                        if r.get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(keep))

    def write(self, record: dict) -> None:
        if not self.enabled:  # a process other than 0 of a multi-process run
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=json_default) + "\n")


def read_metrics_log(workdir: str) -> list[dict]:
    """All records of ``workdir/metrics.jsonl`` (a line that is not JSON, e.g. half a line left by a killed run,
    is skipped)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return parse_jsonl(fh.read())[0]


def is_no_space(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception in its chain says the disk is full: ``OSError(ENOSPC)``, or the text of
    TensorStore's ``RESOURCE_EXHAUSTED ... No space left on device [os_error_code='28']`` that orbax re-raises."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text = str(exc)
        if "No space left on device" in text or "os_error_code='28'" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _normalised(value):
    """``value`` as JSON would read it back (tuples as lists, NumPy scalars as numbers), so settings computed now
    compare equal to settings read from a file."""
    return json.loads(json.dumps(value, sort_keys=True, default=json_default))


def load_if_matches(path: str, expected, *, field: str = "settings", keys: Sequence[str] | None = None,
                    ignore: Sequence[str] = ()) -> dict | None:
    """The saved JSON object at ``path`` when it was made with ``expected``, else None (recompute).

    "Made with" means ``saved[field] == expected`` after both go through JSON (tuples and lists compare equal).
    When ``expected`` is a dict, ``keys`` restricts the comparison to those keys and ``ignore`` leaves some out
    (e.g. settings that only change how a result is printed). A missing file, a file that is not a JSON object
    (half-written by a killed process before atomic writes, or edited by hand) and a file without ``field`` all
    read as "not made with these settings". This is the one "skip if done" rule of the library's runners and the
    experiment scripts."""
    try:
        with open(path) as fh:
            saved = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or field not in saved:
        return None
    got, want = _normalised(saved[field]), _normalised(expected)
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return None
        names = set(want) | set(got) if keys is None else set(keys)
        names -= set(ignore)
        return saved if all(got.get(k) == want.get(k) for k in names) else None
    return saved if got == want else None


def mean_std(values) -> tuple:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) of the values that are not None;
    ``(None, None)`` when there are none."""
    vals = np.asarray([v for v in values if v is not None], np.float64)
    if vals.size == 0:
        return None, None
    return float(vals.mean()), (float(vals.std(ddof=1)) if vals.size > 1 else 0.0)
