"""Markdown rows of the certified-robustness table from the JSON that ``lcnn-jax certify`` wrote.

    python experiments/certified_table.py gloro_mlp aol_ce tsuzuku_mlp crt standard lcnn clip gloro_cnn
    python experiments/certified_table.py --seeds gloro_mlp 0,1,2

Reads ``experiments/results/certified/<variant>.json`` (certify) and ``runs/certified/<variant>/results.json``
(training wall time); prints one row per variant that has both.

``--seeds VARIANT SEEDS``: the seed table of one variant, from ``<variant>.json`` (seed 0) and
``seeds/<variant>_seed<k>.json`` (the first 1000 official test images) and ``seeds/<variant>_seed<k>_full_test.json``
(all 10,000): per seed the certified % on the first 1000, on the other 9000 (from the counts of both files) and on
all 10,000, then the mean and standard deviation (ddof 1) over seeds.
"""
import json
import os
import sys

RESULTS = "experiments/results/certified"
RUNS = "runs/certified"


def row(variant: str) -> str | None:
    cert_path = os.path.join(RESULTS, f"{variant}.json")
    if not os.path.isfile(cert_path):
        return None
    with open(cert_path) as f:
        rep = json.load(f)
    train = os.path.join(RUNS, variant, "results.json")
    wall = None
    if os.path.isfile(train):
        with open(train) as f:
            wall = json.load(f).get("wall_time_s")
    radii = rep["radii"]
    cert = " / ".join(f"{100 * e['certified']:.1f}" for e in radii.values())
    apgd = " / ".join("-" if e["robust_apgd"] is None else f"{100 * e['robust_apgd']:.1f}" for e in radii.values())
    broken = sum(int(e["certified_but_broken"] or 0) for e in radii.values())
    used = {}
    for e in radii.values():
        for k, v in e["certified_by"].items():
            used[k] = used.get(k, 0) + v
    used_text = ", ".join(f"{k} {v}" for k, v in sorted(used.items())) or "-"
    wall_text = "-" if wall is None else f"{wall / 60:.1f}"
    return (f"| {variant} | {100 * rep['clean_accuracy']:.1f} | {cert} | {apgd} | {broken} | "
            f"{rep['certificate']} ({used_text}) | {wall_text} |")


def main(variants):
    print("| variant | clean % | certified % at 0.5 / 1.0 / 1.58 | APGD robust % at 0.5 / 1.0 / 1.58 | "
          "certified but broken | certificate (examples certified by it, summed over radii) | train min |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        r = row(v)
        if r:
            print(r)


def _counts(path: str) -> tuple[int, int, list[int], list[str]]:
    """``(n, correct, certified counts per radius, radius keys)`` of one certify JSON."""
    with open(path) as f:
        rep = json.load(f)
    n, keys = int(rep["n"]), list(rep["radii"])
    return (n, round(rep["clean_accuracy"] * n), [round(rep["radii"][k]["certified"] * n) for k in keys], keys)


def seed_table(variant: str, seeds: list[int]) -> str:
    import numpy as np

    lines, cols = [], []
    for k in seeds:
        first = os.path.join(RESULTS, f"{variant}.json" if k == 0 else f"seeds/{variant}_seed{k}.json")
        n1, c1, cert1, keys = _counts(first)
        n, c, cert, _ = _counts(os.path.join(RESULTS, f"seeds/{variant}_seed{k}_full_test.json"))
        rest = [100 * (a - b) / (n - n1) for a, b in zip(cert, cert1)]
        row = [100 * c1 / n1] + [100 * x / n1 for x in cert1] + rest + [100 * c / n] + [100 * x / n for x in cert]
        cols.append(row)
        lines.append(f"| {k} | {row[0]:.1f} | " + " / ".join(f"{x:.1f}" for x in row[1:4]) + " | "
                     + " / ".join(f"{x:.1f}" for x in row[4:7]) + f" | {row[7]:.1f} | "
                     + " / ".join(f"{x:.1f}" for x in row[8:11]) + " |")
    a = np.asarray(cols)
    mean, std = a.mean(0), a.std(0, ddof=1) if len(seeds) > 1 else np.zeros(a.shape[1])

    def ms(i):
        return f"{mean[i]:.1f} ± {std[i]:.1f}"
    lines.append(f"| mean ± std | {ms(0)} | " + " / ".join(ms(i) for i in range(1, 4)) + " | "
                 + " / ".join(ms(i) for i in range(4, 7)) + f" | {ms(7)} | " + " / ".join(ms(i) for i in range(8, 11))
                 + " |")
    radii = " / ".join(keys)
    head = (f"| seed | clean %, first 1000 | certified % at {radii}, first 1000 | certified %, other 9000 | "
            f"clean %, all 10,000 | certified %, all 10,000 |\n|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--seeds"]:
        print(seed_table(sys.argv[2], [int(k) for k in sys.argv[3].split(",")]))
    else:
        main(sys.argv[1:])
