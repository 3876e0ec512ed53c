"""`ParallelContext`: this rank's place in the TP x PP x DP grid, read once.

Why: the layout decides what a rank samples, which rows it trains on, whether
it holds the loss, and which groups its collectives use. Reading it once from
Megatron's `parallel_state` right after the groups exist, and passing it down,
keeps every function's dependence on the layout visible in its signature and
lets tests build any layout without touching global state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelContext:
    """This rank's coordinates and process groups (a group is None for a 1-process run)."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None

    @property
    def first_stage(self) -> bool:
        """Holds the embedding: the pipeline's first stage."""
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        """Holds the output layer and the loss: the pipeline's last stage."""
        return self.pp_rank == self.pp_size - 1

    @property
    def last_rank(self) -> int:
        """The last global rank. Megatron orders ranks with the pipeline stage
        slowest, so it is on the last stage: where the loss and its metrics live."""
        return self.world_size - 1

    @property
    def reports(self) -> bool:
        """Prints progress lines: global rank 0."""
        return self.rank == 0

    @classmethod
    def from_megatron(cls) -> "ParallelContext":
        """The context of the groups `parallel_state.initialize_model_parallel` made."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                  else torch.device("cpu"))
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
                   pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
                   dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(), device=device,
                   tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
                   dp_group=ps.get_data_parallel_group())
