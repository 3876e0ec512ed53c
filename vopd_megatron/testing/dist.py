"""A pool of spawned gloo ranks that is started once and runs many cases.

Each `torchrun` launch costs seconds of imports before any work, while one
tiny distributed case takes milliseconds. `GlooPool(world_size)` spawns the
ranks once, joins them into a gloo process group, and then runs any number
of cases: `pool.run(fn, *args)` calls `fn(*args)` on every rank and returns
the per-rank results in rank order. `fn` must be importable by name (a
module-level function), like any target of `multiprocessing` spawn.

A case that raises on any rank raises `RankError` in the caller with that
rank's traceback; ranks left waiting in a collective by the failure are torn
down and the pool restarts on its next use, so one failing case does not
poison the next.
"""
from __future__ import annotations

import atexit
import os
import queue
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..net import free_local_port


class RankError(RuntimeError):
    """A case failed on one or more ranks; the message carries their tracebacks."""


def _worker(rank, world_size, port, tasks, results, collective_timeout_s, env=None):
    os.environ.update(env or {})  # before any case imports what reads it (e.g. TRITON_INTERPRET)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    # Megatron-Core reads these when it builds its own groups.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    from vopd_megatron.megatron import cpu_compat

    cpu_compat.enable()
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout=timedelta(seconds=collective_timeout_s),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        groups_before = _process_groups()
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # report everything, keep serving
            results.put((rank, False, traceback.format_exc()))
        _destroy_new_groups(groups_before)
    dist.destroy_process_group()


def _process_groups() -> set:
    from torch.distributed import distributed_c10d as c10d

    return set(getattr(getattr(c10d, "_world", None), "pg_map", {}) or {})


def _destroy_new_groups(before: set) -> None:
    """Destroy the process groups a case created (Megatron's
    initialize_model_parallel makes dozens per call and destroy_model_parallel
    only drops its references): each gloo group owns threads, and hundreds of
    cases would otherwise leave thousands of them behind in one worker."""
    for group in _process_groups() - before:
        if group is not dist.group.WORLD:
            dist.destroy_process_group(group)


class GlooPool:
    """`world_size` spawned ranks in one gloo process group, reused across cases."""

    def __init__(self, world_size: int, case_timeout_s: float = 300.0, collective_timeout_s: float = 60.0,
                 env: dict[str, str] | None = None):
        """env: extra environment variables of the ranks (set before any case runs)."""
        self.world_size = world_size
        self.env = dict(env or {})
        self.case_timeout_s = case_timeout_s
        self.collective_timeout_s = collective_timeout_s
        self._procs = []

    def _start(self):
        ctx = mp.get_context("spawn")
        port = free_local_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, self.world_size, port, self._tasks[r], self._results, self.collective_timeout_s, self.env),
                # Not daemonic: ranks may start processes of their own
                # (torch_dist checkpoint writers); close() and atexit end them.
                daemon=False,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        atexit.register(self.close)

    def run(self, fn, *args, **kwargs) -> list:
        """Run `fn(*args, **kwargs)` on every rank; return the results by rank."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        results, errors = [None] * self.world_size, {}
        pending = self.world_size
        while pending:
            # After a failure, the other ranks get one collective timeout to finish.
            wait = self.collective_timeout_s + 5 if errors else self.case_timeout_s
            try:
                rank, ok, value = self._results.get(timeout=wait)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                self.close()
                if errors:
                    break
                raise RankError(
                    f"{fn.__name__}: no answer from {pending} rank(s) within {wait:.0f}s"
                    + (f"; rank(s) {dead} died" if dead else "")
                ) from None
            pending -= 1
            if ok:
                results[rank] = value
            else:
                errors[rank] = value
        if errors:
            self.close()  # ranks may be stuck in, or out of step with, a collective
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RankError(f"{fn.__name__} failed on rank(s) {sorted(errors)}:\n{detail}")
        return results

    def close(self):
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
