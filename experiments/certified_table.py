"""Markdown rows of the certified-robustness table from the JSON that ``lcnn-jax certify`` wrote.

    python experiments/certified_table.py gloro_mlp aol_ce tsuzuku_mlp crt standard lcnn clip gloro_cnn

Reads ``experiments/results/certified/<variant>.json`` (certify) and ``runs/certified/<variant>/results.json``
(training wall time); prints one row per variant that has both.
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


if __name__ == "__main__":
    main(sys.argv[1:])
