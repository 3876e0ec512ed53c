"""FP8 teacher forward through Transformer Engine (`--teacher-fp8`).

The teacher is frozen and forward-only, so its linear layers can run their
GEMMs in FP8 without touching the student's numerics. What is used is
Megatron-Core's own FP8 path: the teacher's TransformerConfig gets
`fp8="e4m3"` (forward-only: "hybrid" differs only in the gradients' format)
and `fp8_recipe="tensorwise"` (TE's `Float8CurrentScaling`: per-tensor scales
computed from the current tensor, so no amax history has to warm up, which
suits a model that never trains), and the teacher is built with TE's layer
spec; megatron-core's TransformerBlock then wraps each layer in
`get_fp8_context`. The output layer (the vocabulary projection) is Megatron's
ColumnParallelLinear, not a TE module: the teacher logits stay in the
parameter dtype. The student is untouched.

Everything is checked before any process group or weight exists:

* `fp8_shape_problems` (pure arithmetic, also on CPU): TE runs an FP8 GEMM
  only on 2-D inputs whose rows are a multiple of 8 and columns a multiple of
  16 (`transformer_engine.pytorch.utils.assert_dim_for_fp8_exec`), applied to
  activations `[tokens, in]` and weights `[out, in]`; megatron-core aligns FP8
  GEMMs to 16 for every recipe but mxfp8 (`fp8_utils.get_fp8_align_size`).
  We require 16 for every dimension of every teacher GEMM on one TP rank, and
  for the token rows of one micro-batch (`micro_batch_size * seq_length`,
  divided by TP under sequence parallelism).
* `fp8_runtime_problems`: Transformer Engine importable, a CUDA device of
  compute capability >= 8.9 (Ada / Hopper and later have FP8 tensor cores),
  and TE >= 2.2 (the first with the tensorwise recipe in megatron-core).
"""
from __future__ import annotations

import importlib.util

from ..config.schema import ModelArgs, ParallelArgs, TrainArgs

#: Alignment of every FP8 GEMM dimension (megatron-core's get_fp8_align_size for tensorwise).
FP8_ALIGN = 16
#: The TransformerConfig fields that turn FP8 on for the teacher.
TEACHER_FP8_FIELDS = {"fp8": "e4m3", "fp8_recipe": "tensorwise"}
MIN_TE_VERSION = (2, 2)
MIN_CAPABILITY = (8, 9)


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


def _te_version() -> tuple[int, int] | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist_name in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        try:
            parts = version(dist_name).split(".")
            return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
        except (PackageNotFoundError, ValueError, IndexError):
            continue
    return None


def fp8_runtime_problems() -> list[str]:
    """Reasons this machine cannot run an FP8 teacher; [] if it can."""
    import torch

    if importlib.util.find_spec("transformer_engine") is None:
        return ["Transformer Engine is not installed (pip install 'vopd_megatron[te]', CUDA only)"]
    if not torch.cuda.is_available():
        return ["no CUDA device: FP8 GEMMs need an NVIDIA GPU"]
    problems = []
    cap = torch.cuda.get_device_capability()
    if cap < MIN_CAPABILITY:
        problems.append(f"GPU compute capability {cap[0]}.{cap[1]} < 8.9: no FP8 tensor cores (needs Ada or Hopper+)")
    te = _te_version()
    if te is not None and te < MIN_TE_VERSION:
        problems.append(f"Transformer Engine {te[0]}.{te[1]} < 2.2: no tensorwise (current scaling) FP8 recipe")
    return problems
