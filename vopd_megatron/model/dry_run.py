"""`vopd-train --dry-run`: validate a layout and estimate its memory per GPU, without a GPU.

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

The memory estimate, per GPU of stage p, bytes (P_s, P_t: the student's and
the teacher's parameters on that GPU, as built; e: 2 with --bf16 else 4):

* weights     = e * (P_s + P_t)               teacher frozen: no grads, no optimizer
* gradients   = 4 * P_s                       Megatron DDP's fp32 main_grad buffer
* optimizer   = k * P_s / (DP if --use-distributed-optimizer else 1)
                k = 12 with --bf16 (fp32 master copy + Adam's two fp32 moments), else 8
* activations = min(PP - p, M) * L_p * A_layer   1F1B keeps that many microbatches in flight
                (M microbatches per DP rank, L_p student layers on the stage: an even
                share, or --decoder-first/last-pipeline-num-layers, ModelArgs.pipeline_stage_layers)
                + one teacher layer's A_layer (the teacher keeps nothing for backward)
                + p2p (model.distill sends [s, b, h_s + h_t]): the teacher slice of each
                kept received tensor, and the sent tensors, which Megatron keeps until
                backward unless `deallocate_pipeline_outputs` pseudo-frees them
                + on the last stage the inputs of the final norm and the output layer
* logits      = last stage only: student and teacher logits [s*b, V/tp] in fp32
                (Float16Module upcasts the last stage's output; the student's bf16
                logits live while upcast) + the loss's fp32 chunk temporaries
                (LOSS_FP32_TEMPORARIES * 4 * CHUNK_ELEMENTS). In backward the
                student's logit gradient replaces the teacher's logits.
                With --vopd-fused-output there are no logit shards: FUSED_TILE_BUFFERS
                fp32 tiles of <= TILE_ELEMENTS, plus 2 * 4 * s*b*h_s for the fp32
                hidden-state gradient and one tile's dgrad product.

A_layer is Korthikanti et al. (2022, "Reducing Activation Recomputation in
Large Transformer Models") generalised to grouped-query attention and gated
MLPs; for their GPT shape (MHA, 4h GeLU MLP, dropout, unfused attention) it is
exactly s*b*h*(34 + 5*a*s/h) / tp with sequence parallelism and
s*b*h*(10 + 24/tp + 5*a*s/(h*tp)) without. Inputs of the norms, of the QKV
and fc1 GEMMs and the dropout masks are split over TP only by sequence
parallelism; everything else is split by heads or ffn columns. Flash/fused
attention (Transformer Engine on a GPU) stores an fp32 log-sum-exp per head
and row instead of the [a, s, s] scores. Not included: CUDA context, NCCL
buffers, allocator fragmentation, DDP bucket padding (typically a few GiB).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config.megatron_args import megatron_transformer_config
from ..config import ConfigError, ModelArgs, RunConfig
from ..loss.fused_steps import TILE_ELEMENTS
from ..loss.vocab_parallel import CHUNK_ELEMENTS
from .builder import attention_env_kept, build_gpt_stage

GiB = 1 << 30
#: fp32 [rows, V/tp] buffers alive at once inside one loss chunk (stats.local_statistics:
#: both tempered inputs, both shifted copies, their difference, one product).
LOSS_FP32_TEMPORARIES = 6
#: fp32 [n, w] tile buffers alive at once in the fused output-layer loss (--vopd-fused-output):
#: the student and teacher tiles and stats.local_statistics' three temporaries.
FUSED_TILE_BUFFERS = 5


@dataclass
class StageReport:
    """One pipeline stage, as seen by tensor-parallel rank 0 of it; memory in bytes."""

    stage: int
    student_layers: int
    teacher_layers: int
    student_params: int
    """Parameters on this GPU, trainable (meta-built count)."""
    teacher_params: int
    """Parameters on this GPU, frozen (meta-built count)."""
    student_params_formula: int
    teacher_params_formula: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits


@dataclass
class DryRunReport:
    world_size: int
    num_nodes: int | None
    tp: int
    pp: int
    dp: int
    num_microbatches: int
    micro_batch_size: int
    seq_length: int
    stages: list[StageReport]
    student_total_params: int
    """Whole model, every parameter once (the tied output copy of the last stage not counted)."""
    teacher_total_params: int
    formulas: list[str] = field(default_factory=list)
    """The memory formulas with this run's constants filled in."""
    notes: list[str] = field(default_factory=list)

    @property
    def formula_matches(self) -> bool:
        return all(s.student_params == s.student_params_formula and s.teacher_params == s.teacher_params_formula
                   for s in self.stages)

    @property
    def peak(self) -> StageReport:
        return max(self.stages, key=lambda s: s.total)

    def fits(self, gpu_memory_gb: float) -> bool:
        """The fullest stage's estimate is within `gpu_memory_gb` GiB."""
        return self.peak.total <= gpu_memory_gb * GiB


def dry_run_report(config: RunConfig, world_size: int, num_nodes: int | None = None, *,
                   flash_attention: bool = True) -> DryRunReport:
    """Validate `config` for `world_size` GPUs and estimate memory per GPU, stage by stage.

    No process group is needed, no GPU is touched, no weight is allocated.
    num_nodes: nodes of the run, to check that tensor-parallel groups stay inside one.
    flash_attention: the run uses fused attention (Transformer Engine on a GPU);
        False counts the [a, s, s] scores of Megatron's local core attention.
    """
    config.validate(world_size)
    p, t = config.parallel, config.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp, micro = config.data_parallel_size(world_size), config.num_microbatches(world_size)
    notes = _layout_notes(config, world_size, num_nodes)
    stages, student_total, teacher_total = [], 0, 0
    with _quiet(), _process_group_for_build():
        # Without Megatron's pseudo-free, a stage keeps each sent tensor until its backward.
        keeps_sent = not megatron_transformer_config(config.model, p, t).deallocate_pipeline_outputs
        s_layers, t_layers = config.model.pipeline_stage_layers(pp), config.teacher.pipeline_stage_layers(pp)
        for stage in range(pp):
            s_local, s_full = _meta_counts(config.model, config, stage)
            t_local, t_full = _meta_counts(config.teacher, config, stage)
            student_total, teacher_total = student_total + s_full, teacher_total + t_full
            mem = _stage_memory(config, stage, s_local, t_local, dp, micro, flash_attention, keeps_sent)
            stages.append(StageReport(
                stage, s_layers[stage], t_layers[stage], s_local, t_local,
                stage_param_count(config.model, tp, pp, stage), stage_param_count(config.teacher, tp, pp, stage),
                **mem,
            ))
    return DryRunReport(world_size, num_nodes, tp, pp, dp, micro, t.micro_batch_size, config.model.seq_length,
                        stages, student_total, teacher_total, _formulas(config, dp, flash_attention, keeps_sent),
                        notes)


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


# --- meta-device build ------------------------------------------------------------------


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


def _meta_counts(m: ModelArgs, config: RunConfig, stage: int) -> tuple[int, int]:
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


# --- memory ------------------------------------------------------------------------------


def layer_activation_bytes(m: ModelArgs, seq: int, micro_batch: int, tp: int, sequence_parallel: bool,
                           elem_bytes: int, flash_attention: bool = True, dropout: bool = True) -> float:
    """Bytes one transformer layer keeps for backward per microbatch (Korthikanti et al., generalised).

    dropout: count dropout masks (1 byte per element) where the model's dropout is > 0
        (False for a forward-only teacher in eval mode).
    """
    s, b, h, e = seq, micro_batch, m.hidden_size, elem_bytes
    a, d, g, f = m.num_attention_heads, m.head_dim, m.query_groups, m.ffn_size
    sbh = s * b * h
    hidden_mask = sbh if dropout and m.hidden_dropout > 0 else 0
    # Split over TP only by sequence parallelism: [s, b, h] tensors.
    replicated = (2 * e * sbh  # inputs of the two norms
                  + e * sbh + e * sbh  # inputs of the QKV and fc1 GEMMs
                  + 2 * hidden_mask)  # dropout masks after attention and after the MLP
    # Split over TP by heads or ffn columns.
    split = (e * s * b * d * (a + 2 * g)  # Q, K, V
             + e * s * b * a * d  # core attention output = linear_proj input
             + e * s * b * f * (2 if m.swiglu else 1)  # activation input (gate and up for SwiGLU)
             + e * s * b * f)  # linear_fc2 input
    if flash_attention:
        split += 4 * a * s * b  # fp32 log-sum-exp per head and row
    else:
        scores = a * s * s * b
        split += e * scores  # softmax output
        if dropout and m.attention_dropout > 0:
            split += scores + e * scores  # dropout mask and output
    return replicated / (tp if sequence_parallel else 1) + split / tp


def _stage_memory(config: RunConfig, stage: int, p_s: int, p_t: int, dp: int, micro: int,
                  flash_attention: bool, keeps_sent: bool) -> dict:
    par, tr, ms, mt = config.parallel, config.train, config.model, config.teacher
    tp, pp, sp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.sequence_parallel
    e = 2 if tr.bf16 else 4
    s, b = ms.seq_length, tr.micro_batch_size
    hidden = s * b / (tp if sp else 1)  # elements per hidden unit of a [s, b, h] tensor on one GPU

    in_flight = min(pp - stage, micro)  # 1F1B: warm-up depth of this stage
    layers = ms.pipeline_stage_layers(pp)[stage]
    activations = in_flight * layers * layer_activation_bytes(ms, s, b, tp, sp, e, flash_attention)
    activations += layer_activation_bytes(mt, s, b, tp, sp, e, flash_attention, dropout=False)  # teacher, transient
    # p2p (model.distill): a stage receives and sends [s, b, h_s + h_t]. The received
    # tensor lives until the microbatch's backward; its student slice is the first
    # layer's input, counted above, its teacher slice is not.
    if stage > 0:
        activations += in_flight * e * hidden * mt.hidden_size
    if stage < pp - 1:
        kept = in_flight if keeps_sent else 1
        activations += kept * e * hidden * (ms.hidden_size + mt.hidden_size)
    else:
        activations += 2 * e * hidden * ms.hidden_size  # inputs of the final norm and the output layer

    logits = 0.0
    if stage == pp - 1:
        rows, width = s * b, ms.padded_vocab_size(tp) // tp
        chunk = min(rows, max(1, CHUNK_ELEMENTS // width)) * width
        # Student and teacher logits in fp32 (Float16Module upcasts on the last stage),
        # with the student's bf16 output alive while it is upcast.
        logits = (2 * 4 + (e if e < 4 else 0)) * rows * width + LOSS_FP32_TEMPORARIES * 4 * chunk
        if config.distill.vopd_fused_output:  # no logit shards: tiles, and the fp32 hidden-state gradient
            logits = (FUSED_TILE_BUFFERS * 4 * min(TILE_ELEMENTS, rows * width)
                      + 2 * 4 * rows * ms.hidden_size)  # dh accumulator + one tile's dgrad product

    optimizer_bytes = 12 if tr.bf16 else 8
    return dict(
        weights=e * (p_s + p_t),
        grads=4 * p_s,
        optimizer=optimizer_bytes * p_s / (dp if par.use_distributed_optimizer else 1),
        activations=activations,
        logits=logits,
    )


def _formulas(config: RunConfig, dp: int, flash_attention: bool, keeps_sent: bool) -> list[str]:
    """The memory formulas with this run's constants, for the report."""
    bf16, sp = config.train.bf16, config.parallel.sequence_parallel
    e, k = (2, 12) if bf16 else (4, 8)
    shards = f" / {dp}" if config.parallel.use_distributed_optimizer else ""
    attention = "flash attention" if flash_attention else "unfused attention keeps [a, s, s] scores"
    kept = "min(PP-p, M)" if keeps_sent else "1 (pseudo-freed)"
    return [
        "P_s, P_t = student, teacher parameters on the GPU; M microbatches; p the stage; s, b, h, V, tp configured",
        f"weights = {e}*(P_s + P_t); grads = 4*P_s (fp32 main_grad); "
        f"optim = {k}*P_s{shards} ({'fp32 master + ' if bf16 else ''}2 fp32 Adam moments)",
        f"activ = min(PP-p, M) * layers * A_layer (Korthikanti et al. for GQA/SwiGLU, {attention}, "
        f"{'/tp' if sp else 'partly /tp: no sequence parallel'}) + one teacher layer's A_layer",
        f"  + p2p: received teacher slices min(PP-p, M)*{e}*s*b*h_t, sent [s, b, h_s+h_t] x {kept}"
        f"{' (/tp)' if sp else ''}",
        f"logits (last stage) = (4+4{'+2' if bf16 else ''})*s*b*V/tp (fp32 student and teacher logits"
        f"{', bf16 while upcast' if bf16 else ''}) + {LOSS_FP32_TEMPORARIES} fp32 loss chunks of <= "
        f"{CHUNK_ELEMENTS:,} elements" if not config.distill.vopd_fused_output else
        f"logits (last stage, --vopd-fused-output: no logit shards) = {FUSED_TILE_BUFFERS} fp32 tiles of <= "
        f"{TILE_ELEMENTS:,} elements + 2*4*s*b*h_s (fp32 hidden-state gradient and one tile's dgrad product)",
    ]


def _layout_notes(config: RunConfig, world_size: int, num_nodes: int | None) -> list[str]:
    tp = config.parallel.tensor_model_parallel_size
    if num_nodes is None:
        return []
    if num_nodes < 1 or world_size % num_nodes:
        raise ConfigError(f"world size {world_size} is not a multiple of --num-nodes {num_nodes}")
    per_node = world_size // num_nodes
    if per_node % tp:
        return [f"TP {tp} groups span nodes ({per_node} GPUs per node): tensor-parallel traffic leaves NVLink"]
    return []


# --- report --------------------------------------------------------------------------------


def format_report(report: DryRunReport, gpu_memory_gb: float = 80.0) -> str:
    """The per-stage table `vopd-train --dry-run` prints; `gpu_memory_gb` in GiB for the verdict."""
    r = report
    nodes = f" on {r.num_nodes} nodes x {r.world_size // r.num_nodes} GPUs" if r.num_nodes else ""
    lines = [
        f"layout: {r.world_size} GPUs{nodes} = TP {r.tp} x PP {r.pp} x DP {r.dp}; "
        f"{r.num_microbatches} microbatches of {r.micro_batch_size} x {r.seq_length} tokens per DP rank",
        f"{'stage':>5} {'layers S/T':>10} {'params S/GPU':>15} {'params T/GPU':>15} | {'GiB/GPU:':<8}"
        f"{'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'logits':>7} {'total':>7}",
    ]
    for s in r.stages:
        gib = [x / GiB for x in (s.weights, s.grads, s.optimizer, s.activations, s.logits, s.total)]
        lines.append(
            f"{s.stage:>5} {f'{s.student_layers}/{s.teacher_layers}':>10} {s.student_params:>15,} "
            f"{s.teacher_params:>15,} | {'':<8}" + " ".join(f"{x:>{w}.1f}" for x, w in zip(gib, (8, 7, 7, 7, 7, 7)))
        )
    check = "matches" if r.formula_matches else "DIFFERS from"
    peak = r.peak
    verdict = "fits" if r.fits(gpu_memory_gb) else "does NOT fit"
    lines += [
        f"totals: student {r.student_total_params:,} params ({r.student_total_params / 1e9:.2f} B, trainable), "
        f"teacher {r.teacher_total_params:,} ({r.teacher_total_params / 1e9:.2f} B, frozen)",
        f"parameter formula {check} the meta-device build on every stage",
        f"peak: stage {peak.stage} needs {peak.total / GiB:.1f} GiB of {gpu_memory_gb:g} GiB per GPU: {verdict}"
        " (CUDA context, NCCL buffers and fragmentation not included)",
    ]
    lines += ["memory per GPU, bytes:"] + [f"  {f}" for f in r.formulas]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
