"""What this machine lacks for a run, asked when the run starts (never by `--dry-run`).

`RunConfig.validate` checks everything that needs no GPU, so that `--dry-run`
plans a GPU job on a laptop. Here, before any process group or weight exists,
an entry point asks the machine the rest: Transformer Engine and an FP8 GPU
for what needs them, megatron-core's output_processor hook for the fused
output layer, a well-formed VOPD_TRITON_TILES and VOPD_FUSED_GEMM. Each failure is a
`ConfigError` naming the flag that needs what is missing.
"""
from __future__ import annotations

from ..config import ConfigError, RunConfig
from ..loss.backend import env_tiles, fused_gemm
from ..megatron.fused_output import output_processor_supported
from .builder import te_available
from .fp8 import fp8_runtime_problems


def check_runtime(run: RunConfig) -> None:
    """What this machine lacks for the run (Transformer Engine, an FP8 GPU, the
    output_processor hook), and a malformed VOPD_TRITON_TILES or VOPD_FUSED_GEMM."""
    try:
        env_tiles()  # a malformed VOPD_TRITON_TILES (loss kernel tile override)
        fused_gemm()  # an unknown VOPD_FUSED_GEMM (--vopd-fused-output's tile GEMMs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if run.distill.vopd_fused_output:
        if not output_processor_supported():
            raise ConfigError("--vopd-fused-output needs megatron-core >= 0.19 (GPTModel's output_processor hook)")

    if run.distill.teacher_fp8 or run.model.megatron_overrides.get("fp8"):
        problems = fp8_runtime_problems()
        if problems:
            which = "--teacher-fp8" if run.distill.teacher_fp8 else "--fp8-format"
            raise ConfigError(f"{which} cannot run here: " + "; ".join(problems))
    if not te_available():
        for who, m in (("student", run.model), ("teacher", run.teacher)):
            if m.megatron_overrides.get("layernorm_zero_centered_gamma"):
                raise ConfigError(f"{who}: --apply-layernorm-1p needs Transformer Engine on a GPU (Megatron-Core's "
                                  "local layer spec has no zero-centred norm); it can be planned with --dry-run")
