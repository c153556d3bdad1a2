"""Every exception the library raises on purpose, in one place.

A user's mistake (a bad config value, a workdir that cannot be used, a dataset that is not there) is a subclass of
``ValueError`` whose message names the problem and the fix; the CLI turns those into one line and exit code 2.
Failures of a run that the user did not cause but can act on (divergence, a full disk, Ctrl-C) have their own
types, so scripts can catch exactly them. Nothing here imports JAX: every module can import this one.
"""
from __future__ import annotations

import errno

__all__ = ["ConfigError", "RunDirError", "MemberChoiceError", "DatasetError", "TrainingDiverged", "NoSpaceLeft",
           "TrainingInterrupted", "short_error"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


class RunDirError(ConfigError):
    """The ``workdir`` cannot be used as asked: it is a file, it holds a run of another config, or none of its
    checkpoints can be read. Nothing has been written; the message names the problem and the fix."""


class MemberChoiceError(ConfigError):
    """The members asked for (``--member`` / ``--seed`` / ``--method``) do not name exactly what can be measured
    in the workdir; the message lists its members and how to choose."""


class DatasetError(ValueError):
    """A dataset could not be found or read; the message names what was looked for and the fix."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class NoSpaceLeft(OSError):
    """The disk holding the ``workdir`` is full (``errno.ENOSPC``). The last complete checkpoint is kept; free some
    space and rerun the same command to resume."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during the training loop. ``step`` is the last step taken, ``checkpoint_step`` the newest
    checkpoint on disk (None: none yet); rerunning the same command resumes from it. A subclass of
    ``KeyboardInterrupt``, so code that handles that keeps working."""

    def __init__(self, step: int, checkpoint_step: int | None):
        super().__init__(step, checkpoint_step)
        self.step, self.checkpoint_step = int(step), checkpoint_step

    def __str__(self) -> str:
        saved = ("no checkpoint was saved yet, so a rerun starts over" if self.checkpoint_step is None
                 else f"the last checkpoint is step {self.checkpoint_step}")
        return f"interrupted at step {self.step} ({saved}); rerun the same command to resume."


def short_error(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 160 characters), for one-line warnings and messages."""
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:160]}"
