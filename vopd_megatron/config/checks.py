"""Checks of one section of a run's configuration, or of one raw flag value.

They are organised by class of mistake rather than by case, so that a new
flag is covered the day it is added:

* **Ranges.** Every numeric plugin field declares its admissible range in the
  schema (`schema.ranged`; the loss's flags take LossConfig's own,
  `schema.loss_field`); `check_ranges` reads them. Megatron-LM's own flags
  that Megatron accepts silently out of range, or rejects with a bare
  assertion, have theirs in `MEGATRON_RANGES`, checked on the raw command line
  (`check_megatron_values`) and on a RunConfig built in code
  (`run.check_megatron_fields`). A float is always finite: NaN and inf are
  refused for every float flag, ours and Megatron-LM's.
* **One model** (`validate_model_args`): its shape split TP x PP (for both
  models of a run, and for the checkpoint converter).
* **One section's flags together** (`check_distill`): the loss's own rules
  are LossConfig's (`DistillArgs.loss_config` words them in flags); here only
  `--vopd-top-k` with a mode that ignores it and `--vopd-updates-per-batch`
  without `--vopd-ppo-clip`.

The rules that compare sections (teacher and student sharing one vocabulary,
batch and layout divisibility, ...) are `RunConfig.validate`'s (`run.py`);
what the machine lacks is asked when a run starts (`model/runtime_checks.py`).
Every failure is a `ConfigError` whose message names the flag.
"""
from __future__ import annotations

import math
from dataclasses import fields

from ..loss.config import TOPK_MODES, describe_range, in_range
from .schema import ConfigError, DistillArgs, ModelArgs

#: Sections whose fields are the plugin's own flags (ranges declared in the schema).
PLUGIN_SECTIONS = ("distill", "data", "eval")

#: dest -> (lo, hi, lo_open, hi_open) for Megatron-LM flags (None: unbounded side).
MEGATRON_RANGES: dict[str, tuple] = {
    **{name: (1, None, False, False) for name in (
        "micro_batch_size", "global_batch_size", "train_iters", "train_samples", "num_layers", "hidden_size",
        "num_attention_heads", "ffn_hidden_size", "kv_channels", "num_query_groups", "seq_length",
        "max_position_embeddings", "vocab_size", "padded_vocab_size", "make_vocab_size_divisible_by",
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size", "log_interval",
        "save_interval", "lr_decay_iters", "lr_decay_samples", "exit_interval", "exit_duration_in_mins",
        "distributed_timeout_minutes", "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
        "recompute_num_layers", "lr_wsd_decay_iters", "lr_wsd_decay_samples",
    )},
    **{name: (0, None, False, False) for name in (
        "lr", "min_lr", "weight_decay", "start_weight_decay", "end_weight_decay", "clip_grad", "lr_warmup_iters",
        "lr_warmup_samples", "lr_warmup_init", "seed", "decoupled_lr", "decoupled_min_lr",
    )},
    **{name: (0, None, True, False) for name in (
        "adam_eps", "init_method_std", "embedding_init_method_std", "rotary_base", "layernorm_epsilon",
        "norm_epsilon", "rope_scaling_factor",
    )},
    **{name: (0, 1, False, False) for name in ("hidden_dropout", "attention_dropout", "lr_warmup_fraction")},
    **{name: (0, 1, False, True) for name in ("adam_beta1", "adam_beta2", "sgd_momentum")},
    "rotary_percent": (0, 1, True, False),
}

#: Megatron-LM-backed sections of a RunConfig whose fields MEGATRON_RANGES covers by name.
MEGATRON_SECTIONS = ("model", "teacher", "parallel", "train", "checkpoint", "logging")


def flag(name: str) -> str:
    """`vopd_top_k` -> `--vopd-top-k`."""
    return "--" + name.replace("_", "-")


def check_value(name: str, value, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> None:
    """ConfigError naming `--name` unless `value` is None or a finite number in the range."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{flag(name)} {value} must be a finite number")
    if not in_range(value, lo, hi, lo_open, hi_open):
        raise ConfigError(f"{flag(name)} {value} must be {describe_range(lo, hi, lo_open, hi_open)}")


def check_ranges(section) -> None:
    """The declared range of every numeric field of a plugin section."""
    for f in fields(section):
        if "range" in f.metadata:
            check_value(f.name, getattr(section, f.name), *f.metadata["range"])


def check_megatron_values(values: dict[str, object]) -> None:
    """Raw Megatron-LM flag values (dest -> value): every float finite, MEGATRON_RANGES held."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag(name)} {value} must be a finite number")
        if name in MEGATRON_RANGES:
            check_value(name, value, *MEGATRON_RANGES[name])


def validate_model_args(who: str, m: ModelArgs, tp: int, pp: int) -> None:
    """ConfigError if one model's shape cannot be split TP x PP (used for both
    models of a run and by the checkpoint converter)."""
    if m.vocab_size is None or m.vocab_size < 1:
        raise ConfigError(f"{who}: vocab size unknown (set --vocab-size or --tokenizer-model)")
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"{who}: --num-attention-heads {m.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}"
        )
    if m.query_groups % tp:
        raise ConfigError(f"{who}: --num-query-groups {m.query_groups} is not divisible by TP {tp}")
    if m.num_attention_heads % m.query_groups:
        raise ConfigError(f"{who}: --num-attention-heads must be a multiple of --num-query-groups")
    try:
        m.pipeline_stage_layers(pp)
    except ConfigError as exc:
        raise ConfigError(f"{who}: {exc}") from None
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"{who}: --hidden-size must be divisible by --num-attention-heads (or set --kv-channels)")
    if m.ffn_size % tp:
        raise ConfigError(f"{who}: --ffn-hidden-size {m.ffn_size} is not divisible by TP {tp}")
    if m.position_embedding_type not in ("rope", "learned_absolute", "none"):
        raise ConfigError(f"{who}: unsupported --position-embedding-type {m.position_embedding_type!r}")
    if m.normalization not in ("LayerNorm", "RMSNorm"):
        raise ConfigError(f"{who}: unsupported --normalization {m.normalization!r}")
    padded = m.padded_vocab_size(tp)
    if padded < m.vocab_size or padded % tp:
        raise ConfigError(f"{who}: --padded-vocab-size {padded} must be >= --vocab-size {m.vocab_size} "
                          f"and divisible by TP {tp}")


def check_distill(d: DistillArgs) -> None:
    """What the --vopd-* flags mean together: first the loss's own rules (LossConfig's
    validation, worded in flags), then the two that are about the flags, not the loss."""
    d.loss_config()
    if d.vopd_loss not in TOPK_MODES and d.vopd_top_k is not None:  # LossConfig ignores it: a flag would do nothing
        raise ConfigError(f"--vopd-top-k {d.vopd_top_k} has no effect with --vopd-loss {d.vopd_loss}: "
                          f"only {' and '.join(TOPK_MODES)} use it")
    if d.vopd_updates_per_batch > 1 and d.vopd_ppo_clip is None:  # the updates loop is the trainer's
        raise ConfigError("--vopd-updates-per-batch > 1 needs --vopd-ppo-clip (the later updates are off-policy)")
