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

Why the save is built the way it is (a SIGKILL at any instant must leave a
loadable "latest" checkpoint; a failed save must not damage the previous one):

1. every rank writes into `iter_XXXXXXX.incomplete/` (rank 0 empties it first);
2. after a barrier (every rank's files are written), rank 0 writes the
   completion marker `vopd_checkpoint_complete.json` into it, renames it to
   `iter_XXXXXXX/`, and only then replaces `latest_checkpointed_iteration.txt`
   (temp file + `os.replace`, each step fsynced);
3. a save that fails (a full disk, a dead filesystem) removes its staging
   directory and raises `CheckpointError` naming the directory and the cause
   ("no space left on device"); the tracker and earlier iterations are untouched.

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

import errno
import io
import json
import os
import shutil
import time
import warnings

import torch
import torch.distributed as dist

from . import megatron_format as mf
from .checkpoint_files import (
    COMPLETE_MARKER, FORMAT_VERSION, STAGING_SUFFIX, TRACKER_FILENAME, CheckpointError, checkpoint_dir,
    find_latest, is_complete, latest_iteration,
)
from .optimizer_state import distopt_sharding_type, load_optimizer, prime_torch_adam_state, sharded_metadata
from .rng_state import get_rng_state, reseed, set_rng_state

__all__ = [
    "CheckpointError", "save_checkpoint", "load_checkpoint", "load_model_weights",
    "latest_iteration", "checkpoint_dir", "is_complete", "TRACKER_FILENAME", "COMPLETE_MARKER", "FORMAT_VERSION",
]

_RNG_KEY = "vopd.rng_state"


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


# --- save ----------------------------------------------------------------------------------


def save_checkpoint(save_dir: str, iteration: int, model: list, optimizer, scheduler, state: dict,
                    args=None) -> str:
    """Save model chunks, optimizer, scheduler, RNG states and `state` to `save_dir/iter_{iteration:07d}`.

    Collective: every rank calls it. `model` is this rank's list of model chunks
    (DDP/Float16Module-wrapped or not); `optimizer` a MegatronOptimizer or None;
    `scheduler` an OptimizerParamScheduler or None; `state` the run state (plain
    values; `consumed_samples` and `num_floating_point_operations_so_far` are
    also given to Megatron-LM). `args`: Megatron-LM's Namespace of the run (its
    layout and progress fields are updated for this save); None builds one from
    the model with Megatron-LM's parser. Returns the checkpoint directory.
    Raises CheckpointError (previous checkpoints untouched) when the save fails.
    """
    from megatron.core import dist_checkpointing

    _check_weights_only_loadable(state)  # on every rank, so that all of them raise
    final = checkpoint_dir(save_dir, iteration)
    staging = final + STAGING_SUFFIX
    _collective_io(lambda: _start_staging(save_dir, staging), staging, rank0_only=True)

    sharding = distopt_sharding_type(optimizer)
    metadata = sharded_metadata(sharding)
    layout = _layout(model)
    sharded = _model_sharded_state_dict(model, metadata)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=False, metadata=metadata)
    if scheduler is not None:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    sharded.update(_rng_objects(get_rng_state()))
    sharded.update(_megatron_common(args, model, layout, iteration, state, optimizer is not None, sharding))
    sharded["vopd"] = dict(
        format_version=FORMAT_VERSION, iteration=iteration, layout=layout,
        has_optimizer=optimizer is not None, distrib_optim_sharding_type=sharding,
        base_seed=_rank0_value(torch.initial_seed()), state=state,
    )
    _check_weights_only_loadable(sharded["args"], what="`args`")
    _collective_io(lambda: dist_checkpointing.save(
        sharded, staging, preprocess_common_before_consistancy_check=_comparable_common,
        content_metadata=mf.content_metadata(metadata),
    ), staging)

    _collective_io(lambda: _finish(save_dir, staging, final, iteration, layout), staging, rank0_only=True)
    return final


def _start_staging(save_dir: str, staging: str) -> None:
    os.makedirs(save_dir, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)  # debris of a save that was killed
    os.makedirs(staging)


def _finish(save_dir: str, staging: str, final: str, iteration: int, layout: dict) -> None:
    """Rank 0, after every rank's shards are on disk: marker, publish, tracker, clean up."""
    _write_atomically(os.path.join(staging, COMPLETE_MARKER), json.dumps(
        dict(iteration=iteration, format_version=FORMAT_VERSION, layout=layout, saved_at=time.time())
    ))
    _publish(staging, final)
    _write_atomically(os.path.join(save_dir, TRACKER_FILENAME), f"{iteration}\n")
    for name in os.listdir(save_dir):  # debris of earlier killed saves
        if name.endswith(STAGING_SUFFIX) or ".replaced-" in name:
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)


def _collective_io(step, staging: str, rank0_only: bool = False) -> None:
    """Run `step` (on rank 0 only, or on every rank), then agree across ranks on whether it failed.

    On a failure anywhere the staging directory is removed (its partial files would
    otherwise fill the disk further) and every rank raises the same CheckpointError.
    """
    error = None
    if not rank0_only or _rank() == 0:
        try:
            step()
        except Exception as exc:  # OSError, megatron-core's wrapped worker failures, ...
            error = _save_failure(staging, exc)
    if dist.is_initialized():  # also the barrier between the steps of a save
        errors = [None] * _world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        if _rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(error)


def _save_failure(staging: str, exc: BaseException) -> str:
    """One line naming the directory and the cause, found anywhere in the exception chain."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e) for e in chain)
    if any(getattr(e, "errno", None) == errno.ENOSPC for e in chain) or "No space left" in text:
        cause = "no space left on device"
    elif any(getattr(e, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS) for e in chain):
        cause = "permission denied or read-only filesystem"
    else:
        cause = f"{type(chain[-1]).__name__}: {chain[-1]}"
    return (f"saving checkpoint to {staging} failed: {cause}; the save was removed, "
            f"earlier checkpoints in {os.path.dirname(staging)} are untouched")


def _megatron_common(args, model, layout, iteration, state, has_optimizer, sharding) -> dict:
    """The common keys Megatron-LM's load_checkpoint reads (megatron_format)."""
    args = args if args is not None else mf.megatron_namespace(model)
    consumed = int(state.get("consumed_samples", getattr(args, "consumed_train_samples", 0) or 0))
    return {
        "args": mf.checkpoint_args(args, layout, iteration=iteration, consumed_samples=consumed,
                                   has_optimizer=has_optimizer, distopt_sharding=sharding),
        "checkpoint_version": mf.CHECKPOINT_VERSION,
        "iteration": iteration,
        "num_floating_point_operations_so_far": state.get("num_floating_point_operations_so_far", 0),
    }


def _rng_objects(host_state: dict | None) -> dict:
    """This rank's RNG ShardedObjects: ours (per global rank) and Megatron-LM's (per PP x TP rank)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    ours = ShardedObject(_RNG_KEY, host_state, (_world_size(),), (_rank(),), replica_id=0)
    return {_RNG_KEY: ours, mf.RNG_KEY: mf.rng_sharded_object(host_state)}


def _comparable_common(common: dict) -> dict:
    """The common state without what legitimately differs across ranks (megatron-core compares them).

    In the memory-efficient `fully_reshardable` exchange, DP ranks > 0 hold no
    distributed-optimizer `param_state` (None), rank 0 holds sharded tensors;
    Megatron-LM's `args` carry each rank's own `rank`.
    """
    if isinstance(common, dict):
        return {k: mf.comparable_args(v) if k == "args" else _comparable_common(v)
                for k, v in common.items() if not (k == "param_state" and v is None)}
    return common


def _publish(staging: str, final: str) -> None:
    """Rename the finished `staging` dir to `final`.

    Re-saving an existing iteration moves the old directory aside first; a crash
    in between leaves the tracker naming a missing directory, and the load falls
    back to the newest complete other iteration.
    """
    old = None
    if os.path.exists(final):
        old = f"{final}.replaced-{os.getpid()}"
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(os.path.dirname(final))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync directories
        pass
    finally:
        os.close(fd)


def _check_weights_only_loadable(state, what: str = "run `state`") -> None:
    """Fail before writing if `state` would not load back (megatron-core reads with weights_only=True)."""
    import megatron.core  # noqa: F401  (registers Megatron-LM's safe globals, e.g. argparse.Namespace)

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{what} must hold plain values (numbers, strings, lists, dicts, tensors): "
            f"torch's weights_only loader rejects it: {exc}"
        ) from exc


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
    sharded = _model_sharded_state_dict(model, metadata)
    if optimizer is not None:
        _check_optimizer_layout(info, layout, path)
        prime_torch_adam_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True, metadata=metadata)
    if rng_source == "ours":
        sharded[_RNG_KEY] = _rng_objects(None)[_RNG_KEY]
    elif rng_source == "megatron":
        sharded[mf.RNG_KEY] = mf.rng_sharded_object(None)
    ignore = ("optimizer.",) if optimizer is None else ()
    loaded = _load_sharded(sharded, path, strict, info, ignore_unused=ignore + (_RNG_KEY, mf.RNG_KEY))

    with torch.no_grad():  # fp32 DistributedOptimizer.load_state_dict writes into leaf views
        _load_model_chunks(model, loaded, strict)
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
    sharded = _model_sharded_state_dict(model, sharded_metadata(info.distopt_sharding))
    loaded = _load_sharded(sharded, path, True, info, ignore_unused=("optimizer.", _RNG_KEY, mf.RNG_KEY))
    with torch.no_grad():
        _load_model_chunks(model, loaded, strict=True)
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
    absent = _union_over_ranks(set(absent))
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
        stored = index.get(sh.key) if isinstance(sh, ShardedTensor) else None
        if stored is not None and hasattr(stored, "size") and tuple(stored.size) != tuple(sh.global_shape):
            wrong[sh.key] = (tuple(stored.size), tuple(sh.global_shape))
    wrong = _union_over_ranks({(k, v) for k, v in wrong.items()})
    if wrong:
        lines = [f"{k}: {list(s)} in the checkpoint, {list(m)} in the model" for k, (s, m) in sorted(wrong)]
        shown = lines[:6] + ([f"... and {len(lines) - 6} more"] if len(lines) > 6 else [])
        saved = f"\n  {mf.describe_model(info.args)}" if info.args is not None else ""
        raise CheckpointError(f"checkpoint {path} does not fit the model ({len(lines)} tensor shapes differ):\n  "
                              + "\n  ".join(shown) + saved)


# --- state dicts -----------------------------------------------------------------------------


def _unwrap(chunk):
    """The module under DDP / FSDP / Float16Module wrappers (which lack `sharded_state_dict` in 0.19)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def _chunk_key(model: list, i: int) -> str:
    return "model" if len(model) == 1 else f"model{i}"  # Megatron-LM's keys


def _model_sharded_state_dict(model: list, metadata: dict) -> dict:
    return {_chunk_key(model, i): _unwrap(c).sharded_state_dict(metadata=metadata) for i, c in enumerate(model)}


def _load_model_chunks(model: list, loaded: dict, strict: bool) -> None:
    for i, chunk in enumerate(model):
        _unwrap(chunk).load_state_dict(loaded[_chunk_key(model, i)], strict=strict)


def _layout(model: list) -> dict:
    from megatron.core import parallel_state as ps

    layout = dict(world_size=_world_size(), model_chunks=len(model))
    if ps.model_parallel_is_initialized():
        layout.update(
            tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
            cp=ps.get_context_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
        )
    return layout


# --- small helpers -----------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank0_value(value):
    """Rank 0's `value` on every rank (the common state must agree across ranks)."""
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _union_over_ranks(items: set) -> set:
    if dist.is_initialized():
        everyone = [None] * _world_size()
        dist.all_gather_object(everyone, items)
        items = set().union(*everyone)
    return items


def _warn(message: str) -> None:
    if _rank() == 0:
        warnings.warn(message, stacklevel=3)
