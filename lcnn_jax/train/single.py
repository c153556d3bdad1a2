"""``fit``: train one network (a single run) from a config into a run directory, resumably.

One network's hooks on the library's one loop (:mod:`lcnn_jax.train.loop`): the global batch placed on the
``("data",)`` mesh, the step jitted with the state replicated and donated, a divergence that stops the run with
the last good checkpoint kept, and a final evaluation that says whether the network is dead.

Example::

    from lcnn_jax import train
    from experiments.configs import quickstart
    results = train.fit(quickstart.get_config(), workdir="/tmp/run")
"""
from __future__ import annotations

import logging
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcnn_jax.errors import NoSpaceLeft, RunDirError, TrainingDiverged, TrainingInterrupted
from lcnn_jax.io import is_no_space, write_json_atomic
from lcnn_jax.regularizers.base import Regularizer
from lcnn_jax.train.distributed import (is_primary, jit_eval_step, jit_train_step, place_global, replicate, to_host)
from lcnn_jax.train.evaluation import dead_network_report, evaluate
from lcnn_jax.train.loop import LoopHooks, already_finished, apply_epoch_end_hooks, open_run, train_loop
from lcnn_jax.train.rundir import (check_run_dir, check_workdir_is_ours, checkpoint_steps, show_value, workdir_lock)
from lcnn_jax.train.setup import prepare_run
from lcnn_jax.train.state import TrainState, create_train_state

__all__ = ["fit", "epoch_end_hooks"]

_log = logging.getLogger(__name__)


def fit(config, workdir: str, *, extend: bool = False, allow_nonempty: bool = False) -> dict:
    """Train the model described by ``config`` and write everything to ``workdir``.

    Files: ``config.json`` (resolved config), ``metrics.jsonl`` (every ``train.log_every`` steps: step, loss,
    accuracy, grad_norm, learning_rate, wall_time_s, regularizer metrics; and ``eval/...`` records),
    ``checkpoints/`` (orbax, every ``train.checkpoint_every`` steps and at the end) and ``results.json``.

    Rerunning with the same ``workdir`` resumes from the newest intact checkpoint (a damaged one is moved to
    ``damaged_checkpoints/`` with a warning; half a line at the end of ``metrics.jsonl`` is dropped) and ends with
    the same metrics as an uninterrupted run. A rerun with a different config is refused before anything is
    written (:func:`~lcnn_jax.train.rundir.check_run_dir`); ``extend=True`` accepts a longer
    ``train.num_epochs`` / ``train.num_steps`` and trains on from the last checkpoint, under the learning-rate
    schedule of the new length (so a cosine schedule jumps back up: the result is not that of a run trained for
    the new length from the start). Rerunning a *finished* run changes nothing on disk: it returns the stored
    results with ``already_finished: True`` added (:func:`~lcnn_jax.train.rundir.finished_results`).

    The workdir is locked while training (:func:`~lcnn_jax.train.rundir.workdir_lock`): a second ``fit`` of the
    same workdir is refused, naming the process that trains there. An existing non-empty directory that the
    library did not write is refused unless ``allow_nonempty=True``. A model named by a relative file path
    (``model.name="models.py:Net"``) is stored with its absolute path, so the run can be measured from anywhere.

    ``results.json`` has ``dead: true`` with a ``warning`` (also logged, and in the last eval record of the log)
    when the trained network gives one output for every input or one class for 99 % of the training images
    (:func:`~lcnn_jax.train.evaluation.dead_network`): a failure that does not show up as a NaN. Returns the
    results.

    Raises:
      ConfigError: a bad configuration value (message names the key).
      RunDirError: ``workdir`` is a file, holds a run of another config or foreign files, is being trained by
        another process, or has no readable checkpoint.
      lcnn_jax.data.DatasetError: the dataset cannot be found.
      TrainingDiverged: the loss became non-finite (the last good checkpoint stays in ``workdir``).
      TrainingInterrupted: Ctrl-C (a ``KeyboardInterrupt``); rerunning resumes.
      NoSpaceLeft: the disk is full (an ``OSError``); the last complete checkpoint is kept, rerunning resumes.
    """
    from lcnn_jax.configs import resolve_paths, validate_config

    t_start = time.time()
    config = resolve_paths(config)
    validate_config(config)
    changes = check_run_dir(config, workdir, extend=extend)
    check_workdir_is_ours(workdir, allow_nonempty=allow_nonempty)
    setup = prepare_run(config)  # data, model and regularizer checks: nothing is written before they pass
    done = checkpoint_steps(workdir)
    if done and done[-1] > setup.total_steps:
        raise RunDirError(f"--workdir {workdir!r} holds a checkpoint of step {done[-1]}, past the "
                          f"{setup.total_steps} steps this config trains; nothing was changed. Extending needs "
                          f"more steps (train.num_epochs / train.num_steps), or use a new --workdir.")
    with workdir_lock(workdir, enabled=is_primary()):
        return _train(config, workdir, changes, t_start, setup)


def _train(config, workdir: str, changes: dict, t_start: float, setup) -> dict:
    """:func:`fit` after its checks, with the workdir locked."""
    from lcnn_jax import data as data_lib

    os.makedirs(workdir, exist_ok=True)
    tcfg, mesh, train, test = config.train, setup.mesh, setup.train, setup.test

    state = create_train_state(setup.model, setup.tx, setup.regularizers, jax.random.PRNGKey(int(config.seed)),
                               setup.sample)
    state, run = open_run(workdir, config, replicate(state, mesh), start_of=lambda s: int(s.step))
    finished = None if changes else already_finished(run, setup.total_steps, "results.json", "run")
    if finished is not None:
        return finished
    if changes:
        _log.warning("extending the run in %s from step %d: %s.", workdir, run.start,
                     ", ".join(f"{k} {show_value(a)} -> {show_value(b)}" for k, (a, b) in changes.items()))

    train_step = jit_train_step(setup.step_fn, mesh)
    eval_step = jit_eval_step(setup.eval_fn, mesh)
    ev_bs = int(tcfg.get("eval_batch_size", 500))
    batch_sharding = NamedSharding(mesh, P("data"))

    def epoch_batches(epoch, start_batch):  # every process draws the global batch and places its devices' part
        for b in data_lib.batches(train, setup.batch_size, seed=int(config.seed), epoch=epoch, shuffle=True,
                                  drop_remainder=True, start_batch=start_batch):
            yield place_global(b, batch_sharding)

    def run_eval(st, step, extra=None):
        res, spread = {}, {}
        for name, split in (("train", train), ("test", test)):
            r = evaluate(st, eval_step, split.images, split.labels, batch_size=ev_bs, mesh=mesh)
            res.update({f"{name}_accuracy": r["accuracy"], f"{name}_loss": r["loss"]})
            spread[name] = (r["logit_spread"], r["logit_scale"], r["pred_counts"])
        dead = extra(res, spread) if extra else {}
        run.log.write({"step": step, "kind": "eval", **res, **dead})
        return {**res, **dead}

    def check_finite(st, step):
        bad = int(st.diverged_at)
        if bad >= 0:
            last = run.ckpt.latest_step()
            raise TrainingDiverged(
                f"The training loss became NaN/inf at step {bad}. Training stopped; the last good checkpoint "
                f"(step {last}) is kept in {os.path.join(workdir, 'checkpoints')}. Lower optim.learning_rate, "
                f"the regularizer coefficients, or clip gradients (optim.clip_grad_norm=1.0), then rerun in a "
                f"fresh --workdir.")

    def summarize(metrics):
        rec = {k: float(v) for k, v in jax.device_get(metrics).items()}
        return rec, {"loss": f"{rec['loss']:.3f}", "acc": f"{rec['accuracy']:.3f}"}

    hooks = LoopHooks(epoch_batches=epoch_batches, train_step=train_step,
                      epoch_end=lambda st, epoch: epoch_end_hooks(st, setup.regularizers, setup.steps_per_epoch,
                                                                  epoch, mesh),
                      check=check_finite, summarize=summarize, run_eval=run_eval)
    state, step, train_time = train_loop(state, hooks, setup=setup, tcfg=tcfg, run=run)

    def health(res, spread):  # the final evaluation also says whether the network is dead
        report = dead_network_report(*spread["train"], train_accuracy=res["train_accuracy"],
                                     num_classes=setup.info.num_classes,
                                     learning_rate=float(config.optim.learning_rate))
        if report["dead"]:
            _log.warning("%s", report["warning"])
        return report

    try:
        final = run_eval(state, step, extra=health)
        results = {**final, "steps": step, "epochs": step / setup.steps_per_epoch, "wall_time_s": train_time,
                   "total_time_s": time.time() - t_start, "num_devices": int(mesh.devices.size),
                   "num_processes": int(jax.process_count()),
                   "num_train": len(train.images), "num_test": len(test.images),
                   "devices": str(jax.devices()[0].platform), "config": config.to_dict()}
        if changes:
            results["extended_from_step"] = run.start
        if is_primary():
            write_json_atomic(os.path.join(workdir, "results.json"), results)
    except KeyboardInterrupt:
        raise TrainingInterrupted(step, step) from None
    except OSError as e:
        if not is_no_space(e):
            raise
        raise NoSpaceLeft(f"no space left on {os.path.abspath(workdir)} while writing the results of step {step}; "
                          f"the final checkpoint is kept: free some space and rerun the same command to write "
                          f"them.") from None
    return results


def epoch_end_hooks(state: TrainState, regularizers: Sequence[Regularizer], steps_per_epoch: int, epoch: int,
               mesh: Mesh) -> TrainState:
    """Run the regularizers' ``epoch_end`` hooks with the epoch's mean batch training accuracy, then reset the
    accumulator. Both live in the (checkpointed) state, so a resumed run takes the same decisions."""
    if not any(r.epoch_end is not None for r in regularizers):
        return state.replace(epoch_accuracy_sum=replicate(np.zeros((), np.float32), mesh))
    # On the host (every process computes the same values), so the hooks never mix arrays of one process's
    # devices with arrays spanning all processes.
    reg_state, acc_sum = to_host((state.reg_state, state.epoch_accuracy_sum))
    acc = jnp.asarray(acc_sum) / steps_per_epoch
    reg_state = apply_epoch_end_hooks(jax.tree.map(jnp.asarray, reg_state), regularizers, acc, epoch)
    return state.replace(reg_state=replicate(reg_state, mesh),
                         epoch_accuracy_sum=replicate(np.zeros((), np.float32), mesh))
