"""Cell-by-cell differences between two compare runs' ``results.csv`` (e.g. the committed table and a rerun).

    python experiments/diff_compare_results.py experiments/results/compare_quick/results.csv runs/compare/results.csv

Prints, per column, how many (method, seed) cells differ and the largest absolute difference (in the column's own
units; accuracies are fractions, so 1/256 = 0.0039 is one example of the 256 measured), and the columns that are
identical in every cell. ``train_time_s`` (wall time) is reported like any column.
"""
import csv
import sys


def load(path: str) -> dict:
    with open(path, newline="") as fh:
        return {(r["method"], r["seed"]): r for r in csv.DictReader(fh)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    old, new = load(argv[0]), load(argv[1])
    cells = sorted(set(old) & set(new))
    for label, missing in (("only in the first", set(old) - set(new)), ("only in the second", set(new) - set(old))):
        if missing:
            print(f"cells {label}: {sorted(missing)}")
    columns = [c for c in next(iter(old.values())) if c not in ("method", "seed", "member")]
    same = []
    for col in columns:
        diffs = []
        for k in cells:
            a, b = old[k].get(col, ""), new[k].get(col, "")
            if a != b:
                try:
                    diffs.append((abs(float(a) - float(b)), k))
                except ValueError:
                    diffs.append((float("inf"), k))
        if diffs:
            worst, where = max(diffs)
            print(f"{col}: {len(diffs)} of {len(cells)} cells differ, largest |difference| {worst:.3g} ({where[0]}, "
                  f"seed {where[1]})")
        else:
            same.append(col)
    print(f"identical in all {len(cells)} cells: {', '.join(same)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
