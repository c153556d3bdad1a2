"""AutoAttack's standard suite against APGD-CE+DLR on the networks of a measured compare run (issue 26's report).

    lcnn-jax measure --workdir runs/compare --method METHOD --seed 0 \\
        --config.measure.robust_attacks="('apgd','autoattack')" --config.measure.apgd_steps=100 \\
        --config.measure.num_examples=64 --config.measure.splits="('test',)" --config.measure.pgd_linf_eps="()" \\
        --config.measure.pgd_l2_eps="(2.0,)" --config.measure.certified_l2_eps="()" --config.measure.noise_std="()"
    python experiments/autoattack_table.py runs/compare [--out experiments/results/autoattack/compare_quick.md]

Reads every ``measures.json`` under the compare run's ``runs/*/members/*`` that holds an ``aa_*`` column and prints
one row per (method, seed, column): clean accuracy, APGD-CE+DLR and AutoAttack robust accuracy on the same images,
the points each AutoAttack stage broke (APGD-CE, APGD-T, FAB-T, Square; each runs only on the points still robust),
and the points AutoAttack broke beyond APGD-CE+DLR. Square uses no gradient: points only it breaks are the sign of
gradient masking.
"""
import argparse
import glob
import json
import os

from lcnn_jax.io import write_text_atomic

STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")


def rows(workdir: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(workdir, "runs", "*", "members", "*", "measures.json"))):
        with open(path) as fh:
            rep = json.load(fh)
        test, member = rep.get("test", {}), rep.get("member", {})
        for col, st in sorted(test.items()):
            if not col.startswith("aa_"):
                continue
            apgd = test.get("apgd_" + col[3:], {}).get("mean")
            n = int(st["n"])
            out.append({"method": member.get("method", "?"), "seed": member.get("seed"), "column": col, "n": n,
                        "clean": test.get("accuracy", {}).get("mean"), "apgd": apgd, "aa": st["mean"],
                        "broken_by": st.get("broken_by", {}),
                        "beyond_apgd": None if apgd is None else round((apgd - st["mean"]) * n)})
    return out


def markdown(rs: list[dict], command: str) -> str:
    lines = ["# AutoAttack (standard) against APGD-CE+DLR on the quick compare networks", "",
             f"`{command}`", "",
             "Robust accuracy in % on the same test images; broken by: points each AutoAttack stage broke (each stage "
             "runs only on the points still robust); beyond APGD: points AutoAttack broke that APGD-CE+DLR did not.",
             "", "| method | seed | column | n | clean % | APGD-CE+DLR % | AutoAttack % | broken by APGD-CE / APGD-T / "
             "FAB-T / Square | beyond APGD |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
        broken = " / ".join(str(r["broken_by"].get(s, 0)) for s in STAGES)
        lines.append(f"| {r['method']} | {r['seed']} | {r['column']} | {r['n']} | {fmt(r['clean'])} | "
                     f"{fmt(r['apgd'])} | {fmt(r['aa'])} | {broken} | {r['beyond_apgd']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    text = markdown(rows(args.workdir), f"python experiments/autoattack_table.py {args.workdir}")
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()
