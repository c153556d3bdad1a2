"""The ``lcnn-jax`` command: a thin layer over the library (nothing in the library reads flags).

    lcnn-jax train --config experiments/configs/quickstart.py --workdir runs/quickstart [--config.a.b=value ...]
    lcnn-jax sweep --config experiments/configs/quickstart.py --workdir runs/sweep --config.sweep.seeds="(0,1,2)" \
        [--config.sweep.grid.datagrad.coeff="(0.0,1e-3)" ...]
    lcnn-jax measure --workdir runs/quickstart [--member ID|all] [--seed N] [--method NAME]
        [--config.measure.num_examples=512 ...]
    lcnn-jax compare --config experiments/configs/compare_mnist5k.py --workdir runs/compare [--config.a.b=value ...]
    lcnn-jax certify --workdir runs/certified --radii 0.5,1.0,1.58 [--test_data mnist --test_data_dir DIR]
        [--num_examples N] [--attack apgd] [--out FILE]

Tables are printed at most 120 characters wide; every column is in the files written.

Exit codes: 0 success; 2 bad usage, config, dataset or run directory (one-paragraph message, no traceback, nothing
written); 3 training diverged; 4 no space left on the device (the last complete checkpoint is kept); 130
interrupted by Ctrl-C. After 3, 4 or 130, rerunning the same command resumes from the last checkpoint.

Compiled programs are kept between runs in JAX's persistent compilation cache, by default in
``$XDG_CACHE_HOME/lcnn_jax/xla`` (``~/.cache/lcnn_jax/xla``): a second ``measure`` of a network of the same
architecture, or a resumed ``train``, loads its programs instead of compiling them (the library passes weights and
data as arguments, so the programs do not depend on them). ``LCNN_JAX_COMPILATION_CACHE=DIR`` chooses another
directory, ``LCNN_JAX_COMPILATION_CACHE=0`` turns it off; a cache the user configured for JAX itself
(``JAX_COMPILATION_CACHE_DIR``) is left as it is.
"""
from __future__ import annotations

import argparse
import os
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
    t.add_argument("--allow_nonempty", action="store_true",
                   help="train into an existing non-empty directory that is not a run directory (refused without "
                        "it, so that a run's files never land among foreign ones)")
    w = sub.add_parser("sweep", help="train the seeds x coefficient grid of the config's sweep section as one "
                                     "vmapped program",
                       epilog="Members: --config.sweep.seeds=\"(0,1,2)\" (default: config.seed) times every "
                              "--config.sweep.grid.<regularizer>.<key>=\"(v1,v2,...)\" (the regularizer must be in "
                              "the config, e.g. --config.regularizers.datagrad.coeff=0.0); "
                              "--config.sweep.data_order=shared sends one batch order to every member. Rerunning "
                              "resumes. Measure a member with lcnn-jax measure --workdir DIR --member ID (or all).")
    w.add_argument("--config", required=True, help="Python file with get_config() (optionally path.py:arg)")
    w.add_argument("--workdir", required=True, help="directory for the stacked checkpoints, members/ and results")
    w.add_argument("--allow_nonempty", action="store_true",
                   help="train into an existing non-empty directory that is not a run directory")
    m = sub.add_parser("measure", help="measure a trained run, or members of a sweep or compare run (smoothness, "
                                       "curvature, Lipschitz, robustness)",
                       epilog="Override measurement settings with --config.measure.KEY=VALUE, e.g. "
                              "--config.measure.num_examples=512 --config.measure.test_data=mnist "
                              "--config.measure.test_data_dir=../shared/data/mnist")
    m.add_argument("--workdir", required=True, help="a training run, a sweep (or one of its members/<id> folders) "
                                                    "or a compare run")
    m.add_argument("--member", help="a sweep member's id (e.g. 003) or index, or 'all' (every member of a sweep or "
                                    "compare run)")
    m.add_argument("--seed", type=int, help="the member(s) trained with this seed")
    m.add_argument("--method", help="a compare run's method (with --seed: one cell)")
    c = sub.add_parser("compare", help="train and measure every method of a compare config (seeds vmapped); "
                                       "results.csv/json/md and figures",
                       epilog="Select with --config.compare.methods=\"('standard','clip')\" "
                              "--config.compare.seeds=\"(0,1,2)\"; add a method of your own with "
                              "--config.compare.method_specs.mine.model.name=path/to/models.py:Net [--config.compare."
                              "method_specs.mine.regularizers.datagrad.coeff=0.01]; rerunning resumes (finished cells "
                              "are skipped)")
    c.add_argument("--config", required=True, help="a compare config file, e.g. experiments/configs/compare_mnist5k.py "
                                                    "(optionally path.py:full)")
    c.add_argument("--workdir", required=True, help="directory for the runs, cells, results and figures")
    r = sub.add_parser("certify", help="certified L2 accuracy of a trained network at given radii (best of the "
                                       "Lipschitz-margin and second-order certificates), optionally checked by APGD",
                       epilog="e.g. lcnn-jax certify --workdir runs/certified/gloro_cnn --radii 0.5,1.0,1.58 "
                              "--test_data mnist --test_data_dir ../shared/data/mnist --num_examples 1000 "
                              "--attack apgd")
    r.add_argument("--workdir", required=True, help="a training run, a sweep member or a compare run (as measure)")
    r.add_argument("--radii", required=True, help="L2 radii > 0, comma-separated (pixel scale [0, 1])")
    r.add_argument("--test_data", help="test dataset name (default: the run's own), e.g. mnist")
    r.add_argument("--test_data_dir", help="its folder (IDX files for mnist)")
    r.add_argument("--num_examples", type=int, help="the first N test examples (default: all)")
    r.add_argument("--attack", help="also attack every example at every radius: apgd")
    r.add_argument("--out", help="JSON file to write (default: <run dir>/certify.json)")
    r.add_argument("--member", help="a sweep member's id or index")
    r.add_argument("--seed", type=int, help="the member trained with this seed")
    r.add_argument("--method", help="a compare run's method")
    return p


def _load(args, overrides):
    from lcnn_jax.configs import apply_overrides, load_config

    return apply_overrides(load_config(args.config), overrides)


def _refuse_sweep_in_train(config, args) -> None:
    """``train`` trains one run; a config whose ``sweep`` section asks for more (or for another seed) is refused
    with the command that trains it, instead of silently training one run of it."""
    from lcnn_jax.train import single_run_conflict
    from lcnn_jax.errors import ConfigError

    asked = single_run_conflict(config)
    if asked:
        raise ConfigError(
            f"the config's sweep section asks for a sweep ({asked}), but `lcnn-jax train` trains one run "
            f"(config.seed={int(config.seed)}) and ignores that section. To train the sweep as one vmapped program, "
            f"run the same command as `lcnn-jax sweep --config {args.config} --workdir {args.workdir} ...`; to "
            f"train one run, drop the --config.sweep.* overrides (or set config.seed).")


def _summary(results: dict, workdir: str) -> str:
    trained_on = ("  (a training figure: data.train_split=train+test trained on the test split too)"
                  if (results.get("config") or {}).get("data", {}).get("train_split") == "train+test" else "")
    text = (f"done: {results['steps']} steps in {results['wall_time_s']:.1f} s on {results['num_devices']} "
            f"{results['devices']} device(s)\n"
            f"  train accuracy {results['train_accuracy']:.4f}  loss {results['train_loss']:.4f}\n"
            f"  test  accuracy {results['test_accuracy']:.4f}  loss {results['test_loss']:.4f}{trained_on}\n"
            f"  results: {workdir}/results.json")
    if results.get("dead"):
        text += ("\n  WARNING: dead network (the same output for every input, see the warning above and "
                 "results.json); its smoothness measures describe a constant function")
    return text


def _measure(args, overrides) -> None:
    """``lcnn-jax measure``: say what the workdir holds and which network(s) are measured, measure them, print one
    report (one network) or a compact table (several), and where the files are."""
    from lcnn_jax import runs
    from lcnn_jax.report import format_members, format_report, measure_members

    wd = runs.inspect_workdir(args.workdir)
    chosen = runs.select_members(wd, member=args.member, seed=args.seed, method=args.method)
    if wd.kind == "member":
        print(f"{args.workdir}: {wd.description}", flush=True)
    elif wd.kind != "run":
        short = [m.id if m.method is None else f"{m.method}/seed{m.seed}" for m in chosen]
        names = (chosen[0].label if len(chosen) == 1 else f"{len(chosen)} networks: {', '.join(short[:10])}"
                 + (" ..." if len(short) > 10 else ""))
        print(f"{args.workdir}: {wd.description}; measuring {names}", flush=True)
    results = measure_members(args.workdir, overrides, member=args.member, seed=args.seed, method=args.method)
    if len(results) == 1:
        m, rep = results[0]
        print(format_report(rep))
        print(f"  measures: {os.path.join(m.out_dir, 'measures.json')} (checkpoint step {rep['checkpoint_step']})")
        return
    table, hidden = format_members(results)
    print(table)
    if hidden:
        print(f"{len(hidden)} more item(s) ({', '.join(hidden)}) in each network's measures.json")
    print("  measures: " + ", ".join(os.path.join(m.out_dir, "measures.json") for m, _ in results[:3])
          + (f" ... ({len(results)} files)" if len(results) > 3 else ""))


def _certify(args) -> None:
    """``lcnn-jax certify``: certify (and attack), print the table, write the JSON, shout about any certified example
    the attack broke (see :mod:`lcnn_jax.certify`)."""
    import json

    from lcnn_jax.certify import broken_message, certify_workdir, check_certify_args, format_certify
    from lcnn_jax.io import write_json_atomic

    check_certify_args(args.radii, args.attack, args.num_examples)  # before the workdir is even read
    rep = certify_workdir(args.workdir, args.radii, test_data=args.test_data, test_data_dir=args.test_data_dir,
                          num_examples=args.num_examples, attack=args.attack, member=args.member, seed=args.seed,
                          method=args.method)
    print(format_certify(rep))
    out = args.out or os.path.join(args.workdir, "certify.json")
    write_json_atomic(out, json.loads(json.dumps(rep)))
    print(f"  written: {out}")
    msg = broken_message(rep)
    if msg:
        print(f"lcnn-jax: {msg}", file=sys.stderr)


#: Values of LCNN_JAX_COMPILATION_CACHE that turn the CLI's persistent compilation cache off.
CACHE_OFF = ("0", "off", "false", "no", "none")


def compilation_cache_dir() -> str | None:
    """The directory of the CLI's persistent compilation cache, or None when there is none to set: turned off by
    ``LCNN_JAX_COMPILATION_CACHE=0`` (or off / false / no / none), or left to JAX because the user set
    ``JAX_COMPILATION_CACHE_DIR``. ``LCNN_JAX_COMPILATION_CACHE=DIR`` names the directory; the default is
    ``$XDG_CACHE_HOME/lcnn_jax/xla``, else ``~/.cache/lcnn_jax/xla``."""
    env = os.environ.get("LCNN_JAX_COMPILATION_CACHE")
    if env is not None and env.strip().lower() in CACHE_OFF + ("",):
        return None
    if env:
        return os.path.abspath(os.path.expanduser(env))
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lcnn_jax", "xla")


def enable_compilation_cache() -> str | None:
    """Point JAX's persistent compilation cache at :func:`compilation_cache_dir` (before anything compiles) and
    return the directory; None (and nothing changed) when it is off, JAX already has a cache directory, or the
    directory cannot be created (then the run simply compiles, with a warning)."""
    import jax

    path = compilation_cache_dir()
    if path is None or jax.config.jax_compilation_cache_dir:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        print(f"lcnn-jax: warning: no compilation cache ({path}: {e.strerror}); set LCNN_JAX_COMPILATION_CACHE=DIR "
              f"or LCNN_JAX_COMPILATION_CACHE=0.", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    enable_compilation_cache()

    try:
        return _run(args, overrides)
    except KeyboardInterrupt as e:  # Ctrl-C: no traceback, the step and how to resume
        from lcnn_jax.errors import TrainingInterrupted

        what = str(e) if isinstance(e, TrainingInterrupted) else {
            "train": "interrupted before training started; rerun the same command to start or resume.",
            "sweep": "interrupted before training started; rerun the same command to start or resume.",
            "measure": "interrupted; the networks not yet measured have no measures.json. Rerun the same command "
                       "to measure.",
            "compare": "interrupted; rerun the same command to resume (finished cells are kept).",
            "certify": "interrupted; nothing was written. Rerun the same command to certify."}[args.command]
        print(f"lcnn-jax: {what}", file=sys.stderr)
        return 130


def _distributed(command: str) -> bool:
    """For ``train`` and ``sweep``: join the multi-process job the environment describes (:mod:`lcnn_jax.launch`
    sets it), before anything touches a JAX device; False. For the other commands: True when started as one of
    several processes (they are single-process commands: each process would write the same files)."""
    from lcnn_jax.train import maybe_initialize_distributed

    if command in ("train", "sweep"):
        maybe_initialize_distributed()
        return False
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) and os.environ.get("JAX_NUM_PROCESSES", "1") not in ("", "1")


def _run(args, overrides) -> int:
    import errno

    from lcnn_jax.data import DatasetError
    from lcnn_jax.errors import ConfigError, TrainingDiverged

    try:
        if _distributed(args.command):
            return _usage_error(f"`lcnn-jax {args.command}` runs in one process; this one was started as process "
                                f"{os.environ.get('JAX_PROCESS_ID', '?')} of {os.environ.get('JAX_NUM_PROCESSES', '?')} "
                                f"(JAX_COORDINATOR_ADDRESS is set). Launch only `train` and `sweep` with "
                                f"python -m lcnn_jax.launch, then run `lcnn-jax {args.command}` on its own.")
        if args.command == "train":
            from lcnn_jax.train import fit

            config = _load(args, overrides)
            _refuse_sweep_in_train(config, args)
            results = fit(config, args.workdir, extend=args.extend, allow_nonempty=args.allow_nonempty)
            if results.get("already_finished"):
                print(f"already finished: {args.workdir} holds this run (step {results.get('steps')}); nothing was "
                      f"trained or written.")
            print(_summary(results, args.workdir))
        elif args.command == "sweep":
            from lcnn_jax.train import fit_sweep_from_config, format_summary

            summary = fit_sweep_from_config(_load(args, overrides), args.workdir, allow_nonempty=args.allow_nonempty)
            if summary.get("already_finished"):
                print(f"already finished: {args.workdir} holds this sweep (step {summary.get('steps')}); nothing "
                      f"was trained or written.")
            mesh = summary.get("mesh") or {}
            print(f"done: {summary['num_members']} members, {summary['steps']} steps each, in "
                  f"{summary['wall_time_s']:.1f} s on {summary['num_devices']} {summary['devices']} device(s) "
                  f"(mesh members x data = {mesh.get('members', '?')} x {mesh.get('data', '?')})")
            print(format_summary(summary, args.workdir))
        elif args.command == "measure":
            bad = [o for o in overrides if not o.startswith("measure.")]
            if bad:
                return _usage_error(f"measure only takes --config.measure.* overrides, got {bad}.")
            _measure(args, overrides)
        elif args.command == "compare":
            from lcnn_jax.compare import apply_compare_overrides, format_compact, run_compare
            from lcnn_jax.configs import load_config

            res = run_compare(apply_compare_overrides(load_config(args.config), overrides), args.workdir)
            table, hidden = format_compact(res["aggregate"], res["columns"], res["best"], models=res.get("models"))
            print(f"{res.get('title', '')}\nmean ± std over seeds {res['seeds']}; accuracies in %; * best mean "
                  f"(↑ higher / ↓ lower is better)\n{table}")
            if hidden:
                print(f"{len(hidden)} more column(s) ({', '.join(hidden)}) in {args.workdir}/results.md, "
                      f"results.csv and results.json")
            print(f"done in {res['wall_time_s']:.1f} s\n  results: {args.workdir}/results.md, results.csv, "
                  f"results.json\n  figures: " + ", ".join(res["figures"]))
        elif args.command == "certify":
            if overrides:
                return _usage_error(f"certify takes no --config.* overrides, got {overrides}.")
            _certify(args)
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
