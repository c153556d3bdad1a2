"""The ``lcnn-jax`` command: a thin layer over the library (nothing in the library reads flags).

    lcnn-jax train --config experiments/configs/quickstart.py --workdir runs/quickstart [--config.a.b=value ...]
    lcnn-jax measure --workdir runs/quickstart [--config.measure.num_examples=512 ...]
    lcnn-jax compare --config experiments/configs/compare_mnist5k.py --workdir runs/compare [--config.a.b=value ...]

Exit codes: 0 success; 2 bad usage, config, dataset or run directory (one-paragraph message, no traceback, nothing
written); 3 training diverged; 4 no space left on the device (the last complete checkpoint is kept); 130
interrupted by Ctrl-C. After 3, 4 or 130, rerunning the same command resumes from the last checkpoint.
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
    t.add_argument("--extend", action="store_true",
                   help="let a rerun in a workdir that holds a run change train.num_epochs / train.num_steps and "
                        "train on from its last checkpoint (the learning-rate schedule follows the new length); "
                        "without it a rerun with any other config is refused")
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
    text = (f"done: {results['steps']} steps in {results['wall_time_s']:.1f} s on {results['num_devices']} "
            f"{results['devices']} device(s)\n"
            f"  train accuracy {results['train_accuracy']:.4f}  loss {results['train_loss']:.4f}\n"
            f"  test  accuracy {results['test_accuracy']:.4f}  loss {results['test_loss']:.4f}\n"
            f"  results: {workdir}/results.json")
    if results.get("dead"):
        text += ("\n  WARNING: dead network (the same output for every input, see the warning above and "
                 "results.json); its smoothness measures describe a constant function")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)

    try:
        return _run(args, overrides)
    except KeyboardInterrupt as e:  # Ctrl-C: no traceback, the step and how to resume
        from lcnn_jax.training import TrainingInterrupted

        what = str(e) if isinstance(e, TrainingInterrupted) else {
            "train": "interrupted before training started; rerun the same command to start or resume.",
            "measure": "interrupted; measures.json was not written. Rerun the same command to measure.",
            "compare": "interrupted; rerun the same command to resume (finished cells are kept)."}[args.command]
        print(f"lcnn-jax: {what}", file=sys.stderr)
        return 130


def _run(args, overrides) -> int:
    import errno

    from lcnn_jax.data import DatasetError
    from lcnn_jax.training import ConfigError, TrainingDiverged

    try:
        if args.command == "train":
            from lcnn_jax.training import fit

            results = fit(_load(args, overrides), args.workdir, extend=args.extend)
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
    except PermissionError as e:
        return _usage_error(f"cannot write {e.filename or args.workdir}: permission denied. Choose a --workdir you "
                            f"can write to.")
    except TrainingDiverged as e:
        print(f"lcnn-jax: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        # NoSpaceLeft says which step and checkpoint; a bare ENOSPC (e.g. from a results file) names the file.
        where = getattr(e, "message", None) or (f"no space left on the device of {e.filename or args.workdir}; "
                                                f"free some space and rerun the same command.")
        print(f"lcnn-jax: {where}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
