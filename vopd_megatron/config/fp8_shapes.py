"""Can a model's GEMMs run in FP8? Plain arithmetic on its shape, checked with the configuration.

Transformer Engine runs an FP8 GEMM only on 2-D inputs whose rows are a
multiple of 8 and columns a multiple of 16
(`transformer_engine.pytorch.utils.assert_dim_for_fp8_exec`), applied to
activations `[tokens, in]` and weights `[out, in]`; megatron-core aligns FP8
GEMMs to 16 for every recipe but mxfp8 (`fp8_utils.get_fp8_align_size`). We
require 16 for every dimension of every GEMM of one layer on one TP rank, and
for the token rows of one micro-batch (`micro_batch_size * seq_length`,
divided by TP under sequence parallelism).

This needs no GPU, so `RunConfig.validate` (and `--dry-run`) refuse a shape
that cannot run in FP8 on any machine (`--teacher-fp8`, `--fp8-format`).
Whether *this* machine can run FP8 at all is asked when the run starts
(model/fp8.py, `fp8_runtime_problems`).
"""
from __future__ import annotations

from .schema import ModelArgs, ParallelArgs, TrainArgs

#: Alignment of every FP8 GEMM dimension (megatron-core's get_fp8_align_size for tensorwise).
FP8_ALIGN = 16


def teacher_gemm_dims(m: ModelArgs, p: ParallelArgs) -> dict[str, int]:
    """Every GEMM dimension of one teacher layer on one TP rank, by name."""
    tp = p.tensor_model_parallel_size
    qkv_out = (m.num_attention_heads + 2 * m.query_groups) * m.head_dim
    fc1_out = m.ffn_size * (2 if m.swiglu else 1)
    return {
        "--hidden-size (GEMM input/output width)": m.hidden_size,
        "query/key/value projection outputs per TP rank ((heads + 2 groups) x kv-channels / TP)": qkv_out // tp,
        "attention output projection inputs per TP rank (heads x kv-channels / TP)":
            m.num_attention_heads * m.head_dim // tp,
        "MLP fc1 outputs per TP rank (--ffn-hidden-size x (2 with --swiglu) / TP)": fc1_out // tp,
        "MLP fc2 inputs per TP rank (--ffn-hidden-size / TP)": m.ffn_size // tp,
    }


def fp8_shape_problems(m: ModelArgs, p: ParallelArgs, t: TrainArgs) -> list[str]:
    """Human-readable reasons the teacher's GEMMs cannot run in FP8; [] if they can."""
    problems = [f"{name} = {value} is not a multiple of {FP8_ALIGN}"
                for name, value in teacher_gemm_dims(m, p).items() if value % FP8_ALIGN]
    tokens = t.micro_batch_size * m.seq_length
    if p.sequence_parallel:
        tokens //= p.tensor_model_parallel_size
    if tokens % FP8_ALIGN:
        sp = " / TP (sequence parallel)" if p.sequence_parallel else ""
        problems.append(
            f"tokens per micro-batch GEMM (--micro-batch-size x --seq-length{sp}) = {tokens} "
            f"is not a multiple of {FP8_ALIGN}"
        )
    return problems
