"""Build a run's parallel state, models, optimizer and LR schedule from a RunConfig.

Everything Megatron-specific about construction lives here, so the training
step and the entry point read like the algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.schema import RunConfig
from ..model.builder import build_gpt_stage, transformer_config
from ..model.distill import DistillationStage


def initialize_parallel(run: RunConfig) -> None:
    """Megatron's TP/PP/DP groups over the already initialised default group, and seeds."""
    from megatron.core import parallel_state, tensor_parallel

    p = run.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(run.train.seed)


@dataclass
class Models:
    stages: list  # [DistillationStage], what the pipeline schedule runs ([] without a teacher)
    student: list  # [DDP(student stage)], what the optimizer and checkpoints see
    teacher: torch.nn.Module | None  # this rank's frozen teacher stage (None: student only, e.g. vopd-eval)


def _maybe_fp16(module, config, bf16):
    from megatron.core.transformer.module import Float16Module

    return Float16Module(config, module) if bf16 else module


def build_models(run: RunConfig, teacher_seed_offset: int = 1, with_teacher: bool = True) -> Models:
    """The student (DDP-wrapped) and teacher stages of this rank.

    The teacher is built with a different seed (it is normally loaded from
    `--teacher-load` right after) and never receives gradients. Without it
    (`with_teacher=False`: evaluation of a student alone) there are no
    distillation stages.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    pre = parallel_state.is_pipeline_first_stage()
    post = parallel_state.is_pipeline_last_stage()
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"

    s_cfg = transformer_config(run.model, run.parallel, run.train)
    student = build_gpt_stage(run.model, run.parallel, run.train, pre, post, config=s_cfg).to(device)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=run.parallel.use_distributed_optimizer,
    )
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
    return Models(stages=[DistillationStage(student, teacher)], student=[student], teacher=teacher)


def build_optimizer(run: RunConfig, student_chunks: list):
    """Megatron's (distributed) Adam with gradient clipping, and its LR schedule.

    The scheduler steps by the global batch size per optimizer step (`scheduler_increment`).
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = run.train
    # Megatron-LM's schedule counts samples (lr_*_iters x global batch): its checkpoints' schedules
    # load here and ours in Megatron-LM. Each of the --vopd-updates-per-batch steps takes a batch.
    samples_per_iter = t.global_batch_size * run.distill.vopd_updates_per_batch
    opt_config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        clip_grad=t.clip_grad, bf16=t.bf16,
        params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
        use_distributed_optimizer=run.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, student_chunks)
    decay = (t.lr_decay_iters or t.train_iters) * samples_per_iter
    warmup = t.lr_warmup_iters * samples_per_iter
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(decay, warmup + 1),
        lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=max(t.train_iters * samples_per_iter, 1), wd_incr_style="constant",
    )
    return optimizer, scheduler


def scheduler_increment(run: RunConfig) -> int:
    """Samples per optimizer step, what the LR scheduler counts (as in Megatron-LM)."""
    return run.train.global_batch_size
