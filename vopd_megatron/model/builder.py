"""Build one pipeline stage of a GPTModel from `ModelArgs`, the Megatron way.

The same function builds the student and the (frozen) teacher: they differ
only in their ModelArgs. Their TransformerConfig is Megatron-LM's own
(`config.megatron_args.megatron_transformer_config`: the flags through
`validate_args` and `core_transformer_config_from_args`, as pretrain_gpt.py
does), adapted to this machine by `runtime_kernel_flags`. The layer spec is
Transformer Engine's when TE is importable on a CUDA machine and
`--transformer-impl` is transformer_engine (Megatron-LM's default),
Megatron-Core's local (pure PyTorch) spec otherwise, so the CPU path needs
neither TE nor apex; both have the same parameters.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from ..config.schema import ModelArgs, ParallelArgs, TrainArgs


def te_available() -> bool:
    """Transformer Engine is usable: installed, and a GPU to run it on."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


#: Megatron-Core's LanguageModule writes the --attention-backend choice into these at construction.
ATTENTION_ENV = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


@contextlib.contextmanager
def attention_env_kept():
    """Leave the process environment as it was after a meta build (a plan sets no backend)."""
    saved = {name: os.environ.get(name) for name in ATTENTION_ENV}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def runtime_kernel_flags() -> dict[str, object]:
    """Megatron-LM flags (by dest) this machine needs on top of the run's: its fused kernels off
    where they do not exist. They change how a result is computed, not what (to rounding).

    Without CUDA, as if given --no-rope-fusion --no-masked-softmax-fusion
    --no-bias-gelu-fusion --no-bias-swiglu-fusion --no-bias-dropout-fusion
    --no-gradient-accumulation-fusion --no-persist-layer-norm --use-cpu-initialization;
    with CUDA but no Transformer Engine, the first, the gradient-accumulation and
    the persistent-norm ones (TE's or apex's kernels; the local spec's torch norm)."""
    if te_available():
        return {}
    flags = {"apply_rope_fusion": False, "gradient_accumulation_fusion": False, "no_persist_layer_norm": True}
    if not torch.cuda.is_available():
        flags.update(masked_softmax_fusion=False, bias_gelu_fusion=False, bias_swiglu_fusion=False,
                     bias_dropout_fusion=False, use_cpu_initialization=True)
    return flags


def transformer_config(m: ModelArgs, p: ParallelArgs, t: TrainArgs, fp8: bool = False):
    """Megatron-Core TransformerConfig a model of the run is built with on this machine.

    fp8: run the transformer layers' GEMMs in FP8 through Transformer Engine
    (model/fp8.py; the teacher only, with the TE layer spec), as if given
    --fp8-format e4m3 --fp8-recipe tensorwise.
    """
    from ..config.megatron_args import megatron_namespace, transformer_config_from_namespace
    from .fp8 import TEACHER_FP8_FIELDS

    ns = megatron_namespace(m, p, t)
    for dest, value in {**runtime_kernel_flags(), **(TEACHER_FP8_FIELDS if fp8 else {})}.items():
        setattr(ns, dest, value)
    config = transformer_config_from_namespace(ns)
    # A stage's p2p tensors carry both models' activations (distill.py);
    # Megatron's batched isend/irecv misbehaves over gloo (MEGATRON_ON_CPU trap 2).
    config.batch_p2p_comm = config.batch_p2p_comm and torch.cuda.is_available()
    return config


def layer_spec(config, use_te: bool | None = None):
    """TE layer spec when available (or asked for) and --transformer-impl is transformer_engine,
    else the local spec; the arguments pretrain_gpt.py passes for a dense GPT model."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te is None:
        use_te = te_available() and config.transformer_impl == "transformer_engine"
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=config.qk_layernorm, use_te_activation_func=config.use_te_activation_func)
    return specs.get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)


def build_gpt_stage(m: ModelArgs, p: ParallelArgs, t: TrainArgs, pre_process: bool, post_process: bool,
                    config=None, use_te: bool | None = None, pg_collection=None):
    """The GPTModel layers of this rank's pipeline stage (Megatron's global state
    decides which layers that is), with a padded vocab-parallel output layer.

    The GPTModel arguments are pretrain_gpt.py's (gpt_builders.py), plus
    --rope-scaling-factor and --rotary-seq-len-interpolation-factor, which that
    script does not pass on in Megatron-LM 0.19 (docs/megatron_flags.md)."""
    from megatron.core.models.gpt import GPTModel

    config = config or transformer_config(m, p, t)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, use_te),
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
        seq_len_interpolation_factor=m.megatron_overrides.get("rotary_seq_len_interpolation_factor"),
        **({"pg_collection": pg_collection} if pg_collection is not None else {}),
    )
