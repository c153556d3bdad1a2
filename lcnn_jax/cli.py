"""The ``lcnn-jax`` command: a thin layer over the library (nothing in the library reads flags).

    lcnn-jax train --config experiments/configs/quickstart.py --workdir runs/quickstart [--config.a.b=value ...]
    lcnn-jax measure --workdir runs/quickstart [--config.measure.num_examples=512 ...]
    lcnn-jax compare --config experiments/configs/compare_mnist5k.py --workdir runs/compare [--config.a.b=value ...]

Exit codes: 0 success; 2 bad usage, config or dataset (one-paragraph message, no traceback); 3 training diverged.
"""
from __future__ import annotations

import argparse
import sys


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.a.b=value`` (or ``--config.a.b value``) overrides from ordinary arguments."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise SystemExit(_usage_error(f"{arg} needs a value (--config.key=value)."))
                body, i = f"{body}={argv[i + 1]}", i + 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _usage_error(message: str) -> int:
    print(f"lcnn-jax: error: {message}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcnn-jax", description="Smoothness regularizers and measures in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from a config file",
                       epilog="Override any config key with --config.KEY=VALUE, e.g. --config.train.num_epochs=2")
    t.add_argument("--config", required=True, help="Python file with get_config() (optionally path.py:arg)")
    t.add_argument("--workdir", required=True, help="directory for checkpoints, metrics log and results")
    m = sub.add_parser("measure", help="measure a trained run (smoothness, curvature, Lipschitz, robustness)",
                       epilog="Override measurement settings with --config.measure.KEY=VALUE, e.g. "
                              "--config.measure.num_examples=512 --config.measure.test_data=mnist "
                              "--config.measure.test_data_dir=../shared/data/mnist")
    m.add_argument("--workdir", required=True, help="the --workdir of a training run")
    c = sub.add_parser("compare", help="train and measure every method of a compare config (seeds vmapped); "
                                       "results.csv/json/md and figures",
                       epilog="Select with --config.compare.methods=\"('standard','clip')\" "
                              "--config.compare.seeds=\"(0,1,2)\"; rerunning resumes (finished cells are skipped)")
    c.add_argument("--config", required=True, help="a compare config file, e.g. experiments/configs/compare_mnist5k.py "
                                                    "(optionally path.py:full)")
    c.add_argument("--workdir", required=True, help="directory for the runs, cells, results and figures")
    return p


def _load(args, overrides):
    from lcnn_jax.configs import apply_overrides, load_config

    return apply_overrides(load_config(args.config), overrides)


def _summary(results: dict, workdir: str) -> str:
    return (f"done: {results['steps']} steps in {results['wall_time_s']:.1f} s on {results['num_devices']} "
            f"{results['devices']} device(s)\n"
            f"  train accuracy {results['train_accuracy']:.4f}  loss {results['train_loss']:.4f}\n"
            f"  test  accuracy {results['test_accuracy']:.4f}  loss {results['test_loss']:.4f}\n"
            f"  results: {workdir}/results.json")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)

    from lcnn_jax.data import DatasetError
    from lcnn_jax.training import ConfigError, TrainingDiverged

    try:
        if args.command == "train":
            from lcnn_jax.training import fit

            results = fit(_load(args, overrides), args.workdir)
            print(_summary(results, args.workdir))
        elif args.command == "measure":
            from lcnn_jax.report import format_report, measure_workdir

            bad = [o for o in overrides if not o.startswith("measure.")]
            if bad:
                return _usage_error(f"measure only takes --config.measure.* overrides, got {bad}.")
            rep = measure_workdir(args.workdir, overrides)
            print(format_report(rep))
            print(f"  measures: {args.workdir}/measures.json")
        elif args.command == "compare":
            from lcnn_jax.compare import run_compare

            res = run_compare(_load(args, overrides), args.workdir)
            with open(f"{args.workdir}/results.md") as fh:
                print(fh.read())
            print(f"done in {res['wall_time_s']:.1f} s\n  results: {args.workdir}/results.md, results.csv, "
                  f"results.json\n  figures: " + ", ".join(res["figures"]))
    except (ConfigError, DatasetError, FileNotFoundError) as e:
        return _usage_error(str(e))
    except TrainingDiverged as e:
        print(f"lcnn-jax: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
