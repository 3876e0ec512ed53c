"""Save a run's checkpoint, crash-safe and readable by Megatron-LM.

Why the save is built the way it is (a SIGKILL at any instant must leave a
loadable "latest" checkpoint; a failed save must not damage the previous one):

0. the filesystem must have room for the save's tensors (`_check_free_space`),
   else nothing is written;
1. every rank writes into `iter_XXXXXXX.incomplete/` (rank 0 empties it first);
2. after a barrier (every rank's files are written), rank 0 writes the
   completion marker `vopd_checkpoint_complete.json` into it, renames it to
   `iter_XXXXXXX/`, and only then replaces `latest_checkpointed_iteration.txt`
   (temp file + `os.replace`, each step fsynced);
3. a save that fails (a full disk, a dead filesystem) removes its staging
   directory and raises `CheckpointError` naming the directory and the cause
   ("no space left on device"); the tracker and earlier iterations are untouched.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import time

import torch
import torch.distributed as dist

from . import megatron_format as mf
from .checkpoint_files import (
    COMPLETE_MARKER, FORMAT_VERSION, STAGING_SUFFIX, TRACKER_FILENAME, CheckpointError, checkpoint_dir,
)
from .checkpoint_state import (
    layout as _layout, model_sharded_state_dict, rank as _rank, rank0_value, rng_objects, world_size,
)
from .optimizer_state import distopt_sharding_type, sharded_metadata
from .rng_state import get_rng_state


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
    sharded = model_sharded_state_dict(model, metadata)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=False, metadata=metadata)
    if scheduler is not None:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    sharded.update(rng_objects(get_rng_state()))
    sharded.update(_megatron_common(args, model, layout, iteration, state, optimizer is not None, sharding))
    sharded["vopd"] = dict(
        format_version=FORMAT_VERSION, iteration=iteration, layout=layout,
        has_optimizer=optimizer is not None, distrib_optim_sharding_type=sharding,
        base_seed=rank0_value(torch.initial_seed()), state=state,
    )
    _check_weights_only_loadable(sharded["args"], what="`args`")
    _check_free_space(staging, sharded)
    _collective_io(lambda: dist_checkpointing.save(
        sharded, staging, preprocess_common_before_consistancy_check=_comparable_common,
        content_metadata=mf.content_metadata(metadata),
    ), staging)

    _collective_io(lambda: _finish(save_dir, staging, final, iteration, layout), staging, rank0_only=True)
    return final


def _check_free_space(staging: str, sharded: dict) -> None:
    """Refuse to start writing when the filesystem lacks room for this save (collective).

    A disk that fills up while megatron-core's writer runs is also reported
    (`_save_failure`), but torch's zip writer can then crash the process when the
    failed writer is garbage-collected; checking first avoids that in the usual
    case, a disk that was already nearly full.
    """
    needed = torch.tensor([_local_bytes(sharded)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(needed)
    needed = int(needed.item() * 1.05) + (1 << 20)  # zip headers, index, common state
    error = None
    if _rank() == 0:
        free = _free_bytes(staging)
        if free is not None and free < needed:
            error = (f"saving checkpoint to {staging} failed: no space left on device (the save needs about "
                     f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free); nothing was written, earlier "
                     f"checkpoints in {os.path.dirname(staging)} are untouched")
    error = rank0_value(error)
    if error:
        _abandon(staging, error)


def _local_bytes(sharded: dict) -> int:
    """Bytes of the tensors this rank writes (main replicas only)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    total = 0
    for item in nested_values(sharded):
        data = getattr(item, "data", None)
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)) and torch.is_tensor(data) \
                and is_main_replica(getattr(item, "replica_id", 0)):
            total += data.numel() * data.element_size()
    return total


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
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    error = None
    if not rank0_only or _rank() == 0:
        try:
            step()
        except (Exception, CheckpointException) as exc:  # OSError, megatron-core's "Worker failure", ...
            error = _save_failure(staging, exc)
    if dist.is_initialized():  # also the barrier between the steps of a save
        errors = [None] * world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        _abandon(staging, error)


def _abandon(staging: str, error: str) -> None:
    """Every rank: remove the staging directory (rank 0), wait for it, raise `error`."""
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    raise CheckpointError(error)


def _save_failure(staging: str, exc: BaseException) -> str:
    """One line naming the directory and the cause.

    megatron-core's writer processes report a full disk as "Worker failure" (torch's
    zip writer loses the errno), so a failure that leaves less than `_FULL_DISK_BYTES`
    free on the staging filesystem is reported as a full disk.
    """
    chain, seen = [], exc
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e) for e in chain)
    free = _free_bytes(staging)
    if any(getattr(e, "errno", None) == errno.ENOSPC for e in chain) or "No space left" in text \
            or (free is not None and free < _FULL_DISK_BYTES):
        cause = "no space left on device" + (f" ({free / 2**20:.1f} MiB free)" if free is not None else "")
    elif any(getattr(e, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS) for e in chain):
        cause = "permission denied or read-only filesystem"
    else:
        cause = f"{type(chain[-1]).__name__}: {str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else ''}"
    return (f"saving checkpoint to {staging} failed: {cause}; the partial save was removed, "
            f"earlier checkpoints in {os.path.dirname(staging)} are untouched")


_FULL_DISK_BYTES = 16 * 2**20


def _free_bytes(path: str) -> int | None:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


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

