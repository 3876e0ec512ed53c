"""Hugging Face <-> Megatron-Core checkpoint conversion (`vopd-convert`).

Llama 3, Qwen2/2.5, Qwen3 and Mistral share one Hugging Face layout, so one
tensor mapping (`mappings`) serves them all; the families differ only in
config fields (`hf_config`): QKV bias (Qwen2), QK-norm (Qwen3), tied
embeddings, RoPE theta and Llama-3 scaling.

Both directions stream tensor by tensor. HF -> Megatron (`hf_to_megatron`)
writes a `torch_dist` dist-checkpoint in the layout `vopd-train` writes (one
global TP1·PP1 view, layers as per-layer chunks of stacked tensors), but
produces each chunk from lazy safetensors reads only when torch's checkpoint
writer asks for it (`dcp_io.LazySavePlanner`). Megatron -> HF
(`megatron_to_hf`) reads one chunk at a time from the torch_dist files
(`dcp_io.ChunkReader`) and writes size-capped safetensors shards.
"""
from .hf_config import ConversionError, hf_config_to_model_args, model_args_to_hf_config
from .hf_to_megatron import convert_hf_to_megatron
from .megatron_to_hf import convert_megatron_to_hf

__all__ = [
    "ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf",
    "hf_config_to_model_args", "model_args_to_hf_config",
]
