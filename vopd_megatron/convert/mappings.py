"""Tensor mappings between the Hugging Face Llama-style layout and Megatron-Core's GPTModel.

Megatron names are the *checkpoint* keys (`ShardedTensor.key`) of a GPTModel
built by `model.builder` (local or Transformer Engine spec alike): the layer
norms live under the fused-linear names (`linear_qkv.layer_norm_weight`), and
per-layer tensors are stacked along a leading layer axis
(`decoder.layers.<name>` of global shape [L, ...]).

Two layouts need more than a rename:

* fused QKV, per query group g (G groups, h heads, head dim d):
  [q_{g,1} .. q_{g,h/G}, k_g, v_g], each block d rows: [G * (h/G + 2) * d, hidden].
  Megatron shards dim 0 over TP in this order, so the TP1 view is TP-invariant.
* SwiGLU fc1 = [gate; up]: [2 * ffn, hidden].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config.schema import ModelArgs

LAYER = "decoder.layers."


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelArgs) -> torch.Tensor:
    """HF q [h*d, ...], k/v [G*d, ...] -> Megatron interleaved [G*(h/G+2)*d, ...]."""
    groups, d = m.query_groups, m.head_dim
    rest = q.shape[1:]
    q = q.reshape(groups, m.num_attention_heads // groups * d, *rest)
    k, v = k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, m: ModelArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    groups, d = m.query_groups, m.head_dim
    per_group = m.num_attention_heads // groups * d
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, per_group + 2 * d, *rest).split([per_group, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


@dataclass(frozen=True)
class LayerTensor:
    """One stacked per-layer Megatron tensor and how it is made from / split into HF tensors."""

    key: str                     # Megatron key without the `decoder.layers.` prefix
    hf: tuple[str, ...]          # HF names inside `model.layers.{i}.`
    to_megatron: Callable        # (hf tensors..., m) -> megatron tensor
    to_hf: Callable              # (megatron tensor, m) -> tuple of hf tensors


def _rename(key: str, hf: str) -> LayerTensor:
    return LayerTensor(key, (hf,), lambda t, m: t, lambda t, m: (t,))


def layer_tensors(m: ModelArgs) -> list[LayerTensor]:
    """The per-layer tensors of a Llama-family model with these flags, in HF file order."""
    qkv = lambda name: LayerTensor(  # noqa: E731
        f"self_attention.linear_qkv.{name}",
        tuple(f"self_attn.{p}_proj.{name}" for p in "qkv"),
        lambda q, k, v, m: fuse_qkv(q, k, v, m), split_qkv,
    )
    out = [
        _rename("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
        qkv("weight"),
        *([qkv("bias")] if m.add_qkv_bias else []),
        *([_rename("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
           _rename("self_attention.k_layernorm.weight", "self_attn.k_norm.weight")] if m.qk_layernorm else []),
        _rename("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
        _rename("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight"),
        LayerTensor("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
                    lambda gate, up, m: torch.cat([gate, up]), lambda t, m: tuple(t.chunk(2))),
        _rename("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
    ]
    return out


def hf_shapes(m: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this model holds, with its shape
    (for checking the weights against config.json before converting)."""
    h, g, d, hidden, ffn, vocab = m.num_attention_heads, m.query_groups, m.head_dim, m.hidden_size, m.ffn_size, \
        m.vocab_size
    layer = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (h * d, hidden), "self_attn.k_proj.weight": (g * d, hidden),
        "self_attn.v_proj.weight": (g * d, hidden), "self_attn.o_proj.weight": (hidden, h * d),
        "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
    }
    if m.add_qkv_bias:
        layer.update({"self_attn.q_proj.bias": (h * d,), "self_attn.k_proj.bias": (g * d,),
                      "self_attn.v_proj.bias": (g * d,)})
    if m.qk_layernorm:
        layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    out = {EMBEDDING[1]: (vocab, hidden), FINAL_NORM[1]: (hidden,)}
    if m.untie_embeddings_and_output_weights:
        out[OUTPUT[1]] = (vocab, hidden)
    for i in range(m.num_layers):
        out.update({hf_layer_name(i, name): shape for name, shape in layer.items()})
    return out


#: Linear layers whose (empty, local-spec) `_extra_state` Megatron stores per layer as a ShardedObject.
EXTRA_STATE_KEYS = (
    "self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2",
)

EMBEDDING = ("embedding.word_embeddings.weight", "model.embed_tokens.weight")
FINAL_NORM = ("decoder.final_layernorm.weight", "model.norm.weight")
OUTPUT = ("output_layer.weight", "lm_head.weight")


def hf_layer_name(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    """[V, hidden] -> [padded, hidden], zero rows appended (Megatron's padded vocabulary)."""
    if t.shape[0] > padded:
        raise ValueError(f"vocabulary tensor has {t.shape[0]} rows, more than the padded size {padded}")
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])]) if padded > t.shape[0] else t
