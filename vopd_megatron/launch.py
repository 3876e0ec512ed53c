"""The launcher's environment (torchrun's RANK, WORLD_SIZE, LOCAL_RANK), read in one place.

Why a module of its own: before any process group exists (flag parsing, the
one-line user errors, reading data files) the only way a process knows which
rank it is, and how many there are, is what the launcher put in its
environment. A plain `python` run has none of it and is rank 0 of 1. Once the
process group exists, code takes these from the `ParallelContext` instead.
"""
from __future__ import annotations

import os


def rank() -> int:
    """Global rank (0 without a launcher)."""
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    """Rank within the node: the GPU this process drives (0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def world_size() -> int | None:
    """Processes in the job as the launcher says, or None without a launcher."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def launched() -> bool:
    """Whether a launcher (torchrun) started this process."""
    return "RANK" in os.environ


def rank0_print(message: str) -> None:
    """Print on global rank 0 (works before the process group exists)."""
    if rank() == 0:
        print(message, flush=True)
