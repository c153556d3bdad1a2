"""Plain-text tables for a terminal: as many columns as fit a line width, the rest left to the result files.

The command line prints results a person reads on an ordinary terminal; a table of every measured column (18
for ``lcnn-jax compare``) is 300+ characters wide and wraps into noise. :func:`format_table` keeps the leading
label columns, adds the others in a priority order while the line stays within ``width`` (120 by default), shows
them in their original order and says which were left out.

Example::

    from lcnn_jax.tables import format_table
    text, hidden = format_table(["method", "acc %", "curvature"], [["standard", "96.2", "3.95"]], width=24)
    print(text)           # two columns: the third does not fit in 24 characters
    assert hidden == [2]
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["fit_columns", "format_table", "priority_order"]

SEPARATOR = "  "


def priority_order(names: Sequence[str], patterns: Sequence) -> list[int]:
    """Indices of ``names`` in the order ``patterns`` ranks them, for :func:`fit_columns`'s ``priority``: a string
    pattern (shell-style, ``"pgd_*"``) takes every name it matches, in their order; a tuple of alternatives takes
    one name: the first match of its first pattern that matches any (``("apgd_l2_*", "pgd_l2_*")``: one
    robust-accuracy column early, the rest later). Names no pattern matches follow in their own order."""
    import fnmatch

    order: list[int] = []

    def matches(pattern):
        return [i for i, n in enumerate(names) if i not in order and fnmatch.fnmatchcase(n, pattern)]

    for entry in patterns:
        if isinstance(entry, str):
            order += matches(entry)
        else:
            order += next((hits[:1] for hits in map(matches, entry) if hits), [])
    return order + [i for i in range(len(names)) if i not in order]


def fit_columns(widths: Sequence[int], *, fixed: int = 1, priority: Sequence[int] | None = None,
                width: int = 120) -> list[int]:
    """The indices, ascending, of the columns to show: the first ``fixed`` always, then the others in
    ``priority`` order (default: left to right) as long as the line, columns joined by two spaces, stays within
    ``width`` characters. A column that does not fit is skipped and later, narrower ones may still fit."""
    n = len(widths)
    shown = list(range(min(fixed, n)))
    used = sum(widths[i] for i in shown) + len(SEPARATOR) * max(len(shown) - 1, 0)
    order = [i for i in (priority if priority is not None else range(n)) if i >= fixed]
    order += [i for i in range(fixed, n) if i not in order]
    for i in order:
        extra = widths[i] + (len(SEPARATOR) if shown else 0)
        if used + extra <= width:
            shown.append(i)
            used += extra
    return sorted(shown)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, fixed: int = 1,
                 priority: Sequence[int] | None = None, width: int = 120) -> tuple[str, list[int]]:
    """``(text, hidden)``: the rows under the header, the first ``fixed`` columns left-aligned and the rest
    right-aligned, limited to the columns :func:`fit_columns` picks; ``hidden`` lists the indices left out (the
    caller says where they can be read)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    shown = fit_columns(widths, fixed=fixed, priority=priority, width=width)
    lines = []
    for r in cells:
        parts = [r[i].ljust(widths[i]) if i < fixed else r[i].rjust(widths[i]) for i in shown]
        lines.append(SEPARATOR.join(parts).rstrip())
    return "\n".join(lines), [i for i in range(len(header)) if i not in shown]
