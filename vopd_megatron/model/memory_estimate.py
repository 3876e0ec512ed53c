"""Memory per GPU of a planned run, in bytes: the formulas `vopd-train --dry-run` reports.

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
                fp32 tiles of <= TILE_ELEMENTS, the backward's gradient group
                (GRAD_BUFFER_TILES tiles' bytes) and 4 * s*b*h_s for the fp32
                hidden-state gradient (its dgrad GEMMs add into it in place).

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

from ..config import ModelArgs, RunConfig
from ..loss.fused_steps import GRAD_BUFFER_TILES, TILE_ELEMENTS
from ..loss.vocab_parallel import CHUNK_ELEMENTS

#: fp32 [rows, V/tp] buffers alive at once inside one loss chunk (stats.local_statistics:
#: both tempered inputs, both shifted copies, their difference, one product).
LOSS_FP32_TEMPORARIES = 6
#: fp32 [n, w] tile buffers alive at once in the fused output-layer loss (--vopd-fused-output):
#: the student and teacher tiles and stats.local_statistics' three temporaries.
FUSED_TILE_BUFFERS = 5


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


def stage_memory(config: RunConfig, stage: int, p_s: int, p_t: int, dp: int, micro: int,
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
            tile = 4 * min(TILE_ELEMENTS, rows * width)  # one fp32 [n, w] tile
            logits = ((FUSED_TILE_BUFFERS + GRAD_BUFFER_TILES) * tile
                      + 4 * rows * ms.hidden_size)  # + the fp32 dh accumulator

    optimizer_bytes = 12 if tr.bf16 else 8
    return dict(
        weights=e * (p_s + p_t),
        grads=4 * p_s,
        optimizer=optimizer_bytes * p_s / (dp if par.use_distributed_optimizer else 1),
        activations=activations,
        logits=logits,
    )


def formulas(config: RunConfig, dp: int, flash_attention: bool, keeps_sent: bool) -> list[str]:
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
        f"{TILE_ELEMENTS:,} elements + the backward's gradient group ({GRAD_BUFFER_TILES} tiles' bytes) + 4*s*b*h_s "
        "(fp32 hidden-state gradient)",
    ]
