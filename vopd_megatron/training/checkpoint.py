"""Crash-safe Megatron-Core distributed checkpoints of a distillation run, readable both ways.

A checkpoint is one megatron-core `dist_checkpointing` directory in the
`torch_dist` format, `save_dir/iter_0000042/`, holding the student's model
chunks, the optimizer (plain or distributed), the LR scheduler, RNG states and
the run's `state` dict. Tensors are stored by *global* shard (`ShardedTensor`),
so a checkpoint saved at one TP/PP layout loads at another.

Interoperability with Megatron-LM (`megatron.training.checkpointing`):

- A checkpoint Megatron-LM saved (torch_dist, with or without optimizer state,
  any TP/PP) loads here: as a resume (weights, optimizer, scheduler, RNG when
  the TP/PP layout is the saved one, iteration and consumed samples from its
  `args`), as weights only (`--finetune`, `--teacher-load`, vopd-eval) and in the
  converter. It needs no marker of ours: its tracker moves only after all ranks
  wrote, and `checkpoint_files` checks that the files are there and whole.
- What we save resumes in Megatron-LM's `load_checkpoint`: besides our keys we
  write the ones it reads (`args`, `iteration`, `checkpoint_version`,
  `rng_state` over the (PP, TP) grid, `opt_param_scheduler`,
  `num_floating_point_operations_so_far`, the distributed optimizer's format as
  content metadata); see `megatron_format`.

Saving: `checkpoint_save` (staged directory, completion marker, atomic tracker).

Loading trusts the tracker's iteration if it is intact, else falls back to the
newest intact iteration with a warning naming what was skipped and why (a
damaged newest save costs the iterations since the previous one, not the run);
`fallback=False` makes that an error. Rank 0 decides and broadcasts, so all
ranks load the same iteration even on a lagging shared filesystem.

Optimizer state. The plain optimizer's state is stored per model parameter, so
it reshards like the model. The distributed optimizer is saved in Megatron's
`fully_reshardable` format, which reshards across TP/PP/DP too
(`optimizer_state` has the torch-Adam workarounds, MEGATRON_ON_CPU.md trap 4).

RNG states are saved per global rank (ours, restored when the whole layout is
the saved one) and in Megatron-LM's per-(PP, TP) format (restored when only the
data-parallel size changed, and what Megatron-LM reads); with another TP/PP the
ranks are re-seeded from (seed, iteration) the way Megatron-LM seeds them.

The run `state` and the scheduler's state live in the common state (rank 0's
copy), which megatron-core reads back with torch's `weights_only` unpickler:
keep `state` to plain Python values; `save_checkpoint` checks this first.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from . import megatron_format as mf
from .checkpoint_files import (
    COMPLETE_MARKER, FORMAT_VERSION, TRACKER_FILENAME, CheckpointError, checkpoint_dir, find_latest, is_complete,
    latest_iteration,
)
from .checkpoint_save import _check_weights_only_loadable, save_checkpoint  # noqa: F401  (the public API)
from .checkpoint_state import (
    RNG_KEY as _RNG_KEY, layout as _layout, load_model_chunks, model_sharded_state_dict, rank as _rank,
    rng_objects, union_over_ranks, warn as _warn,
)
from .optimizer_state import (
    LOADABLE_DISTOPT_FORMATS, distopt_sharding_type, load_optimizer, prime_torch_adam_state, sharded_metadata,
)
from .rng_state import reseed, set_rng_state

__all__ = [
    "CheckpointError", "save_checkpoint", "load_checkpoint", "load_model_weights",
    "latest_iteration", "checkpoint_dir", "is_complete", "TRACKER_FILENAME", "COMPLETE_MARKER", "FORMAT_VERSION",
]


# --- locating (rank 0 decides, every rank learns) --------------------------------------------


def _locate_for_load(load_dir: str, fallback: bool):
    """(path, iteration, common) of the iteration to load, or (None, None, None) if `load_dir`
    holds no checkpoint at all. Raises CheckpointError (on every rank) for debris without an
    intact iteration, or a damaged newest one with `fallback=False`."""
    box = [None]
    if _rank() == 0:
        try:
            found = find_latest(load_dir, fallback)
            box = [(found.path, found.iteration, found.common, found.notes, found.damaged, None)]
        except CheckpointError as exc:
            box = [(None, None, None, [], [], str(exc))]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    path, iteration, common, notes, damaged, error = box[0]
    if error:
        raise CheckpointError(error)
    if path is None:
        if notes:
            raise CheckpointError(f"{load_dir} holds no complete checkpoint to load or fall back to:\n  "
                                  + "\n  ".join(notes))
        return None, None, None
    for note in notes:
        loud = "WARNING: damaged checkpoint: " if note in damaged else ""
        _warn(f"{loud}checkpoint fallback in {load_dir}: {note}; loading iteration {iteration}")
    return path, iteration, common


# --- load ----------------------------------------------------------------------------------


def load_checkpoint(load_dir: str, model: list, optimizer, scheduler, *, strict: bool = True,
                    seed: int | None = None, fallback: bool = True) -> dict | None:
    """Load the newest intact checkpoint under `load_dir` into `model`, `optimizer`, `scheduler`.

    Collective. Ours or Megatron-LM's, any TP/PP layout (dist_checkpointing
    reshards). RNG states: see the module docstring; when they cannot be mapped
    every rank is re-seeded from `seed` (default: the saved run's seed) plus the
    iteration, with a warning. `strict`: a model key missing from the checkpoint
    (or a checkpoint model key the model lacks) raises `CheckpointError` naming
    the keys; with `strict=False` they are warned about and the rest is loaded.
    `fallback`: see the module docstring. Returns the saved run `state` (at least
    `iteration` and `consumed_samples`), or None when `load_dir` holds no checkpoint.
    """
    path, iteration, common = _locate_for_load(load_dir, fallback)
    if path is None:
        if not os.path.isdir(load_dir):
            _warn(f"checkpoint directory {load_dir} does not exist; starting from scratch")
        return None
    info = mf.checkpoint_info(path, iteration, common, mf.tensor_keys(path))
    if optimizer is not None and not info.has_optimizer:
        raise CheckpointError(f"{path} was saved without optimizer state; pass optimizer=None to load it")
    if scheduler is not None and not info.has_scheduler:
        raise CheckpointError(f"{path} has no scheduler state; pass scheduler=None to load it")
    layout = _layout(model)
    rng_source = _rng_source(info, layout)
    metadata = sharded_metadata(info.distopt_sharding or distopt_sharding_type(optimizer))
    sharded = model_sharded_state_dict(model, metadata)
    if optimizer is not None:
        _check_optimizer_layout(info, layout, path)
        prime_torch_adam_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True, metadata=metadata)
    if rng_source == "ours":
        sharded[_RNG_KEY] = rng_objects(None)[_RNG_KEY]
    elif rng_source == "megatron":
        sharded[mf.RNG_KEY] = mf.rng_sharded_object(None)
    ignore = ("optimizer.",) if optimizer is None else ()
    loaded = _load_sharded(sharded, path, strict, info, ignore_unused=ignore + (_RNG_KEY, mf.RNG_KEY))

    with torch.no_grad():  # fp32 DistributedOptimizer.load_state_dict writes into leaf views
        load_model_chunks(model, loaded, strict)
        if optimizer is not None:
            load_optimizer(optimizer, loaded["optimizer"])
    if scheduler is not None:
        _load_scheduler(scheduler, loaded["opt_param_scheduler"], path)
    _restore_rng(rng_source, loaded, info, layout, seed, iteration)
    return info.state


def _rng_source(info, layout: dict) -> str | None:
    """Which saved RNG states map onto this layout: ours (the same layout), Megatron-LM's
    (the same TP and PP), or none (re-seed)."""
    saved = info.layout or {}
    if info.ours and saved == layout:
        return "ours"
    if info.has_rng and (saved.get("tp", 1), saved.get("pp", 1)) == (layout.get("tp", 1), layout.get("pp", 1)) \
            and saved.get("model_chunks", 1) == layout["model_chunks"]:
        return "megatron"
    return None


def _restore_rng(source, loaded, info, layout, seed, iteration) -> None:
    if source == "ours":
        set_rng_state(loaded[_RNG_KEY])
    elif source == "megatron":
        from megatron.core import parallel_state as ps

        dp_rank = ps.get_data_parallel_rank() if ps.model_parallel_is_initialized() else 0
        random_init = bool(getattr(info.args, "data_parallel_random_init", False))
        set_rng_state(mf.from_megatron_rng(loaded[mf.RNG_KEY], dp_rank, random_init))
    else:
        base = (info.base_seed or 0) if seed is None else seed
        _warn(
            f"{info.path} was saved with layout {info.layout}, this run is {layout}: per-rank "
            f"RNG states cannot be mapped across layouts; re-seeding every rank from seed {base} "
            f"+ iteration {iteration}"
        )
        reseed(base + iteration)


def _check_optimizer_layout(info, layout: dict, path: str) -> None:
    """Megatron-LM's `dp_reshardable` / `dp_zero_gather_scatter` distributed-optimizer formats
    load only at the TP/PP layout they were saved at (Megatron-LM refuses the same)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    fmt, saved = info.distopt_sharding, info.layout or {}
    reshardable = getattr(DistributedOptimizer, "checkpoint_fully_reshardable_formats", ())
    if fmt is None or fmt in reshardable:
        return
    if fmt not in LOADABLE_DISTOPT_FORMATS:
        raise CheckpointError(f"{path} holds distributed-optimizer state in the {fmt!r} format, which this "
                              "loader does not read; load the weights only (--finetune)")
    if (saved.get("tp"), saved.get("pp")) != (layout.get("tp"), layout.get("pp")):
        raise CheckpointError(
            f"{path} holds distributed-optimizer state in the {fmt!r} format, saved at TP {saved.get('tp')} "
            f"PP {saved.get('pp')}; it loads only at that layout (this run: TP {layout.get('tp')} PP "
            f"{layout.get('pp')}). Resume at the saved layout, or load the weights only (--finetune)"
        )


def _load_scheduler(scheduler, saved: dict, path: str) -> None:
    """The LR schedule; a schedule that does not match this run's flags is one clear error."""
    try:
        scheduler.load_state_dict(saved)
    except AssertionError as exc:  # megatron-core's OptimizerParamScheduler._check_and_set
        raise CheckpointError(
            f"{path}: the saved learning-rate schedule does not match this run's flags ({exc}); "
            "use the saved --lr / --min-lr / --lr-warmup-iters / --lr-decay-iters / --lr-decay-style / "
            "--train-iters / --global-batch-size, or --finetune to start a new schedule from the weights"
        ) from None


def load_model_weights(load_dir: str, model: list, fallback: bool = True) -> int:
    """Load only the model weights of the newest intact checkpoint (e.g. the frozen teacher).

    Collective, read-only: writes nothing anywhere. Any TP/PP layout, ours or
    Megatron-LM's. Raises `CheckpointError` if `load_dir` holds no complete
    checkpoint or does not fit the model (naming the tensors and the checkpoint's
    saved shape). Returns the iteration loaded.
    """
    path, iteration, common = _locate_for_load(load_dir, fallback)
    if path is None:
        what = "does not exist" if not os.path.isdir(load_dir) else "holds no checkpoint"
        raise CheckpointError(f"cannot load model weights: {load_dir} {what}")
    info = mf.checkpoint_info(path, iteration, common, mf.tensor_keys(path))
    sharded = model_sharded_state_dict(model, sharded_metadata(info.distopt_sharding))
    loaded = _load_sharded(sharded, path, True, info, ignore_unused=("optimizer.", _RNG_KEY, mf.RNG_KEY))
    with torch.no_grad():
        load_model_chunks(model, loaded, strict=True)
    return iteration


def _load_sharded(sharded: dict, path: str, strict: bool, info, ignore_unused: tuple[str, ...]) -> dict:
    """dist_checkpointing.load with mismatches named on every rank (and raised when `strict`)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    _check_shapes(sharded, path, info)
    try:
        loaded, unused, absent = dist_checkpointing.load(sharded, path, strict=StrictHandling.RETURN_ALL)
    except Exception as exc:  # damaged bytes inside a shard, an unreadable file, ...
        raise CheckpointError(f"reading checkpoint {path} failed ({type(exc).__name__}: {exc})") from exc
    # dist_checkpointing's "missing" = in the checkpoint, not requested (global);
    # its "unexpected" = requested, not in the checkpoint (this rank's).
    absent = union_over_ranks(set(absent))
    unused = {k for k in unused if not k.startswith(ignore_unused)}
    if absent or unused:
        message = f"checkpoint {path} does not match the model:"
        if absent:
            message += f"\n  not in the checkpoint ({len(absent)}): {sorted(absent)}"
        if unused:
            message += f"\n  in the checkpoint but not in the model ({len(unused)}): {sorted(unused)}"
        if info.args is not None:
            message += f"\n  {mf.describe_model(info.args)}"
        if strict:
            raise CheckpointError(message)
        _warn(message + "\n  (strict=False: loading the rest)")
    return loaded


def _check_shapes(sharded: dict, path: str, info) -> None:
    """Every requested tensor's global shape against the checkpoint's index, named before loading."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    index = FileSystemReader(path).read_metadata().state_dict_metadata
    wrong = {}
    for sh in nested_values(sharded):
        if not isinstance(sh, ShardedTensor) or sh.allow_shape_mismatch:  # padded vocabularies differ by TP
            continue
        stored = index.get(sh.key)
        if stored is not None and hasattr(stored, "size") and tuple(stored.size) != tuple(sh.global_shape):
            wrong[sh.key] = (tuple(stored.size), tuple(sh.global_shape))
    wrong = union_over_ranks({(k, v) for k, v in wrong.items()})
    if wrong:
        lines = [f"{k}: {list(s)} in the checkpoint, {list(m)} in the model" for k, (s, m) in sorted(wrong)]
        shown = lines[:6] + ([f"... and {len(lines) - 6} more"] if len(lines) > 6 else [])
        saved = f"\n  {mf.describe_model(info.args)}" if info.args is not None else ""
        raise CheckpointError(f"checkpoint {path} does not fit the model ({len(lines)} tensor shapes differ):\n  "
                              + "\n  ".join(shown) + saved)
