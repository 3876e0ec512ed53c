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

Everything is checked before any process group or weight exists: the
shapes with the configuration, on any machine (`config.fp8_shapes`: every
GEMM dimension and the token rows a multiple of 16), and here
`fp8_runtime_problems`: Transformer Engine importable, a CUDA device of
compute capability >= 8.9 (Ada / Hopper and later have FP8 tensor cores),
and TE >= 2.2 (the first with the tensorwise recipe in megatron-core).
"""
from __future__ import annotations

import importlib.util

#: The TransformerConfig fields that turn FP8 on for the teacher.
TEACHER_FP8_FIELDS = {"fp8": "e4m3", "fp8_recipe": "tensorwise"}
MIN_TE_VERSION = (2, 2)
MIN_CAPABILITY = (8, 9)


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
