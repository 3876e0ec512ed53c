"""Crash-safe Megatron-Core distributed checkpoints of a distillation run.

A checkpoint is one megatron-core `dist_checkpointing` directory in the
`torch_dist` format, `save_dir/iter_0000042/`, holding the student's model
chunks, the optimizer (plain or distributed), the LR scheduler, every rank's
RNG states and the run's `state` dict. Tensors are stored by *global* shard
(`ShardedTensor`), so a checkpoint saved at one TP/PP layout loads at another:
`dist_checkpointing` reshards on load.

Why the save is built the way it is (a SIGKILL at any instant must leave a
loadable "latest" checkpoint):

1. every rank writes into `iter_XXXXXXX.incomplete/` (rank 0 empties it first);
2. after a barrier (every rank's files are written), rank 0 writes the
   completion marker `vopd_checkpoint_complete.json` into it, renames it to
   `iter_XXXXXXX/`, and only then replaces `latest_checkpointed_iteration.txt`
   (temp file + `os.replace`, each step fsynced).

So the tracker only ever names a directory that was complete before the
tracker moved (a directory published just before a crash, but not yet named
by the tracker, is ignored in favour of the tracker's). `load_checkpoint`
trusts the tracker only if that directory is complete (marker + torch_dist
`.metadata` + megatron's `metadata.json`); otherwise, or without a tracker,
it falls back to the newest complete `iter_*` directory, and raises
`CheckpointError` when `load_dir` holds checkpoint debris but nothing
complete. Rank 0 decides and broadcasts, so all ranks load the same
iteration even on a lagging shared filesystem.

Optimizer state. The plain optimizer's state is stored per model parameter
(`optimizer.state.exp_avg.<param key>`, ...), so it reshards like the model.
The distributed optimizer is saved in Megatron's `fully_reshardable` format
(gathered per DP group into the same model-parameter space), so it reshards
across TP/PP/DP too. Adam's `step` is stored once per optimizer (`common_step` /
`param_groups[i]['step']`). Without TE/apex, megatron-core's distributed
optimizer cannot load into a fresh torch Adam, fails on its `step` entries, and
would restore `step` as *one* tensor shared by all parameters, which torch Adam
increments once per parameter per step (MEGATRON_ON_CPU.md trap 4):
`optimizer_state.prime_torch_adam_state` and `optimizer_state.load_optimizer`
work around all three.

RNG states (python `random`, numpy, torch CPU, CUDA when present, and
Megatron's tensor-parallel RNG tracker) are saved per global rank. They are
restored only when the layout (world size, TP, PP, CP, DP, model chunks) is
the one saved; otherwise there is no meaningful per-rank mapping, and the
ranks are re-seeded deterministically from (seed, iteration) the way
Megatron-LM seeds them, with a warning.

The run `state` and the scheduler's state live in the checkpoint's common
state (rank 0's copy), which megatron-core reads back with torch's
`weights_only` unpickler: keep `state` to plain Python values (numbers,
strings, lists, dicts, tensors); `save_checkpoint` checks this before writing.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
import warnings

import torch
import torch.distributed as dist

from .optimizer_state import distopt_sharding_type, load_optimizer, prime_torch_adam_state, sharded_metadata
from .rng_state import get_rng_state, reseed, set_rng_state

__all__ = [
    "CheckpointError", "save_checkpoint", "load_checkpoint", "load_model_weights",
    "latest_iteration", "checkpoint_dir", "is_complete",
]

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
COMPLETE_MARKER = "vopd_checkpoint_complete.json"
FORMAT_VERSION = 1
_STAGING_SUFFIX = ".incomplete"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_RNG_KEY = "vopd.rng_state"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or does not match the model."""


# --- locating checkpoints (filesystem only, no collectives) ------------------------------


def checkpoint_dir(save_dir: str, iteration: int) -> str:
    """`save_dir/iter_0000042` for iteration 42."""
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def is_complete(path: str) -> bool:
    """A finished save: our marker (written last), torch_dist's `.metadata` and megatron's `metadata.json`."""
    required = (COMPLETE_MARKER, ".metadata", "metadata.json")
    return all(os.path.isfile(os.path.join(path, name)) for name in required)


def latest_iteration(load_dir: str) -> int | None:
    """The iteration `load_checkpoint` would load from `load_dir`, or None if it holds no complete checkpoint."""
    return _find_latest(load_dir)[0]


def _find_latest(load_dir: str) -> tuple[int | None, list[str]]:
    """(iteration to load or None, notes on what was skipped and why)."""
    notes = []
    if not os.path.isdir(load_dir):
        return None, notes
    iterations = sorted(
        (int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(load_dir)) if m), reverse=True
    )
    tracker = _read_tracker(load_dir, notes)
    if tracker is not None:
        if is_complete(checkpoint_dir(load_dir, tracker)):
            return tracker, notes
        notes.append(f"{TRACKER_FILENAME} names iteration {tracker}, whose directory is missing or incomplete")
    for iteration in iterations:
        if is_complete(checkpoint_dir(load_dir, iteration)):
            return iteration, notes
        if iteration != tracker:
                notes.append(f"{checkpoint_dir(load_dir, iteration)} is incomplete "
                             f"(no {COMPLETE_MARKER} or torch_dist metadata)")
    notes += [f"{os.path.join(load_dir, name)} is an unfinished save"
              for name in sorted(os.listdir(load_dir)) if name.endswith(_STAGING_SUFFIX)]
    return None, notes


def _read_tracker(load_dir: str, notes: list[str]) -> int | None:
    path = os.path.join(load_dir, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        notes.append(f"{path} holds {text!r}, not an iteration number")
        return None


def _agreed_latest(load_dir: str) -> tuple[int | None, list[str]]:
    """`_find_latest` as rank 0 sees it, on every rank."""
    found = list(_find_latest(load_dir)) if _rank() == 0 else [None, []]
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)
    return found[0], found[1]


def _locate_for_load(load_dir: str) -> tuple[str | None, int | None]:
    iteration, notes = _agreed_latest(load_dir)
    if iteration is None:
        if notes:
            raise CheckpointError(
                f"{load_dir} holds no complete checkpoint to load or fall back to:\n  " + "\n  ".join(notes)
            )
        return None, None
    for note in notes:
        _warn(f"checkpoint fallback in {load_dir}: {note}; loading iteration {iteration}")
    return checkpoint_dir(load_dir, iteration), iteration


# --- save ----------------------------------------------------------------------------------


def save_checkpoint(save_dir: str, iteration: int, model: list, optimizer, scheduler, state: dict) -> str:
    """Save model chunks, optimizer, scheduler, RNG states and `state` to `save_dir/iter_{iteration:07d}`.

    Collective: every rank calls it. `model` is this rank's list of model chunks
    (DDP/Float16Module-wrapped or not); `optimizer` a MegatronOptimizer or None;
    `scheduler` an OptimizerParamScheduler or None; `state` the run state (plain
    values, see the module docstring). Returns the checkpoint directory.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    _check_weights_only_loadable(state)  # on every rank, so that all of them raise
    final = checkpoint_dir(save_dir, iteration)
    staging = final + _STAGING_SUFFIX
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # debris of a save that was killed
        os.makedirs(staging)
    _barrier()

    sharding = distopt_sharding_type(optimizer)
    metadata = sharded_metadata(sharding)
    sharded = _model_sharded_state_dict(model, metadata)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=False, metadata=metadata)
    if scheduler is not None:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    world, rank = _world_size(), _rank()
    sharded[_RNG_KEY] = ShardedObject(_RNG_KEY, get_rng_state(), (world,), (rank,), replica_id=0)
    sharded["vopd"] = dict(
        format_version=FORMAT_VERSION, iteration=iteration, layout=_layout(model),
        has_optimizer=optimizer is not None, distrib_optim_sharding_type=sharding,
        base_seed=_rank0_value(torch.initial_seed()), state=state,
    )
    dist_checkpointing.save(sharded, staging, preprocess_common_before_consistancy_check=_comparable_common)
    _barrier()  # every rank's shards are on disk

    if rank == 0:
        _write_atomically(os.path.join(staging, COMPLETE_MARKER), json.dumps(
            dict(iteration=iteration, format_version=FORMAT_VERSION, layout=_layout(model), saved_at=time.time())
        ))
        _publish(staging, final)
        _write_atomically(os.path.join(save_dir, TRACKER_FILENAME), f"{iteration}\n")
        for name in os.listdir(save_dir):  # debris of earlier killed saves
            if name.endswith(_STAGING_SUFFIX) or ".replaced-" in name:
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    _barrier()
    return final


def _comparable_common(common: dict) -> dict:
    """The common state without what legitimately differs across ranks (megatron-core compares them).

    In the memory-efficient `fully_reshardable` exchange, DP ranks > 0 hold no
    distributed-optimizer `param_state` (None), rank 0 holds sharded tensors.
    """
    if isinstance(common, dict):
        return {k: _comparable_common(v) for k, v in common.items() if not (k == "param_state" and v is None)}
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


def _check_weights_only_loadable(state: dict) -> None:
    """Fail before writing if `state` would not load back (megatron-core reads with weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            "run `state` must hold plain values (numbers, strings, lists, dicts, tensors): "
            f"torch's weights_only loader rejects it: {exc}"
        ) from exc


# --- load ----------------------------------------------------------------------------------


def load_checkpoint(load_dir: str, model: list, optimizer, scheduler, *, strict: bool = True,
                    seed: int | None = None) -> dict | None:
    """Load the newest complete checkpoint under `load_dir` into `model`, `optimizer`, `scheduler`.

    Collective. Any TP/PP layout loads (dist_checkpointing reshards). RNG states
    are restored when the layout is the saved one; otherwise every rank is
    re-seeded from `seed` (default: rank 0's `torch.initial_seed()` recorded
    at save time) plus the iteration, with a warning. `strict`: a model key missing from the
    checkpoint (or a checkpoint model key the model lacks) raises
    `CheckpointError` naming the keys; with `strict=False` they are warned
    about and the rest is loaded. Returns the saved `state`, or None when
    `load_dir` holds no checkpoint at all.
    """
    path, iteration = _locate_for_load(load_dir)
    if path is None:
        if not os.path.isdir(load_dir):
            _warn(f"checkpoint directory {load_dir} does not exist; starting from scratch")
        return None
    info = _read_info(path)
    if optimizer is not None and not info["has_optimizer"]:
        raise CheckpointError(f"{path} was saved without optimizer state; pass optimizer=None to load it")

    same_layout = info["layout"] == _layout(model)
    metadata = sharded_metadata(info["distrib_optim_sharding_type"] or distopt_sharding_type(optimizer))
    sharded = _model_sharded_state_dict(model, metadata)
    if optimizer is not None:
        prime_torch_adam_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True, metadata=metadata)
    if same_layout:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        sharded[_RNG_KEY] = ShardedObject(_RNG_KEY, None, (_world_size(),), (_rank(),), replica_id=0)
    ignore = () if optimizer is not None else ("optimizer.",)
    loaded = _load_sharded(sharded, path, strict, ignore_unused=ignore + (_RNG_KEY,))

    with torch.no_grad():  # fp32 DistributedOptimizer.load_state_dict writes into leaf views
        _load_model_chunks(model, loaded, strict)
        if optimizer is not None:
            load_optimizer(optimizer, loaded["optimizer"])
    if scheduler is not None:
        if "opt_param_scheduler" not in loaded:
            raise CheckpointError(f"{path} has no scheduler state; pass scheduler=None to load it")
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if same_layout:
        set_rng_state(loaded[_RNG_KEY])
    else:
        base = info["base_seed"] if seed is None else seed
        _warn(
            f"{path} was saved with layout {info['layout']}, this run is {_layout(model)}: per-rank "
            f"RNG states cannot be mapped across layouts; re-seeding every rank from seed {base} "
            f"+ iteration {iteration}"
        )
        reseed(base + iteration)
    return info["state"]


def load_model_weights(load_dir: str, model: list) -> int:
    """Load only the model weights of the newest complete checkpoint (e.g. the frozen teacher).

    Collective, read-only: writes nothing anywhere. Any TP/PP layout. Raises
    `CheckpointError` if `load_dir` holds no complete checkpoint or the model's
    keys do not match. Returns the iteration loaded.
    """
    path, iteration = _locate_for_load(load_dir)
    if path is None:
        what = "does not exist" if not os.path.isdir(load_dir) else "holds no checkpoint"
        raise CheckpointError(f"cannot load model weights: {load_dir} {what}")
    info = _read_info(path)
    sharded = _model_sharded_state_dict(model, sharded_metadata(info["distrib_optim_sharding_type"]))
    loaded = _load_sharded(sharded, path, strict=True, ignore_unused=("optimizer.", _RNG_KEY))
    with torch.no_grad():
        _load_model_chunks(model, loaded, strict=True)
    return iteration


def _read_info(path: str) -> dict:
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as exc:
        raise CheckpointError(f"{path} is complete but unreadable: {exc}") from exc
    info = common.get("vopd")
    if info is None or info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a vopd_megatron checkpoint of format {FORMAT_VERSION}")
    return info


def _load_sharded(sharded: dict, path: str, strict: bool, ignore_unused: tuple[str, ...]) -> dict:
    """dist_checkpointing.load with mismatches named on every rank (and raised when `strict`)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    loaded, unused, absent = dist_checkpointing.load(sharded, path, strict=StrictHandling.RETURN_ALL)
    # dist_checkpointing's "missing" = in the checkpoint, not requested (global);
    # its "unexpected" = requested, not in the checkpoint (this rank's).
    absent = set(absent)
    if dist.is_initialized():
        everyone = [None] * _world_size()
        dist.all_gather_object(everyone, absent)
        absent = set().union(*everyone)
    unused = {k for k in unused if not k.startswith(ignore_unused)}
    if absent or unused:
        message = f"checkpoint {path} does not match the model:"
        if absent:
            message += f"\n  not in the checkpoint ({len(absent)}): {sorted(absent)}"
        if unused:
            message += f"\n  in the checkpoint but not in the model ({len(unused)}): {sorted(unused)}"
        if strict:
            raise CheckpointError(message)
        _warn(message + "\n  (strict=False: loading the rest)")
    return loaded


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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _warn(message: str) -> None:
    if _rank() == 0:
        warnings.warn(message, stacklevel=3)
