"""The ONE training loop: a single run (:func:`lcnn_jax.train.fit`) and a stacked sweep of K members
(:func:`lcnn_jax.train.fit_sweep`) are two sets of :class:`LoopHooks` on :func:`train_loop`.

A run directory is opened once (:func:`open_run`: newest intact checkpoint, ``config.json``, the metrics log
trimmed to the restored step, the wall time already spent), then :func:`train_loop` steps from there to
``setup.total_steps``, logging every ``train.log_every`` steps, evaluating every ``train.eval_every`` and
checkpointing every ``train.checkpoint_every`` steps and at the end. What differs between one network and K
stacked ones (how batches are drawn and placed, the compiled step, what a divergence does, how metrics are
summarised) is in the hooks; everything else, and so every fix to it, is written once here.

What :func:`~lcnn_jax.train.fit` does, in short (a sketch; the hooks are written out in ``single.py``)::

    state, run = open_run(workdir, config, replicate(fresh_state, mesh), start_of=lambda s: int(s.step))
    state, step, seconds = train_loop(state, LoopHooks(...), setup=setup, tcfg=config.train, run=run)
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from typing import Any, Callable, Iterable, Sequence

from lcnn_jax.errors import NoSpaceLeft, TrainingInterrupted
from lcnn_jax.io import MetricsLog, is_no_space, write_json_atomic
from lcnn_jax.regularizers.base import Regularizer
from lcnn_jax.train.checkpoint import Checkpointer, kept_message
from lcnn_jax.train.distributed import is_primary
from lcnn_jax.train.rundir import finished_results, previous_wall_time
from lcnn_jax.types import Array

_log = logging.getLogger(__name__)

__all__ = ["LoopHooks", "OpenRun", "open_run", "already_finished", "train_loop", "progress_bar",
           "apply_epoch_end_hooks"]


@dataclasses.dataclass(frozen=True)
class LoopHooks:
    """What a caller of :func:`train_loop` supplies: the parts that differ between one run and a stacked sweep.

    Attributes:
      epoch_batches: ``(epoch, start_batch) -> iterable of device batches`` (``start_batch`` > 0 on resume).
      train_step: ``(state, batch) -> (state, metrics)``, usually jitted and donating the state.
      epoch_end: ``(state, epoch) -> state`` after the last step of an epoch (the regularizers' hooks).
      check: ``(state, step) -> None`` at every log and checkpoint step: a single run raises on divergence,
        a sweep only notes a diverged member.
      summarize: ``metrics -> (record, progress_postfix)``: the metrics log record and the progress bar text.
      run_eval: ``(state, step) -> dict``: a mid-run evaluation (also logged by the hook).
    """

    epoch_batches: Callable[[int, int], Iterable]
    train_step: Callable[[Any, Any], tuple]
    epoch_end: Callable[[Any, int], Any]
    check: Callable[[Any, int], None]
    summarize: Callable[[Any], tuple]
    run_eval: Callable[[Any, int], dict]


@dataclasses.dataclass
class OpenRun:
    """An opened run directory: its :class:`~lcnn_jax.train.checkpoint.Checkpointer` (closed by
    :func:`train_loop`), the metrics log, the step to start from, whether a checkpoint was restored and the
    training wall time spent before (read from the log, so a resumed run reports the total)."""

    workdir: str
    ckpt: Checkpointer
    log: MetricsLog
    start: int
    resumed: bool
    elapsed_before: float


def open_run(workdir: str, config, state, *, start_of: Callable[[Any], int]) -> tuple[Any, OpenRun]:
    """Open ``workdir`` for training ``state`` (already placed on its devices: orbax restores into the template's
    sharding): restore the newest intact checkpoint (damaged ones are moved to ``damaged_checkpoints/`` with a
    warning), write ``config.json`` (process 0), open ``metrics.jsonl`` with the records after the restored step
    dropped. ``start_of(state)`` reads the step counter (a sweep's is stacked). Returns ``(state, run)``.

    Raises:
      RunDirError: checkpoints exist but none can be restored, or they hold another network.
    """
    ckpt = Checkpointer(workdir, max_to_keep=int(config.train.get("keep_checkpoints", 2)))
    try:
        restored, step = ckpt.restore_newest_intact(state, quarantine=True)
    except BaseException:
        ckpt.close()
        raise
    state = state if restored is None else restored
    primary = is_primary()
    if primary:
        write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    start = int(start_of(state))
    log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), resume_step=start if step is not None else None,
                     write=primary)
    elapsed = previous_wall_time(workdir) if start else 0.0
    return state, OpenRun(workdir, ckpt, log, start, step is not None, elapsed)


def already_finished(run: OpenRun, total_steps: int, results_file: str, what: str) -> dict | None:
    """The stored results of a finished run (``{..., "already_finished": True}``), ``run.ckpt`` then closed, or
    None (train on). Finished: the newest *intact* checkpoint (what :func:`open_run` restored, so a damaged final
    checkpoint is retrained) is the last step, and ``results_file`` was written at that step
    (:func:`~lcnn_jax.train.rundir.finished_results`). Nothing is written either way."""
    done = finished_results(run.workdir, results_file)
    if done is None or not run.resumed or not run.start == total_steps == done.get("steps"):
        return None
    run.ckpt.close()
    _log.warning("%s holds this %s, finished at step %d; nothing was trained or written.", run.workdir, what,
                 run.start)
    return {**done, "already_finished": True}


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train"):
    """A tqdm bar over steps (``tqdm.auto``: a widget in Jupyter, text in a terminal); ``enabled=False`` hides it."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc=desc, unit="step")


def train_loop(state, hooks: LoopHooks, *, setup, tcfg, run: OpenRun, desc: str = "train"):
    """Train from ``run.start`` to ``setup.total_steps`` and close ``run.ckpt``; returns
    ``(state, step, train_wall_time_s)`` (the time before an interruption included).

    Every ``tcfg.log_every`` steps (and at the last step) the metrics record goes to the log with ``step``,
    ``epoch``, ``learning_rate`` and ``wall_time_s``; every ``tcfg.eval_every`` steps (0: never) ``run_eval``;
    every ``tcfg.checkpoint_every`` steps and at the end a checkpoint, after ``check``. A progress bar (process 0,
    ``tcfg.progress``) shows the step and the summary.

    Raises:
      TrainingInterrupted: Ctrl-C; the message names the step and the checkpoint a rerun resumes from.
      NoSpaceLeft: the disk is full (metrics log or checkpoint); the last complete checkpoint is kept.
    """
    start = run.start
    bar = progress_bar(setup.total_steps, start, bool(tcfg.get("progress", True)) and is_primary(), desc=desc)
    try:
        spe, total_steps = setup.steps_per_epoch, setup.total_steps
        log_every = int(tcfg.get("log_every", 50))
        eval_every = int(tcfg.get("eval_every", 0) or 0)
        ckpt_every = int(tcfg.get("checkpoint_every", 500))
        t_train = time.time()
        step = start
        try:
            for epoch in itertools.count(start // spe):
                if step >= total_steps:
                    break
                for batch in hooks.epoch_batches(epoch, step - epoch * spe):
                    state, metrics = hooks.train_step(state, batch)
                    step += 1
                    if step % spe == 0:
                        state = hooks.epoch_end(state, epoch)
                    bar.update(1)
                    if step % log_every == 0 or step == total_steps:
                        hooks.check(state, step)
                        rec, postfix = hooks.summarize(metrics)
                        rec.update(step=step, epoch=epoch, learning_rate=float(setup.schedule(step - 1)),
                                   wall_time_s=run.elapsed_before + time.time() - t_train)
                        run.log.write(rec)
                        bar.set_postfix(**postfix)
                    if eval_every and step % eval_every == 0 and step != total_steps:
                        hooks.run_eval(state, step)
                    if step % ckpt_every == 0 or step == total_steps:
                        hooks.check(state, step)
                        run.ckpt.save(step, state)
                    if step >= total_steps:
                        break
            hooks.check(state, step)
        except KeyboardInterrupt:
            raise TrainingInterrupted(step, run.ckpt.latest_step()) from None
        except OSError as e:  # the metrics log or a checkpoint hit a full disk
            if isinstance(e, NoSpaceLeft) or not is_no_space(e):
                raise
            raise NoSpaceLeft(f"no space left on {run.ckpt.workdir} at step {step}. "
                              f"{kept_message(run.ckpt.latest_step())}") from None
        return state, step, run.elapsed_before + time.time() - t_train
    finally:
        bar.close()
        run.ckpt.close()


def apply_epoch_end_hooks(reg_state: tuple, regularizers: Sequence[Regularizer], accuracy: Array,
                          epoch: int) -> tuple:
    """One run's regularizer states after their ``epoch_end(state, accuracy, epoch)`` hooks (identity where a
    regularizer has none)."""
    return tuple(r.epoch_end(s, accuracy, epoch) if r.epoch_end is not None else s
                 for r, s in zip(regularizers, reg_state))
