"""Checkpoint directories on disk: their names, the tracker, and whether an iteration is intact.

Filesystem only (no process group, no model), so the same code serves the
collective load (rank 0 decides, then broadcasts), the preflight checks that run
before anything is built, and the converters.

A checkpoint directory `load_dir/iter_0000042/` is a megatron-core torch_dist
checkpoint, written by vopd-train, vopd-convert or Megatron-LM itself. It is
*intact* when every file a load will read is there and whole:

- megatron-core's `metadata.json` (written after all shards) and torch_dist's
  `.metadata` (the index of every stored chunk) exist and parse;
- every data file `.metadata` points into exists and is at least as long as the
  last chunk it holds (a deleted or truncated shard is named here, instead of a
  bare `EOFError` in the middle of a load);
- the common state (args, iteration, scheduler, ...) unpickles;
- a vopd_megatron save also has its completion marker, written last (a
  Megatron-LM save has none: its tracker moves only after every rank wrote).

Corrupted bytes inside a shard of the right length are not detected here (that
would mean reading the whole checkpoint); the load itself then fails with the
checkpoint's path in the message.

Which iteration loads: the one the tracker names if it is intact; otherwise,
or without a tracker, the newest intact `iter_*` directory, with every skipped
directory reported and why (`Found.notes`). A save that never finished (no
`metadata.json`/marker) is routine after a crash; a finished save whose files
are broken is *damaged* (`Found.damaged`), which callers report loudly.
`fallback=False` refuses to load anything older than the tracker's iteration.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from ..errors import UserError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"  # Megatron-LM's name
COMPLETE_MARKER = "vopd_checkpoint_complete.json"
FORMAT_VERSION = 1
STAGING_SUFFIX = ".incomplete"
RELEASE_DIR = "release"  # Megatron-LM's tracker may say "release" (iteration 0, no optimizer)
ITER_DIR = re.compile(r"^iter_(\d{7,})$")



def short_error(exc: BaseException, limit: int = 200) -> str:
    """An exception's text on one line, cut at `limit` characters (torch's unpickling errors run
    to a page of advice that would bury the file's name)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."

class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, damaged, or does not match the model or the run
    (a user error)."""


def checkpoint_dir(save_dir: str, iteration: int) -> str:
    """`save_dir/iter_0000042` for iteration 42."""
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def iteration_dirs(load_dir: str) -> list[int]:
    """Iterations with an `iter_*` directory under `load_dir`, newest first."""
    if not os.path.isdir(load_dir):
        return []
    return sorted((int(m.group(1)) for m in map(ITER_DIR.match, os.listdir(load_dir)) if m), reverse=True)


def holds_checkpoints(load_dir: str) -> bool:
    """`load_dir` has a tracker, an iteration directory or an unfinished save (intact or not)."""
    if not os.path.isdir(load_dir):
        return False
    return any(name == TRACKER_FILENAME or name == RELEASE_DIR or ITER_DIR.match(name)
               or name.endswith(STAGING_SUFFIX) for name in os.listdir(load_dir))


@dataclass
class Inspection:
    """What `inspect_iteration` found: `problem` is None for an intact directory."""

    problem: str | None = None
    damaged: bool = False  # a finished save with broken files (not merely unfinished)
    common: dict | None = None  # the common state, when it could be read


def inspect_iteration(path: str) -> Inspection:
    """Check one iteration directory (see the module docstring); the problem names the file."""
    config, index = os.path.join(path, "metadata.json"), os.path.join(path, ".metadata")
    if not os.path.isdir(path):
        return Inspection(f"{path} is missing")
    if not os.path.isfile(config):
        return Inspection(f"{path} is an unfinished save (no metadata.json, which megatron-core writes last)")
    if not os.path.isfile(index):
        return Inspection(f"{index} is missing", damaged=True)
    try:
        with open(config) as f:
            json.load(f)
    except (OSError, ValueError) as exc:
        return Inspection(f"{config} is damaged ({exc})", damaged=True)
    problem = _check_data_files(path, index)
    if problem:
        return Inspection(problem, damaged=True)
    try:
        common = read_common_state(path)
    except CheckpointError as exc:
        return Inspection(str(exc), damaged=True)
    if "vopd" in common and not os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
        return Inspection(f"{path} is an unfinished vopd_megatron save (no {COMPLETE_MARKER})", common=common)
    return Inspection(common=common)


def _check_data_files(path: str, index: str) -> str | None:
    """Every file torch_dist's index points into exists and holds the bytes it points at."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as exc:  # a truncated or overwritten pickle: any unpickling error
        return f"{index} is damaged and cannot be read ({type(exc).__name__}: {short_error(exc)})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{file} is missing (listed in {index})"
        actual = os.path.getsize(file)
        if actual < size:
            return f"{file} is truncated: {actual} bytes, {index} needs {size}"
    return None


def read_common_state(path: str) -> dict:
    """The checkpoint's common (non-sharded) state: args, iteration, scheduler, our `vopd` info."""
    from megatron.core.dist_checkpointing import load_common_state_dict

    try:
        common = load_common_state_dict(path)
    except Exception as exc:
        raise CheckpointError(f"the common state of {path} cannot be read ({type(exc).__name__}: {short_error(exc)})") \
            from exc
    if not isinstance(common, dict):
        raise CheckpointError(f"the common state of {path} is a {type(common).__name__}, not a dict")
    return common


def read_tracker(load_dir: str, notes: list[str]) -> int | str | None:
    """The tracker's iteration, "release", or None (missing or unreadable: noted)."""
    path = os.path.join(load_dir, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as exc:
        notes.append(f"{path} cannot be read ({exc})")
        return None
    if text == RELEASE_DIR:
        return RELEASE_DIR
    try:
        return int(text)
    except ValueError:
        notes.append(f"{path} holds {text!r}, not an iteration number")
        return None


@dataclass
class Found:
    """The iteration to load (`path` None: nothing loadable) and what was skipped on the way."""

    path: str | None = None
    iteration: int | None = None
    common: dict | None = None
    notes: list[str] = field(default_factory=list)  # every skipped directory and why
    damaged: list[str] = field(default_factory=list)  # the notes about damaged (finished) saves


def find_latest(load_dir: str, fallback: bool = True) -> Found:
    """The iteration a load of `load_dir` reads (module docstring). Raises CheckpointError only
    with `fallback=False`, when the tracker's iteration (or the newest finished one) is not intact."""
    found = Found()
    if not os.path.isdir(load_dir):
        return found
    tracker = read_tracker(load_dir, found.notes)
    candidates = [tracker] if tracker is not None else []
    candidates += [i for i in iteration_dirs(load_dir) if i != tracker]
    for candidate in candidates:
        release = candidate == RELEASE_DIR
        path = os.path.join(load_dir, RELEASE_DIR) if release else checkpoint_dir(load_dir, candidate)
        seen = inspect_iteration(path)
        if seen.problem is None:
            found.path, found.common = path, seen.common
            found.iteration = 0 if release else candidate
            break
        note = seen.problem
        if candidate == tracker:
            note = f"{TRACKER_FILENAME} names iteration {candidate}, but {seen.problem}"
        if not fallback and (candidate == tracker or seen.damaged):
            raise CheckpointError(f"{note} (and falling back to an older iteration is switched off)")
        found.notes.append(note)
        if seen.damaged or candidate == tracker:
            found.damaged.append(note)
    found.notes += [f"{os.path.join(load_dir, name)} is an unfinished save"
                    for name in sorted(os.listdir(load_dir)) if name.endswith(STAGING_SUFFIX)]
    return found


def latest_iteration(load_dir: str) -> int | None:
    """The iteration a load of `load_dir` would read, or None if it holds nothing intact."""
    return find_latest(load_dir).iteration


def is_complete(path: str) -> bool:
    """An intact, finished checkpoint directory (module docstring)."""
    return inspect_iteration(path).problem is None
