"""User errors: one vocabulary, and one catch at every entry point.

A mistake in the user's flags, files or data, or a fault of the machine
around the run (a full disk, a read-only directory), is a *user error*: the
command prints one line, `error: ...`, naming the flag, file, row or field and
what is wrong with it, and exits with status 1. Anything else is a bug and
keeps its traceback. Set `VOPD_DEBUG=1` to get the traceback of a user error
too (the original exception, with its cause).

What counts as a user error (`is_user_error`):

- `UserError` and its subclasses: `DataError` (a data file: prompts,
  rollouts, evaluation problems, SFT rows, a tokenizer; `MissingFileError`
  when the path is missing or not a file), `TrainingFault`
  (training had to stop: a non-finite loss or gradient norm),
  `MissingDependency` (an optional package the input needs) and, defined
  where they are raised: `config.schema.ConfigError` (a flag or a
  combination of flags), `convert.hf_config.ConversionError` (a checkpoint or
  config the converter refuses) and `training.checkpoint_files.CheckpointError`
  (a checkpoint that is missing, damaged or does not match the run);
- `OSError`s of the environment: no space left, quota, permission denied,
  read-only file system (errno ENOSPC, EDQUOT, EACCES, EPERM, EROFS).

`entry_point` wraps a command's `main` with that catch (a one-line decorator).
`reading_inputs()` marks the code that reads flags and files before anything
is built: a `ValueError` or `OSError` raised inside it is the input's fault
and becomes a `UserError` too.

Under torchrun every rank runs `main`. Before the process group exists every
rank of a node reads the same flags and files and fails the same way, so only
local rank 0 prints (one line per node; the others exit with status 1
silently). After it exists, an error raised identically on every rank
(`same_on_all_ranks=True`, e.g. a non-finite loss every rank sees) is printed
by global rank 0 only; any other error is printed by each failing rank with
`(rank r of w)` appended. torchrun then stops the remaining workers and
prints its own summary of the failed ranks.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys

from . import launch

DEBUG_ENV = "VOPD_DEBUG"

#: errnos that mean the machine around the run, not the code, is at fault.
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS") if hasattr(errno, name))


class UserError(Exception):
    """A mistake in flags, files or data: reported as one line naming the culprit.

    same_on_all_ranks: raised identically on every rank after the process
    group exists, so one rank's line says it all (see the module docstring).
    """

    def __init__(self, message: str, *, same_on_all_ranks: bool = False):
        super().__init__(message)
        self.same_on_all_ranks = same_on_all_ranks


class DataError(UserError, ValueError):
    """A data file that cannot be used; the message names the file, the row
    (line number, or Parquet row) and the field."""


class MissingFileError(DataError, FileNotFoundError):
    """An input path that does not exist, or is a directory where a file is
    expected (also a FileNotFoundError, for callers that catch that)."""


class TrainingFault(UserError, RuntimeError):
    """Training stopped instead of continuing on garbage: a non-finite loss or
    gradient norm, named with the iteration and the data rows involved."""


class MissingDependency(UserError, ImportError):
    """An optional package the given input needs (pyarrow for Parquet, ...)."""


def debug() -> bool:
    """Whether VOPD_DEBUG asks for tracebacks of user errors."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        return True
    return isinstance(exc, UserError)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (an OSError keeps its file name)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def _rank_and_world() -> tuple[int, int] | None:
    """(rank, world size) once a default process group exists, else None."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group either
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank(), dist.get_world_size()


def exit_for(exc: BaseException) -> SystemExit:
    """The SystemExit that reports `exc` on this rank (status 1; the message, if
    this rank prints one, is the `error: ...` line)."""
    message = "error: " + one_line(exc)
    group = _rank_and_world()
    if group is None:
        if launch.local_rank() != 0:
            return SystemExit(1)  # local rank 0 prints the node's line
    elif group[1] > 1:
        rank, world = group
        if getattr(exc, "same_on_all_ranks", False):
            if rank != 0:
                return SystemExit(1)
        else:
            message += f" (rank {rank} of {world})"
    return SystemExit(message)


def entry_point(main):
    """Decorate a command's `main`: a user error becomes one `error: ...` line and
    exit status 1 (traceback only with VOPD_DEBUG=1); everything else propagates."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs just below
            if debug() or not is_user_error(exc):
                raise
            raise exit_for(exc) from None

    return wrapper


@contextlib.contextmanager
def reading_inputs():
    """Code that reads flags and files before anything is built: a ValueError or
    OSError raised here is the input's fault, reported as a user error."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, OSError) as exc:
        raise UserError(one_line(exc)) from exc
