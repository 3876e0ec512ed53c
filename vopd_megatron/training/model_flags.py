"""The model flags a checkpoint records: a model's shape as Megatron-LM flags.

`vopd-convert` writes them to `model_flags.yaml` beside its checkpoints (a
`--config` or a teacher config) and into the checkpoint's common state
(`vopd_convert.model_flags`); Megatron-LM's checkpoints carry the same shape
in their `args` Namespace (`model_flags_from_args`). `flags_to_model_args`
reads either back into `ModelArgs`, for the converter and for the checks a
run makes on the checkpoint it loads (`checkpoint_preflight`).
"""
from __future__ import annotations

import dataclasses

from ..config.schema import ModelArgs

#: ModelArgs fields a converted model's flags YAML sets (the shape; never seq-length or parallelism).
#: Megatron-LM's defaults apply to every flag not set, so the YAML also spells out what an HF model
#: has where Megatron-LM's default differs: no dropout, and --group-query-attention (without it
#: Megatron-LM ignores --num-query-groups).
FLAG_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "max_position_embeddings", "position_embedding_type", "rotary_base", "use_rope_scaling", "rope_scaling_factor",
    "normalization", "norm_epsilon", "swiglu", "untie_embeddings_and_output_weights", "disable_bias_linear",
    "add_qkv_bias", "qk_layernorm", "hidden_dropout", "attention_dropout", "vocab_size",
    "make_vocab_size_divisible_by",
)


def model_flags(m: ModelArgs) -> dict:
    """The `--flag: value` mapping (dashed Megatron-LM names) of a model, for a YAML `--config`
    or a teacher config (also read as the teacher's model_flags.yaml beside its checkpoint)."""
    flags = {}
    for name in FLAG_FIELDS:
        if name == "num_query_groups":
            flags["group-query-attention"] = m.num_query_groups is not None
        flags[name.replace("_", "-")] = getattr(m, name)
    return flags


def flags_to_model_args(flags: dict, base: ModelArgs | None = None) -> ModelArgs:
    """Inverse of `model_flags` (dashed or underscored keys)."""
    fields = {k.replace("-", "_"): v for k, v in flags.items()}
    if not fields.pop("group_query_attention", True):
        fields["num_query_groups"] = None
    return dataclasses.replace(base or ModelArgs(), **fields)


def model_flags_from_args(args) -> dict:
    """ModelArgs fields (the converter's model flags) of the model a checkpoint's `args` describe."""
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else None
    return dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=groups, kv_channels=args.kv_channels,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        use_rope_scaling=bool(getattr(args, "use_rope_scaling", False)),
        rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0), normalization=args.normalization,
        norm_epsilon=args.layernorm_epsilon, swiglu=args.swiglu,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        disable_bias_linear=not args.add_bias_linear, add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm, vocab_size=args.vocab_size or args.padded_vocab_size,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
    )
