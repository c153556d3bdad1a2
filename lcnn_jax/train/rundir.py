"""Run directories: may this config train in this workdir (and is anyone else training in it), is the run already
finished, and loading what a finished run left there.

A *run directory* is one the library wrote: it holds ``config.json``, ``checkpoints/`` or the lock file
(:data:`LOCK_FILE`). Training refuses an existing non-empty directory that is none (``allow_nonempty=True``,
``--allow_nonempty`` on the command line, says the user means it), holds an exclusive lock on the workdir for
the life of the training process (:func:`workdir_lock`: a second process is refused with its holder's pid and
host; the kernel releases the lock when the holder dies, so ``kill -9`` leaves nothing stuck), and returns the
stored results of a finished run without writing anything (:func:`finished_results`).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.errors import ConfigError, RunDirError, short_error
from lcnn_jax.io import json_default, read_metrics_log
from lcnn_jax.train.checkpoint import Checkpointer
from lcnn_jax.train import setup as run_setup
from lcnn_jax.train.state import create_train_state, make_optimizer
from lcnn_jax.types import PRNGKey, PyTree

__all__ = ["RERUN_NEUTRAL_KEYS", "EXTEND_KEYS", "LOCK_FILE", "check_workdir_path", "config_differences",
           "checkpoint_steps", "check_run_dir", "show_value", "previous_wall_time", "read_config", "template_state",
           "restore_latest", "load_trained", "read_results", "is_run_dir", "check_workdir_is_ours", "workdir_lock",
           "finished_results"]


# Keys a rerun may change without changing what is trained: logging, evaluation and checkpoint cadence, the
# progress bar, where the same dataset is read from (a run moved to another machine), and the sections only other
# commands read.
RERUN_NEUTRAL_KEYS = ("train.progress", "train.log_every", "train.eval_every", "train.eval_batch_size",
                      "train.checkpoint_every", "train.keep_checkpoints", "data.data_dir", "data.download",
                      "measure", "sweep", "compare")
# Keys ``extend=True`` (``lcnn-jax train --extend``) lets a rerun change: the run's length.
EXTEND_KEYS = ("train.num_epochs", "train.num_steps")
_UNSET = "(unset)"
#: The lock file of a run directory; it records the holder's pid, host and start time (for the message).
LOCK_FILE = ".lcnn_jax.lock"
_RUN_MARKS = ("config.json", "checkpoints", LOCK_FILE)


def check_workdir_path(workdir: str) -> None:
    """Raise :class:`RunDirError` when ``workdir`` exists but is not a directory (e.g. a results file given by
    mistake), before anything is loaded or written."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise RunDirError(f"--workdir {workdir!r} is a file, not a directory. Give the path of a directory (it is "
                          f"created if missing), e.g. --workdir runs/my_run.")
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunDirError(f"--workdir {workdir!r} lies under {parent!r}, which is a file; give a directory path "
                          f"that can be created, e.g. --workdir runs/my_run.")


def _flatten_config(node, prefix: str = "") -> dict:
    """``{"a.b.c": value}`` of a nested config dict; an empty mapping is a value of its own (a regularizer with no
    settings still differs from no regularizer)."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(_flatten_config(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def config_differences(old: dict, new: dict, defaults: dict | None = None) -> dict[str, tuple]:
    """``{key: (old value, new value)}`` for every leaf where two config dicts differ (tuples and lists compare
    equal, as JSON stores both as lists). A key absent from ``old`` whose new value is its default in
    ``defaults`` is no difference: that is how a config written before the key existed reads."""
    def norm(d):
        return _flatten_config(json.loads(json.dumps(d, default=json_default)))

    a, b, dflt = norm(old), norm(new), norm(defaults or {})
    # A model file stored by its relative path (runs trained before paths were resolved) is the same model as
    # the absolute path it resolves to from here.
    from lcnn_jax.configs import absolute_model_path

    a = {k: (absolute_model_path(v) if k.endswith("model.name") else v) for k, v in a.items()}
    out = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _UNSET), b.get(key, _UNSET)
        if va == vb or (va is _UNSET and key in dflt and dflt[key] == vb):
            continue
        if {show_value(va), show_value(vb)} == {_UNSET, "{}"}:  # an empty section that gained keys: those keys say it
            continue
        out[key] = (va, vb)
    return out


def _is_under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def checkpoint_steps(workdir: str) -> list[int]:
    """The step numbers of the finished checkpoint folders in ``workdir/checkpoints`` (read from the folder names,
    without opening anything), ascending."""
    try:
        names = os.listdir(os.path.join(workdir, "checkpoints"))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(n) for n in names if n.isdigit())


def check_run_dir(config, workdir: str, *, extend: bool = False, kind: str = "run") -> dict[str, tuple]:
    """Check, before anything is written, that ``config`` may train in ``workdir``; return the accepted changes.

    A workdir that already holds checkpoints belongs to the config in its ``config.json``. Rerunning resumes it
    only when the two agree up to :data:`RERUN_NEUTRAL_KEYS` (logging and checkpoint cadence); with ``extend``,
    the run's length (:data:`EXTEND_KEYS`) may change too. Anything else would silently continue, or overwrite,
    a run under another config, so it is refused. ``kind`` is ``"run"`` (:func:`fit`) or ``"sweep"``.

    Raises:
      RunDirError: ``workdir`` is a file, holds the other kind of run, or holds a run of a different config (the
        message lists the differing keys, old -> new, and the fix).
    """
    from lcnn_jax.configs import default_config

    check_workdir_path(workdir)
    if not checkpoint_steps(workdir):
        return {}  # nothing trained yet: nothing to protect or resume
    has_sweep = os.path.exists(os.path.join(workdir, "sweep.json"))
    if kind == "run" and has_sweep:
        raise RunDirError(f"--workdir {workdir!r} holds a vectorized sweep (sweep.json), not a single run; nothing "
                          f"was changed. Train this config in a new --workdir.")
    if kind == "sweep" and not has_sweep:
        raise RunDirError(f"--workdir {workdir!r} holds a single training run, not a sweep; nothing was changed. "
                          f"Run the sweep in a new --workdir.")
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as fh:
            old = json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise RunDirError(f"--workdir {workdir!r} holds checkpoints but its config.json cannot be read "
                          f"({short_error(e)}), so it is unknown which config they belong to; nothing was "
                          f"changed. Use a new --workdir.") from None
    diffs = config_differences(old, config.to_dict(), default_config().to_dict())
    diffs = {k: v for k, v in diffs.items() if not _is_under(k, RERUN_NEUTRAL_KEYS)}
    refused = {k: v for k, v in diffs.items() if not (extend and _is_under(k, EXTEND_KEYS))}
    if refused:
        listed = ", ".join(f"{k} {show_value(a)} -> {show_value(b)}" for k, (a, b) in refused.items())
        length_only = all(_is_under(k, EXTEND_KEYS) for k in refused)
        fix = ("To train this run further under the new length, rerun with --extend (fit(..., extend=True)); to "
               "train the new config from scratch, use a new --workdir." if length_only else
               f"To train the new config, use a new --workdir; to resume or re-measure the old run, use its own "
               f"config ({path}).")
        raise RunDirError(f"--workdir {workdir!r} already holds a {kind} trained with a different config: "
                          f"{listed}. Nothing was changed (config.json and the checkpoints are as they were). {fix}")
    return diffs


def show_value(v) -> str:
    return v if v is _UNSET else json.dumps(v)


def previous_wall_time(workdir: str) -> float:
    """Training wall time already spent before an interruption (from the log), so results report the total."""
    try:
        recs = [r for r in read_metrics_log(workdir) if "wall_time_s" in r]
    except FileNotFoundError:
        return 0.0
    return float(recs[-1]["wall_time_s"]) if recs else 0.0


def read_config(workdir: str):
    """The resolved ``config.json`` of a run (or sweep) in ``workdir`` as a ``ConfigDict``."""
    import ml_collections

    check_workdir_path(workdir)
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No trained run in {workdir!r} (config.json missing): run `lcnn-jax train "
                                f"--config ... --workdir {workdir}` first.")
    try:
        with open(path) as fh:
            return ml_collections.ConfigDict(json.load(fh))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); the run's config cannot be read. Restore it from the "
                          f"config file the run was trained with, or train again in a new --workdir.") from None


def template_state(config, *, key: PRNGKey | None = None):
    """``(model, state, dataset_info)``: a freshly initialised train state with the structure of ``config``'s run
    (what a checkpoint is restored into), built from a one-example dummy batch without loading data."""
    from lcnn_jax import data as data_lib
    from lcnn_jax.nn import is_builtin_model, make_model, mode_kwargs

    info = data_lib.dataset_info(config.data.name)
    name = config.model.name
    try:
        model = make_model(name, info.num_classes, **dict(config.model.get("kwargs", {}) or {}))
    except ValueError as e:
        hint = ("" if is_builtin_model(name) or ":" in str(name) else
                f" A model registered with lcnn_jax.nn.register_model exists only in the process that registered "
                f"it: register {name!r} again before loading this run from Python, or train with an import path "
                f"(model.name='my_package.models:Net' or 'path/to/models.py:Net') that any process, e.g. "
                f"`lcnn-jax measure`, can resolve.")
        raise ConfigError(f"The run's model cannot be rebuilt: {e}{hint}") from None
    # looked up on the module, so the run's state is rebuilt with exactly the regularizers prepare_run builds
    regularizers = run_setup.build_regularizers(config.get("regularizers"), info)
    shape = (1,) + tuple(info.image_shape)
    sample = {"image": np.zeros(shape, np.float32), "label": np.zeros((1,), np.int32)}
    key = jax.random.PRNGKey(int(config.seed)) if key is None else key
    eval_kw = mode_kwargs(model, train=False)
    abstract_params = jax.eval_shape(lambda k: model.init(k, jnp.asarray(sample["image"]), **eval_kw), key)["params"]
    tx, _ = make_optimizer(config.optim, 1, abstract_params)
    return model, create_train_state(model, tx, regularizers, key, sample), info


def restore_latest(workdir: str, template: PyTree, what: str = "run") -> PyTree:
    """The newest intact checkpoint of ``workdir`` restored into the structure of ``template``; a damaged newer
    one is skipped with a warning (and left in place: reading never changes a run directory).

    Raises:
      FileNotFoundError: ``workdir`` has no checkpoint.
      RunDirError: checkpoints exist but none can be read, or they hold another network than ``template``.
    """
    check_workdir_path(workdir)
    if not checkpoint_steps(workdir):
        raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: the {what} never saved one.")
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        state, _ = ckpt.restore_newest_intact(template)
        if state is None:
            raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: the {what} never saved one.")
        return state
    finally:
        ckpt.close()


def load_trained(workdir: str):
    """Rebuild ``(config, model, state, dataset_info)`` from a finished or interrupted run's ``workdir``
    (the latest checkpoint), for measurement."""
    config = read_config(workdir)
    model, state, info = template_state(config)
    return config, model, restore_latest(workdir, state), info


def read_results(workdir: str) -> dict | None:
    """``workdir/results.json`` of a finished run, or None (unfinished run, or an unreadable file)."""
    try:
        with open(os.path.join(workdir, "results.json")) as fh:
            out = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    return out if isinstance(out, dict) else None


def is_run_dir(workdir: str) -> bool:
    """Whether ``workdir`` is a directory the library wrote (it holds ``config.json``, ``checkpoints/`` or the lock
    file): a training run, a sweep or a compare run, finished or not."""
    return any(os.path.exists(os.path.join(workdir, m)) for m in _RUN_MARKS)


def check_workdir_is_ours(workdir: str, *, allow_nonempty: bool = False) -> None:
    """Refuse to train into an existing, non-empty directory that is not a run directory (e.g. a project folder or
    a system folder given by mistake): the run's files would be scattered among foreign ones.

    Raises:
      RunDirError: naming a few of the foreign entries and the two ways out (a new path, or
        ``allow_nonempty=True`` / ``--allow_nonempty``).
    """
    check_workdir_path(workdir)
    if allow_nonempty or not os.path.isdir(workdir) or is_run_dir(workdir):
        return
    entries = sorted(os.listdir(workdir))
    if not entries:
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise RunDirError(f"--workdir {workdir!r} already exists and holds other files ({shown}), not a run of this "
                      f"library; nothing was written. Give a new or empty directory (e.g. --workdir runs/my_run), "
                      f"or pass --allow_nonempty (allow_nonempty=True) to train into it anyway.")


def _holder(path: str) -> str:
    try:
        with open(path) as fh:
            info = json.load(fh)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return f"process {info['pid']} on host {info['host']} (since {started})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def workdir_lock(workdir: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``workdir`` (created if missing) while the block runs, so that two trainings of
    one workdir never run at once. The lock is an ``flock`` on :data:`LOCK_FILE`, which the kernel releases when
    the holding process ends in any way (``kill -9`` included): a stale file never blocks a rerun. The file
    records the holder's pid, host and start time for the message of the refused process. ``enabled=False``
    (the processes other than 0 of a multi-process run, which share process 0's run) does nothing. On systems
    without ``fcntl`` the block runs unlocked.

    Raises:
      RunDirError: the workdir is locked by another process (named by pid and host); nothing was written.
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        fcntl = None
    if not enabled or fcntl is None:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunDirError(f"--workdir {workdir!r} is in use by {_holder(path)}, which is training in it; "
                              f"nothing was written. Wait for it to finish (or stop it), or use another "
                              f"--workdir.") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def finished_results(workdir: str, results_file: str = "results.json") -> dict | None:
    """The stored results of a finished run (or sweep, ``results_file="sweep_results.json"``) in ``workdir``:
    its results file exists, reads, and was written at the step of the newest checkpoint. None otherwise (never
    trained, interrupted, or extended since)."""
    steps = checkpoint_steps(workdir)
    try:
        with open(os.path.join(workdir, results_file)) as fh:
            res = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(res, dict) or not steps or res.get("steps") != steps[-1]:
        return None
    return res
