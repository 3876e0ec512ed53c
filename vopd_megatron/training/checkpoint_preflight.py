"""Checkpoint paths checked before any process group, model or optimizer exists.

A wrong `--load`, `--teacher-load` or `--save` used to surface after the build
(on a cluster: after minutes of loading a 70B teacher), at the first save (the
training so far lost), or never (a mistyped `--load` trained from scratch).
These checks read only the filesystem and each checkpoint's small index and
common state, so every entry point runs them first and turns their
`CheckpointError` into one `error: ...` line.

Decisions (docs/errors.md, "Checkpoints"):

- `--load DIR` that does not exist, is empty or holds no checkpoint is an error
  (Megatron-LM warns and trains from random initialisation unless
  `--exit-on-missing-checkpoint`), except when DIR is also `--save`: the
  self-restarting job's first launch, which starts from iteration 0 and says so.
- `--load DIR` with checkpoint debris but nothing intact is an error listing
  every directory and what is wrong with it; a damaged newest iteration falls
  back to the previous intact one with a warning (`fallback=False`: an error).
- `--teacher-load DIR` must hold an intact checkpoint; when the checkpoint
  records its model shape (Megatron-LM's `args`, ours), a shape other than the
  teacher's flags is an error naming the differing flags.
- `--save DIR` must be (or be creatable as) a writable directory with room for
  one more checkpoint (`checkpoint_bytes`); earlier iterations are kept.
- Resuming (`--load` without `--finetune`) a vopd-train checkpoint with another
  `--vopd-loss`, or with `--train-iters` not above its iteration, is an error.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from .. import launch
from .checkpoint_files import CheckpointError, Found, find_latest, holds_checkpoints

GB = 2**30


def check_load_dir(path: str, flag: str, *, fresh_start_ok: bool = False, fallback: bool = True) -> Found | None:
    """The iteration `path` would load (`Found`), or None for a fresh start (only with `fresh_start_ok`).

    Raises CheckpointError naming `flag` and the path (and the damaged file, if any).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{flag} {path} is a file, not a checkpoint directory")
    if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(f"{flag} {path} is not readable (permission denied)")
    if not holds_checkpoints(path):
        if fresh_start_ok:
            return None
        what = "does not exist" if not os.path.exists(path) else "holds no checkpoint (no tracker, no iter_* directory)"
        raise CheckpointError(f"{flag} {path} {what}")
    try:
        found = find_latest(path, fallback)
    except CheckpointError as exc:
        raise CheckpointError(f"{flag} {path}: {exc}") from None
    if found.path is None:
        raise CheckpointError(f"{flag} {path} holds no complete checkpoint to load or fall back to:\n  "
                              + "\n  ".join(found.notes))
    return found


def check_save_dir(path: str, flag: str, expected_bytes: int) -> None:
    """`path` is, or can be created as, a writable directory with `expected_bytes` free.

    Writes and removes one empty temporary file to prove writability (permission
    bits alone do not show a read-only mount); creates nothing else.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{flag} {path} is a file, not a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CheckpointError(f"{flag} {path} cannot be created: {existing} is a file")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".vopd-write-test-"):
            pass
    except OSError as exc:
        where = path if existing == os.path.abspath(path) else f"{existing} (to create {path})"
        raise CheckpointError(f"{flag} {path} is not writable: {where}: {exc.strerror or exc}") from None
    free = shutil.disk_usage(existing).free
    if free < expected_bytes:
        raise CheckpointError(
            f"{flag} {path}: {free / GB:.2f} GiB free on its filesystem, a checkpoint needs about "
            f"{expected_bytes / GB:.2f} GiB (no space left for the first save)"
        )


def checkpoint_bytes(num_params: int, bf16: bool, with_optimizer: bool) -> int:
    """Bytes of one checkpoint of `num_params` parameters: the weights in their dtype, plus with
    Adam its fp32 moments (and fp32 main weights under bf16), plus 2% for indexes and common state."""
    per_param = (2 if bf16 else 4) + ((8 + (4 if bf16 else 0)) if with_optimizer else 0)
    return int(num_params * per_param * 1.02) + (1 << 20)


def model_params(m) -> int:
    """Parameters of a GPT model of shape `m` (ModelArgs), counted at TP 1, PP 1."""
    from ..model.param_count import stage_param_count

    return stage_param_count(m, 1, 1, 0)


# --- what a checkpoint records, against this run -----------------------------------------------

_SHAPE_FLAGS = (  # (flag, the ModelArgs value it sets)
    ("--num-layers", lambda m: m.num_layers),
    ("--hidden-size", lambda m: m.hidden_size),
    ("--num-attention-heads", lambda m: m.num_attention_heads),
    ("--num-query-groups", lambda m: m.query_groups),
    ("--ffn-hidden-size", lambda m: m.ffn_size),
    ("--kv-channels", lambda m: m.head_dim),
    ("--swiglu", lambda m: m.swiglu),
    ("--normalization", lambda m: m.normalization),
    ("--untie-embeddings-and-output-weights", lambda m: m.untie_embeddings_and_output_weights),
)


def recorded_model(common: dict | None):
    """The model shape (ModelArgs) a checkpoint records: the converter's flags, or the Megatron-LM
    `args` (Megatron-LM's own checkpoints and vopd-train's); None when it records none."""
    from argparse import Namespace

    from .model_flags import flags_to_model_args, model_flags_from_args

    common = common or {}
    if isinstance(common.get("vopd_convert"), dict):
        return flags_to_model_args(common["vopd_convert"]["model_flags"])
    if isinstance(common.get("args"), Namespace):
        return flags_to_model_args(model_flags_from_args(common["args"]))
    return None


def shape_mismatches(saved, m) -> list[str]:
    """The flags on which the recorded shape `saved` and this run's ModelArgs `m` differ."""
    if saved is None:
        return []
    return [f"{flag}: checkpoint {value(saved)}, this run {value(m)}"
            for flag, value in _SHAPE_FLAGS if value(saved) != value(m)]


def check_architecture(found: Found, m, flag: str, config_hint: str) -> None:
    """A checkpoint whose recorded shape differs from ModelArgs `m` is an error naming the flags."""
    wrong = shape_mismatches(recorded_model(found.common), m)
    if wrong:
        raise CheckpointError(f"{flag} {os.path.dirname(found.path)} holds a model of another shape "
                              f"({'; '.join(wrong)}); set {config_hint} to the checkpoint's shape")


def check_resume(found: Found, run, flag: str = "--load") -> None:
    """Resuming `found` with this run's loss mode and iteration budget."""
    info = (found.common or {}).get("vopd") or {}
    state = info.get("state") or {}
    iteration = found.iteration
    where = f"{flag} {os.path.dirname(found.path)} (iteration {iteration})"
    saved_loss = state.get("vopd_loss")
    if saved_loss is not None and saved_loss != run.distill.vopd_loss:
        raise CheckpointError(
            f"--vopd-loss {run.distill.vopd_loss} differs from the loss {saved_loss} of the run in {where}: its "
            f"optimizer state and schedule belong to that run; resume with --vopd-loss {saved_loss}, or start a "
            "new run from its weights with --finetune"
        )
    if iteration >= run.train.train_iters:
        raise CheckpointError(
            f"--train-iters {run.train.train_iters} leaves nothing to train: {where} is already there; "
            "raise --train-iters to continue, or use --finetune to start a new run from its weights"
        )


# --- per entry point --------------------------------------------------------------------------


def _checking_rank() -> bool:
    """Global rank 0 checks (from the launcher's environment: no process group yet). The other
    ranks skip the reads: on a failure rank 0 exits and the launcher stops them."""
    return launch.rank() == 0


def preflight_train(run) -> Found | None:
    """vopd-train's checkpoint paths; the iteration `--load` resumes (None: a fresh start, or not rank 0)."""
    ck = run.checkpoint
    if ck.finetune and not ck.load:
        raise CheckpointError("--finetune needs --load (the checkpoint whose weights to start from)")
    if not _checking_rank():
        return None
    found = None
    if ck.load:
        same = bool(ck.save) and os.path.abspath(ck.load) == os.path.abspath(ck.save)
        found = check_load_dir(ck.load, "--load", fresh_start_ok=same and not ck.finetune,
                               fallback=ck.checkpoint_fallback)
        if found is None:
            print(f"[vopd] --load {ck.load} holds no checkpoint yet (it is also --save): starting from "
                  "iteration 0", flush=True)
        if found is not None:
            check_architecture(found, run.model, "--load", "the model flags")
            if not ck.finetune:
                check_resume(found, run)
    if ck.teacher_load:
        check_architecture(check_load_dir(ck.teacher_load, "--teacher-load", fallback=ck.checkpoint_fallback),
                           run.teacher, "--teacher-load", "--teacher-model-config")
    if ck.save:
        check_save_dir(ck.save, "--save", checkpoint_bytes(model_params(run.model), run.train.bf16, True))
    return found


def preflight_weights(run, *, save_with_optimizer: bool = False) -> None:
    """vopd-eval / vopd-sft: `--load` (weights) and `--teacher-load` must hold checkpoints of the
    flags' shapes; `--save`, when given, must have room for one checkpoint."""
    ck = run.checkpoint
    if not _checking_rank():
        return
    if ck.load:
        check_architecture(check_load_dir(ck.load, "--load", fallback=ck.checkpoint_fallback),
                           run.model, "--load", "the model flags")
    if ck.teacher_load:
        check_architecture(check_load_dir(ck.teacher_load, "--teacher-load", fallback=ck.checkpoint_fallback),
                           run.teacher, "--teacher-load", "--teacher-model-config")
    if ck.save:
        check_save_dir(ck.save, "--save",
                       checkpoint_bytes(model_params(run.model), run.train.bf16, save_with_optimizer))
