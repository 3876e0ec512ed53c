"""What save and load share: state-dict keys, the parallel layout, RNG objects, rank helpers."""
from __future__ import annotations

import warnings

import torch.distributed as dist

from . import megatron_format as mf

RNG_KEY = "vopd.rng_state"  # our per-global-rank RNG states


def rng_objects(host_state: dict | None) -> dict:
    """This rank's RNG ShardedObjects: ours (per global rank) and Megatron-LM's (per PP x TP rank)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    ours = ShardedObject(RNG_KEY, host_state, (world_size(),), (rank(),), replica_id=0)
    return {RNG_KEY: ours, mf.RNG_KEY: mf.rng_sharded_object(host_state)}


def unwrap(chunk):
    """The module under DDP / FSDP / Float16Module wrappers (which lack `sharded_state_dict` in 0.19)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def chunk_key(model: list, i: int) -> str:
    return "model" if len(model) == 1 else f"model{i}"  # Megatron-LM's keys


def model_sharded_state_dict(model: list, metadata: dict) -> dict:
    return {chunk_key(model, i): unwrap(c).sharded_state_dict(metadata=metadata) for i, c in enumerate(model)}


def load_model_chunks(model: list, loaded: dict, strict: bool) -> None:
    for i, chunk in enumerate(model):
        unwrap(chunk).load_state_dict(loaded[chunk_key(model, i)], strict=strict)


def layout(model: list) -> dict:
    from megatron.core import parallel_state as ps

    layout = dict(world_size=world_size(), model_chunks=len(model))
    if ps.model_parallel_is_initialized():
        layout.update(
            tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
            cp=ps.get_context_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
        )
    return layout


# --- small helpers -----------------------------------------------------------------------------


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank0_value(value):
    """Rank 0's `value` on every rank (the common state must agree across ranks)."""
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def union_over_ranks(items: set) -> set:
    if dist.is_initialized():
        everyone = [None] * world_size()
        dist.all_gather_object(everyone, items)
        items = set().union(*everyone)
    return items


def warn(message: str) -> None:
    if rank() == 0:
        warnings.warn(message, stacklevel=3)
