"""Bring a run's processes up and down: the process group, Megatron's groups, seeds.

Every command (vopd-train, vopd-sft, vopd-eval, the variance tool, tools/)
starts the same way: `start(run)` joins the default process group from the
launcher's environment (a plain `python` is a 1-process job), builds
Megatron's TP/PP/DP groups, seeds Megatron's RNG streams, and returns the
`ParallelContext` that is passed down from there on. `shutdown()` ends it.

CPU: megatron-core runs on CPU only through `megatron/cpu_compat.py`, which
patches `torch.cuda.*` for the whole process. That is a decision the caller
makes and says so: the command-line tools call `cpu_compat.enable()` (a no-op
with CUDA) before `start`; tests do it in their process set-up. Nothing here
turns it on.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import launch
from ..net import free_local_port
from .context import ParallelContext


def start_process_group(timeout_minutes: int = 10, backend: str | None = None) -> None:
    """The default process group from the launcher's environment (or a 1-process one).

    timeout_minutes: --distributed-timeout-minutes (Megatron-LM's default 10).
    backend: NCCL with CUDA, gloo without, unless given (a benchmark on CPU tensors)."""
    if not launch.launched():  # plain `python`: a single rank
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_local_port()))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank())
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))


def initialize_parallel(run) -> ParallelContext:
    """Megatron's TP/PP/DP groups over the already started default group, and
    Megatron's seeded RNG streams (`--seed`); the context of this rank."""
    from megatron.core import parallel_state, tensor_parallel

    p = run.parallel
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=p.tensor_model_parallel_size,
                                             pipeline_model_parallel_size=p.pipeline_model_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(run.train.seed)
    return ParallelContext.from_megatron()


def start(run) -> ParallelContext:
    """Process group (with the run's --distributed-timeout-minutes), Megatron's groups, seeds."""
    start_process_group(run.parallel.distributed_timeout_minutes)
    return initialize_parallel(run)


def shutdown() -> None:
    """Wait for every rank, then leave the process group."""
    dist.barrier()
    dist.destroy_process_group()
