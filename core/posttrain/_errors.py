"""The errors a user can cause (light: imports nothing heavy).

Every error that bad input can provoke -- a config value, a data file or row, a checkpoint, a
reward function, a method name or an opt-in -- derives from :class:`PosttrainError`. The command
line catches that one class and prints the message as one line with exit status 2
(``POSTTRAIN_DEBUG=1`` shows the traceback instead). Each subclass keeps the built-in base it had
before (``ConfigError`` is a ``ValueError``, ``RewardFunctionError`` a ``RuntimeError``, a missing
checkpoint a ``FileNotFoundError``), so ``except ValueError`` in user code still works.

A plugin raises these (or its own subclasses) for its users' mistakes; the message names the row,
column or field and the fix.
"""

from __future__ import annotations

__all__ = ["PosttrainError", "DataError", "DataNotFoundError", "CheckpointError", "CheckpointNotFoundError"]


class PosttrainError(Exception):
    """Base of every error a user's input can cause; the CLI prints it as one line (exit status 2)."""


class DataError(PosttrainError, ValueError):
    """A data file, row or column is unusable; the message names the file, row or column and the fix."""


class DataNotFoundError(DataError, FileNotFoundError):
    """``dataset_name`` looks like a local path that does not exist."""


class CheckpointError(PosttrainError, RuntimeError):
    """A checkpoint cannot be resumed: written by another method, or incomplete; the message says what to do."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """``resume_from_checkpoint`` names no checkpoint (a missing directory, or one that is not a checkpoint)."""
