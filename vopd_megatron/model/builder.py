"""Build one pipeline stage of a GPTModel from `ModelArgs`, the Megatron way.

The same function builds the student and the (frozen) teacher: they differ
only in their ModelArgs. The layer spec is Transformer Engine's when TE is
importable on a CUDA machine, Megatron-Core's local (pure PyTorch) spec
otherwise, so the CPU path needs neither TE nor apex.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ..config.schema import ModelArgs, ParallelArgs, TrainArgs


def te_available() -> bool:
    """Transformer Engine is usable: installed, and a GPU to run it on."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def transformer_config(m: ModelArgs, p: ParallelArgs, t: TrainArgs, fp8: bool = False):
    """Megatron-Core TransformerConfig for one model of the run.

    fp8: run the transformer layers' GEMMs in FP8 through Transformer Engine
    (model/fp8.py; the teacher only, with the TE layer spec).
    """
    from megatron.core.transformer import TransformerConfig

    from .fp8 import TEACHER_FP8_FIELDS

    dtype = torch.bfloat16 if t.bf16 else torch.float32
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_size,
        num_query_groups=m.query_groups,
        kv_channels=m.head_dim,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        add_bias_linear=not m.disable_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        # Uneven stages (Megatron-LM's --decoder-first/last-pipeline-num-layers); each model has its own.
        num_layers_in_first_pipeline_stage=m.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=m.decoder_last_pipeline_num_layers,
        sequence_parallel=p.sequence_parallel,
        bf16=t.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        calculate_per_token_loss=t.calculate_per_token_loss,
        # A stage's p2p tensors carry both models' activations (distill.py);
        # Megatron's batched isend/irecv misbehaves over gloo (MEGATRON_ON_CPU trap 2).
        batch_p2p_comm=torch.cuda.is_available(),
        # Free each sent stage output's data right after the send (Megatron-LM's setting).
        deallocate_pipeline_outputs=True,
        **(TEACHER_FP8_FIELDS if fp8 else {}),
    )


def layer_spec(m: ModelArgs, use_te: bool | None = None):
    """TE layer spec when available (or asked for), else the local spec."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    use_te = te_available() if use_te is None else use_te
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=m.qk_layernorm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=m.qk_layernorm, normalization=m.normalization)


def build_gpt_stage(m: ModelArgs, p: ParallelArgs, t: TrainArgs, pre_process: bool, post_process: bool,
                    config=None, use_te: bool | None = None, pg_collection=None):
    """The GPTModel layers of this rank's pipeline stage (Megatron's global state
    decides which layers that is), with a padded vocab-parallel output layer."""
    from megatron.core.models.gpt import GPTModel

    config = config or transformer_config(m, p, t)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(m, use_te),
        vocab_size=m.padded_vocab_size(p.tensor_model_parallel_size),
        max_sequence_length=m.max_position_embeddings or m.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type,
        rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base,
        rope_scaling=m.use_rope_scaling,
        rope_scaling_factor=m.rope_scaling_factor,
        **({"pg_collection": pg_collection} if pg_collection is not None else {}),
    )
