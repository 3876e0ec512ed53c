"""Parameters on each GPU of a planned model: Megatron's formula, and a meta-device build to check it.

For each pipeline stage the student's and the teacher's GPTModel are built as
tensor-parallel rank 0 of that stage, on the meta device: Megatron's own layer
classes decide every parameter shape, and no byte of weight is allocated. The
grid position is handed to Megatron-Core through its `pg_collection` argument,
filled with stand-in groups that only answer `size()` and `rank()`. Megatron
asks `torch.distributed.is_initialized()` before it trusts any group (else it
takes every group size as 1), so when the caller has no process group a
throwaway one-rank gloo group on an in-memory store (no ports, no peers) lives
for the duration of the build. The meta build uses Megatron's local (plain
PyTorch) layer spec, whose parameters are the same as Transformer Engine's.

`stage_param_count` is the analytical count (also used by the checkpoint
preflight); `meta_counts` the built one. `vopd-train --dry-run` reports both
and whether they agree (model/dry_run.py).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings

import torch
import torch.distributed as dist

from ..config import ModelArgs, RunConfig
from ..config.megatron_args import megatron_transformer_config
from .builder import attention_env_kept, build_gpt_stage


# --- analytical parameter count -------------------------------------------------------------


def _norm_params(m: ModelArgs, dim: int) -> int:
    return dim * (2 if m.normalization == "LayerNorm" else 1)  # weight (+ bias)


def layer_param_count(m: ModelArgs, tp: int) -> tuple[int, int]:
    """(split over TP, replicated on every TP rank) parameters of one transformer layer."""
    h, d, f = m.hidden_size, m.head_dim, m.ffn_size
    qkv = d * (m.num_attention_heads + 2 * m.query_groups)  # fused QKV output width
    fc1 = f * (2 if m.swiglu else 1)  # gate and up projections, fused
    bias = not m.disable_bias_linear
    split = (h * qkv + (qkv if bias or m.add_qkv_bias else 0)  # linear_qkv
             + d * m.num_attention_heads * h  # linear_proj (its bias is replicated)
             + h * fc1 + (fc1 if bias else 0)  # linear_fc1
             + f * h)  # linear_fc2 (its bias is replicated)
    replicated = (2 * _norm_params(m, h)  # input and pre-MLP norms
                  + (2 * _norm_params(m, d) if m.qk_layernorm else 0)
                  + (2 * h if bias else 0))  # linear_proj and linear_fc2 biases
    return split // tp, replicated


def stage_param_count(m: ModelArgs, tp: int, pp: int, stage: int) -> int:
    """Parameters of tensor-parallel rank 0 of pipeline stage `stage`, as Megatron builds them."""
    split, replicated = layer_param_count(m, tp)
    count = m.pipeline_stage_layers(pp)[stage] * (split + replicated)
    vocab_shard = m.padded_vocab_size(tp) // tp * m.hidden_size  # [V/tp, h]
    if stage == 0:
        count += vocab_shard
        if m.position_embedding_type == "learned_absolute":
            count += (m.max_position_embeddings or m.seq_length) * m.hidden_size
    if stage == pp - 1:
        count += _norm_params(m, m.hidden_size)  # final norm
        tied = not m.untie_embeddings_and_output_weights
        if not tied or pp > 1:  # tied across stages: the last stage keeps a copy
            count += vocab_shard
    return count


class _GridSlot:
    """Stands in for a process group during a meta build: a size and this rank's place in it."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@contextlib.contextmanager
def _process_group_for_build():
    """A one-rank gloo group unless one exists (Megatron reads every group size as 1 without)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def meta_builds():
    """What the meta builds need: a process group (one-rank gloo unless one exists) and silence."""
    with _quiet(), _process_group_for_build():
        yield


@contextlib.contextmanager
def _quiet():
    """Silence Megatron's construction chatter (deprecations, apex fallbacks) during the builds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


#: TransformerConfig settings of the meta build that change no parameter: Megatron's local layer
#: spec (plain PyTorch, what runs without a GPU) refuses these where TE would accept them.
META_BUILD = dict(
    use_cpu_initialization=True,  # layers allocate with plain torch.empty -> the meta device
    perform_initialization=False,
    init_model_with_meta_device=True,  # no first/last-stage embedding all-reduce
    sequence_parallel=False, persist_layer_norm=False, layernorm_zero_centered_gamma=False,
    gradient_accumulation_fusion=False, apply_rope_fusion=False, fp8=None,
)


def meta_counts(m: ModelArgs, config: RunConfig, stage: int) -> tuple[int, int]:
    """(parameters on TP rank 0 of `stage`, this stage's share of the whole model), built on meta
    with the run's planned TransformerConfig (Megatron-LM's, as on the GPU target)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    p, t = config.parallel, config.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    tc = copy.copy(megatron_transformer_config(m, p, t))
    for name, value in META_BUILD.items():
        setattr(tc, name, value)
    groups = ProcessGroupCollection()
    groups.tp, groups.pp, groups.cp = _GridSlot(tp, 0), _GridSlot(pp, stage), _GridSlot(1, 0)
    groups.embd = groups.pos_embd = None
    with torch.device("meta"), attention_env_kept():
        model = build_gpt_stage(m, p, t, pre_process=stage == 0, post_process=stage == pp - 1,
                                config=tc, use_te=False, pg_collection=groups)
    local = sum(w.numel() for w in model.parameters())
    # The tied output copy on the last stage is marked `shared`; TP-split weights `tensor_model_parallel`.
    full = sum(w.numel() * (tp if getattr(w, "tensor_model_parallel", False) else 1)
               for w in model.parameters() if not getattr(w, "shared", False))
    return local, full
