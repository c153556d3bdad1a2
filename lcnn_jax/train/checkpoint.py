"""Checkpoints: a thin wrapper over orbax that survives Ctrl-C, damaged files and a full disk.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil

import jax
import numpy as np

from lcnn_jax.errors import NoSpaceLeft, RunDirError, short_error
from lcnn_jax.io import is_no_space
from lcnn_jax.train.distributed import is_primary, sync_processes
from lcnn_jax.train.state import TrainState

_log = logging.getLogger(__name__)

__all__ = ["TMP_MARK", "Checkpointer", "kept_message", "remove_unfinished_checkpoints"]


@contextlib.contextmanager
def _quiet_orbax():
    """Silence orbax's own error logging (the ``absl`` logger) while probing checkpoints or saving: the same
    problem reaches the caller as one exception, which the caller turns into one message."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _leaf_signature(tree) -> list[tuple]:
    """Sorted ``(shape, dtype)`` of every non-scalar array leaf: compares a checkpoint's metadata with a template
    state without depending on how orbax names the containers. Scalars (step counters, coefficients) are left
    out: a fresh state may hold them as Python numbers, and the parameter shapes are what tell configs apart."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return sorted((tuple(int(d) for d in x.shape), str(np.dtype(x.dtype))) for x in leaves
                  if hasattr(x, "shape") and hasattr(x, "dtype") and len(x.shape) > 0)


TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a step folder whose save never finished


class Checkpointer:
    """Thin wrapper over an orbax ``CheckpointManager`` in ``workdir/checkpoints`` (synchronous saves, so a
    checkpoint on disk is complete before training goes on; orbax writes each step to a temporary folder and
    renames it, so an interruption never leaves a half checkpoint under a step's name).

    A *writer* (``read_only=False``: training) first removes the temporary folders of saves that never finished
    (Ctrl-C, a full disk). A reader (measuring) changes nothing on disk. :meth:`restore_newest_intact` falls
    back past damaged checkpoints (truncated or emptied files); :meth:`save` turns a full disk into
    :class:`NoSpaceLeft`.
    """

    def __init__(self, workdir: str, max_to_keep: int = 2, *, read_only: bool = False):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        if not read_only:
            if is_primary():  # one process cleans up; the others wait, so no one lists a folder being removed
                remove_unfinished_checkpoints(self.directory)
            sync_processes("lcnn_jax.checkpointer.cleanup")
        with _quiet_orbax():  # read_only makes orbax warn that it ignores the save options
            opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                                enable_async_checkpointing=False, read_only=read_only)
            self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                                 item_handlers=ocp.StandardCheckpointHandler())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState) -> None:
        """Save ``state`` as step ``step`` and wait until it is on disk.

        Raises:
          NoSpaceLeft: the disk is full; the unfinished folder is removed and the previous checkpoints are kept.
        """
        self._check_free_space(step, state)
        try:
            with _quiet_orbax():
                self.manager.save(int(step), args=self._ocp.args.StandardSave(state), force=True)
                self.manager.wait_until_finished()
        except Exception as e:
            if not is_no_space(e):
                raise
            remove_unfinished_checkpoints(self.directory)
            raise NoSpaceLeft(f"no space left on {self.workdir} while saving the checkpoint of step {step}. "
                              f"{kept_message(self.latest_step())}") from None

    def _check_free_space(self, step: int, state) -> None:
        """Refuse a save the disk cannot hold (the state's bytes plus 1 MiB of metadata) before orbax starts
        writing: a save that fails halfway leaves a temporary folder and prints errors from orbax's I/O threads
        that no caller can catch. A disk that fills up during the save is still caught in :meth:`save`."""
        need = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state)) + 2 ** 20
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise NoSpaceLeft(f"no space left on {self.workdir}: the checkpoint of step {step} needs about "
                              f"{need / 2 ** 20:.1f} MiB, {free / 2 ** 20:.1f} MiB are free. "
                              f"{kept_message(self.latest_step())}")

    def restore(self, state_like: TrainState, step: int | None = None) -> TrainState:
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, state_like)
        with _quiet_orbax():
            return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def restore_newest_intact(self, state_like: TrainState, *, quarantine: bool = False):
        """``(state, step)`` from the newest checkpoint that restores, or ``(None, None)`` when there is none.

        A checkpoint that cannot be read (truncated or emptied files) is skipped with a warning naming it; with
        ``quarantine`` (training, which will save that step again) it is moved to ``workdir/damaged_checkpoints/``.
        A checkpoint that reads but holds arrays of other shapes than ``state_like`` is not damaged: it belongs to
        another config, and :class:`RunDirError` says so.

        Raises:
          RunDirError: checkpoints exist but none can be restored, or they hold another network.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        want, damaged = _leaf_signature(state_like), []
        for step in steps:
            try:
                with _quiet_orbax():
                    meta = self.manager.item_metadata(step)
                tree = getattr(meta, "tree", meta)
                if tree is None:
                    raise ValueError("its metadata is missing")
            except Exception as e:  # orbax raises JSONDecodeError, ValueError, FileNotFoundError ... here
                damaged.append((step, _damage(os.path.join(self.directory, str(step)), e)))
                continue
            if _leaf_signature(tree) != want:
                raise RunDirError(
                    f"The checkpoint of step {step} in {self.directory} holds a network of other shapes than the "
                    f"config describes (another model, width, optimizer or regularizer). Nothing was changed. "
                    f"Use a new --workdir for this config, or the config this run was trained with "
                    f"({os.path.join(self.workdir, 'config.json')}).")
            try:
                state = self.restore(state_like, step)
            except Exception as e:
                damaged.append((step, _damage(os.path.join(self.directory, str(step)), e)))
                continue
            self._report_damaged(damaged, step, quarantine)
            return state, step
        if damaged:
            listed = "; ".join(f"step {s}: {e}" for s, e in damaged)
            raise RunDirError(
                f"No checkpoint in {self.directory} can be read ({listed}). The files are damaged; nothing was "
                f"changed. Delete {self.directory} to train this workdir from scratch, or use a new --workdir.")
        return None, None

    def _report_damaged(self, damaged: list, used: int, quarantine: bool) -> None:
        if quarantine:  # every process has finished reading before process 0 moves folders away
            sync_processes("lcnn_jax.checkpointer.quarantine")
        for step, e in damaged:
            where = ""
            if quarantine and is_primary():
                dest = os.path.join(self.workdir, "damaged_checkpoints", str(step))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                if os.path.exists(dest):
                    shutil.rmtree(dest)
                shutil.move(os.path.join(self.directory, str(step)), dest)
                where = f" (moved to {dest})"
            _log.warning("checkpoint step %d in %s is damaged and was skipped%s: %s; using step %d, the newest "
                         "intact checkpoint.", step, self.directory, where, e, used)
        if quarantine:
            sync_processes("lcnn_jax.checkpointer.quarantined")
        if damaged and quarantine:
            self.manager.reload()

    def close(self) -> None:
        self.manager.close()


def _damage(step_dir: str, e: BaseException) -> str:
    """One line on why a checkpoint folder cannot be read: "no files" for an emptied folder (orbax's own message
    then speaks of handler registries), else the error's type and first line."""
    has_files = any(files for _, _, files in os.walk(step_dir))
    return "its folder holds no files" if not has_files else short_error(e)


def kept_message(step: int | None) -> str:
    """The second half of a full-disk message: what is kept and how to go on."""
    if step is None:
        return "No checkpoint was saved yet: free some space and rerun the same command to start again."
    return f"The last complete checkpoint (step {step}) is kept: free some space and rerun the same command to resume."


def remove_unfinished_checkpoints(directory: str) -> list[str]:
    """Delete the orbax temporary folders (``<step>.orbax-checkpoint-tmp...``) of saves that never finished
    (Ctrl-C or a full disk during a save), so they neither fill the disk nor confuse the next save; returns their
    names. Only a writer calls this: a concurrent save of the same run would lose its folder."""
    try:
        names = [n for n in os.listdir(directory) if TMP_MARK in n]
    except (FileNotFoundError, NotADirectoryError):
        return []
    for name in names:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    if names:
        _log.warning("removed %d unfinished checkpoint folder(s) in %s: %s (a save that was interrupted).",
                     len(names), directory, ", ".join(sorted(names)))
    return names
