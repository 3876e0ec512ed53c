"""Hugging Face `config.json` <-> `ModelArgs` (Megatron-LM flag names), with clear refusals.

Supported `model_type`s: llama, mistral, qwen2, qwen3. Everything the
Megatron model cannot express raises `ConversionError` naming the field
(Llama-3 RoPE scaling with non-default low/high frequency factors or original
context, other RoPE types, biases Megatron has no flag for, non-SiLU MLPs,
Qwen2 sliding-window layers). A Mistral `sliding_window` is accepted with a
warning: Megatron attends over the whole sequence, which is the same thing for
sequences no longer than the window.
"""
from __future__ import annotations

import warnings

from ..config.checks import validate_model_args
from ..config.schema import ConfigError, ModelArgs
from ..errors import UserError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

#: megatron-core's `RotaryEmbedding._apply_scaling` hard-codes these (only `factor` is a flag).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class ConversionError(UserError, ValueError):
    """A checkpoint or config the converter cannot (or must not) convert (a user error)."""


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
        kind = params.get("rope_type", params.get("type", "default"))
        return float(theta), (None if kind == "default" else params)
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(cfg.get("rope_theta", 10000.0)), scaling


def hf_config_to_model_args(cfg: dict, make_vocab_size_divisible_by: int = 128) -> ModelArgs:
    """ModelArgs for the Megatron model equivalent to the HF model described by `cfg`."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        archs = cfg.get("architectures")
        raise ConversionError(
            f"unsupported architecture: model_type {family!r} (architectures {archs}); "
            f"supported: {', '.join(FAMILIES)}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{family}: hidden_act {cfg['hidden_act']!r} is not SwiGLU's silu")
    if cfg.get("mlp_bias"):
        raise ConversionError(f"{family}: mlp_bias=true has no Megatron flag in this plugin")
    qkv_bias = family == "qwen2"  # Qwen2 biases q/k/v unconditionally; `attention_bias` is other families' field
    if cfg.get("attention_bias"):
        raise ConversionError(f"{family}: attention_bias=true (also biases o_proj) has no Megatron flag here")
    if family == "qwen2" and cfg.get("use_sliding_window"):
        raise ConversionError("qwen2: use_sliding_window=true cannot be expressed in Megatron")
    if family == "mistral" and cfg.get("sliding_window") is not None:
        warnings.warn(
            f"mistral: sliding_window={cfg['sliding_window']} is ignored; Megatron attends over the whole "
            "sequence, identical for sequences up to that length", stacklevel=2,
        )
    theta, scaling = _rope(cfg)
    use_scaling, factor = False, 8.0
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ConversionError(f"{family}: RoPE scaling type {kind!r} is not supported (only 'llama3')")
        for key, expected in MEGATRON_LLAMA3_ROPE.items():
            if float(scaling.get(key, expected)) != expected:
                raise ConversionError(
                    f"{family}: rope scaling {key}={scaling[key]} cannot be expressed: megatron-core's "
                    f"Llama-3 RoPE scaling fixes {key}={expected} (only the factor is configurable)"
                )
        use_scaling, factor = True, float(scaling["factor"])
    if theta != int(theta):
        raise ConversionError(f"{family}: rope theta {theta} is not an integer (--rotary-base is an int)")
    heads = cfg["num_attention_heads"]
    return ModelArgs(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads, num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        position_embedding_type="rope", rotary_base=int(theta), use_rope_scaling=use_scaling,
        rope_scaling_factor=factor, normalization="RMSNorm", norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        swiglu=True, untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        disable_bias_linear=True, add_qkv_bias=qkv_bias, qk_layernorm=family == "qwen3",
        vocab_size=cfg["vocab_size"], make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=cfg.get("max_position_embeddings"),
    )


def check_layout(m: ModelArgs, tp: int, pp: int) -> None:
    """ConversionError if the model cannot run at TP `tp` x PP `pp` (heads, groups, layers, FFN)."""
    try:
        validate_model_args("converted model", m, tp, pp)
    except ConfigError as exc:
        raise ConversionError(str(exc)) from None


def model_args_to_hf_config(m: ModelArgs, model_type: str | None = None) -> dict:
    """A `config.json` dict for a Megatron model trained without an HF origin (family guessed from flags)."""
    if not (m.swiglu and m.normalization == "RMSNorm" and m.disable_bias_linear and m.position_embedding_type == "rope"):
        raise ConversionError("only RMSNorm + SwiGLU + RoPE models without linear biases map to an HF family")
    model_type = model_type or ("qwen3" if m.qk_layernorm else "qwen2" if m.add_qkv_bias else "llama")
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}[model_type]
    rope = {"rope_theta": float(m.rotary_base), "rope_type": "default"}
    if m.use_rope_scaling:
        rope = {**rope, "rope_type": "llama3", "factor": m.rope_scaling_factor, **MEGATRON_LLAMA3_ROPE}
    return {
        "architectures": [arch], "model_type": model_type, "hidden_act": "silu",
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.query_groups,
        "head_dim": m.head_dim, "rms_norm_eps": m.norm_epsilon, "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_position_embeddings or m.seq_length,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights, "rope_parameters": rope,
        "attention_bias": False, "torch_dtype": "float32",
    }
