"""Build a run's models, optimizer and LR schedule from a RunConfig.

Everything Megatron-specific about construction lives here, so the training
step and the entry point read like the algorithm. The typed Megatron configs
are Megatron-LM's own, rebuilt from the RunConfig (config/megatron_args.py):
the TransformerConfig (model/builder.py), the DistributedDataParallelConfig
(get_megatron_ddp_config), the OptimizerConfig with Megatron-LM's standard
per-parameter overrides (get_megatron_optimizer_config: no weight decay on
biases and norms, --decoupled-lr), and the LR / weight-decay schedule by
Megatron-LM's get_optimizer_param_scheduler rules, counted in samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import megatron_args
from ..config import RunConfig
from ..model.builder import build_gpt_stage, transformer_config
from ..model.distill import DistillationStage
from ..runtime.context import ParallelContext


@dataclass
class Models:
    stages: list  # [DistillationStage], what the pipeline schedule runs ([] without a teacher)
    student: list  # [DDP(student stage)], what the optimizer and checkpoints see
    teacher: torch.nn.Module | None  # this rank's frozen teacher stage (None: student only, e.g. vopd-eval)


def _maybe_fp16(module, config, bf16):
    from megatron.core.transformer.module import Float16Module

    return Float16Module(config, module) if bf16 else module


def build_models(run: RunConfig, ctx: ParallelContext, teacher_seed_offset: int = 1,
                 with_teacher: bool = True) -> Models:
    """The student (DDP-wrapped) and teacher stages of this rank (`ctx`: its pipeline stage and device).

    The teacher is built with a different seed (it is normally loaded from
    `--teacher-load` right after) and never receives gradients. Without it
    (`with_teacher=False`: evaluation of a student alone) there are no
    distillation stages.
    """
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel

    pre, post, device = ctx.first_stage, ctx.last_stage, ctx.device

    s_cfg = transformer_config(run.model, run.parallel, run.train)
    student = build_gpt_stage(run.model, run.parallel, run.train, pre, post, config=s_cfg).to(device)
    ddp_config = megatron_args.ddp_config(run.model, run.parallel, run.train)
    if not with_teacher:
        student = DistributedDataParallel(s_cfg, ddp_config, _maybe_fp16(student, s_cfg, run.train.bf16))
        return Models(stages=[], student=[student], teacher=None)
    tensor_parallel.model_parallel_cuda_manual_seed(run.train.seed + teacher_seed_offset)
    fp8 = run.distill.teacher_fp8  # FP8 GEMMs need TE's layer spec (model/fp8.py)
    t_cfg = transformer_config(run.teacher, run.parallel, run.train, fp8=fp8)
    teacher = build_gpt_stage(run.teacher, run.parallel, run.train, pre, post, config=t_cfg,
                              use_te=True if fp8 else None).to(device)
    tensor_parallel.model_parallel_cuda_manual_seed(run.train.seed)  # training RNG streams
    teacher = _maybe_fp16(teacher, t_cfg, run.train.bf16).eval().requires_grad_(False)
    student = DistributedDataParallel(s_cfg, ddp_config, _maybe_fp16(student, s_cfg, run.train.bf16))
    stage = DistillationStage(student, teacher, fused_output=run.distill.vopd_fused_output)
    return Models(stages=[stage], student=[student], teacher=teacher)


def build_optimizer(run: RunConfig, student_chunks: list):
    """Megatron's (distributed) optimizer with gradient clipping, and its LR / weight-decay schedule.

    The scheduler counts samples, as Megatron-LM's does: step it by the global
    batch size after every optimizer step (`scheduler_increment`)."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config, overrides = megatron_args.optimizer_config(run.model, run.parallel, run.train)
    optimizer = get_megatron_optimizer(opt_config, student_chunks, config_overrides=overrides)
    ns = megatron_args.megatron_namespace(run.model, run.parallel, run.train)
    # The scheduler counts optimizer steps: --vopd-updates-per-batch stretches its horizons.
    settings = megatron_args.scheduler_settings(ns, updates_per_iteration=run.distill.vopd_updates_per_batch)
    megatron_args.check_schedule(settings)
    return optimizer, OptimizerParamScheduler(optimizer, **settings)


def scheduler_increment(run: RunConfig) -> int:
    """Samples one optimizer step advances the schedule by (Megatron-LM's unit)."""
    return run.train.global_batch_size
