"""One optimizer step of on-policy distillation through Megatron's pipeline schedule.

Forward: every microbatch runs through the `DistillationStage`s (teacher
no-grad, student with grad); on the last pipeline stage the loss plugin turns
both models' vocab-parallel logits into `(loss_sum, num_tokens, metrics)`.
With `calculate_per_token_loss`, Megatron's `finalize_model_grads` divides the
summed gradients by the batch's token count (summed over microbatches and
data-parallel ranks): the global token mean, identical for any split.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..loss import LossConfig, summarize_metrics
from ..megatron.fused_output import OutputLayerInput
from ..megatron.loss_adapter import make_fused_loss_func, make_loss_func
from ..model.distill import p2p_shape_adjuster
from .faults import naming_rows
from .setup import scheduler_increment


@dataclass
class StepResult:
    metrics: dict = field(default_factory=dict)  # summarize_metrics over the global batch
    grad_norm: float = float("nan")
    lr: float = float("nan")
    num_tokens: int = 0
    skipped: bool = False
    seconds: dict = field(default_factory=dict)  # step, teacher_forward, student_forward, loss_forward,
    # backward_and_optimizer (the rest of the step); vopd-train adds rollout


def causal_mask(seq_length: int, device) -> torch.Tensor:
    """[1, 1, s, s] bool, True where attention is masked (Megatron's convention)."""
    return torch.triu(torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device), 1)


def _forward_step(loss_config: LossConfig, vocab_size: int, mask, data_iterator, model):
    mb = next(data_iterator)
    out = model(mb["tokens"], mb["position_ids"], mask)
    if not isinstance(out, tuple):  # not the last pipeline stage
        return out, None
    student_out, teacher_out = out  # [b, s, V/tp] logits each, or OutputLayerInputs (--vopd-fused-output)
    # The engine's log-probs, when the rollouts carry them: used by the rollout
    # correction if configured, and always reported as the trainer/engine gap.
    behavior = mb["behavior_logprobs"] if bool(mb["has_logprobs"]) else None
    old = None
    if loss_config.ppo_clip is not None:  # the sampling policy is the PPO ratio's old policy
        if behavior is None:
            raise ValueError("--vopd-ppo-clip needs rollouts that carry the sampler's log-probs")
        old = behavior
    common = dict(labels=mb["labels"], loss_mask=mb["loss_mask"], config=loss_config, vocab_size=vocab_size,
                  behavior_logprobs=behavior, old_logprobs=old)
    if isinstance(student_out, OutputLayerInput):  # output layers fused into the loss
        loss_func = make_fused_loss_func(teacher=teacher_out, **common)
    else:
        loss_func = make_loss_func(teacher_logits=teacher_out, **common)
    loss_func = naming_rows(loss_func, mb.get("sources"), mb["labels"].shape[-1])
    return student_out, partial(_timed, model.timer, loss_func)


def _timed(timer, loss_func, output_tensor):
    """The loss forward inside the step's "loss_forward" section (its backward
    runs inside the schedule's backward pass)."""
    with timer.section("loss_forward"):
        return loss_func(output_tensor)


def wire_megatron_hooks(models, run: RunConfig) -> None:
    """Point the schedule's grad-sync hooks at the DDP-wrapped student chunks."""
    from megatron.core.distributed import finalize_model_grads

    config = models.stages[0].config
    students = models.student
    config.no_sync_func = students[0].no_sync
    config.grad_sync_func = None  # no overlap: grads are reduced once, in finalize
    # The schedule passes its own model list (the distillation stages); the
    # gradients to finalize are the student's.
    config.finalize_model_grads_func = lambda _model, *a, **kw: finalize_model_grads(students, *a, **kw)


def forward_backward(models, microbatches: list[dict], run: RunConfig, loss_config: LossConfig,
                     forward_only: bool = False) -> list[dict]:
    """Megatron's schedule over this DP rank's microbatches; gradients end in the
    student's DDP buffers, finalized (DP-reduced, divided by the global token
    count). Returns the last stage's per-microbatch metrics ([] elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in models.student:
        chunk.zero_grad_buffer()
    for stage in models.stages:
        stage.timer.reset()
    device = microbatches[0]["tokens"].device
    seq = run.model.seq_length
    kwargs = {}
    if run.parallel.pipeline_model_parallel_size > 1:
        kwargs["adjust_tensor_shapes_fn"] = p2p_shape_adjuster(run.model.hidden_size, run.teacher.hidden_size)
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_config, run.model.vocab_size, causal_mask(seq, device)),
        data_iterator=iter(microbatches), model=models.stages, num_microbatches=len(microbatches),
        seq_length=seq, micro_batch_size=run.train.micro_batch_size, forward_only=forward_only, **kwargs,
    )


def train_step(models, optimizer, scheduler, microbatches: list[dict], run: RunConfig,
               loss_config: LossConfig) -> StepResult:
    """Forward/backward over this DP rank's microbatches, then one optimizer step."""
    t0 = time.perf_counter()
    optimizer.zero_grad()
    losses = forward_backward(models, microbatches, run, loss_config)
    result = StepResult()
    ok, grad_norm, _ = optimizer.step()
    result.skipped = not ok
    result.grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    scheduler.step(increment=scheduler_increment(run))
    result.lr = optimizer.param_groups[0]["lr"]
    result.metrics = batch_metrics(losses)
    result.num_tokens = int(round(result.metrics.pop("_tokens", 0)))
    total = time.perf_counter() - t0
    parts = {"teacher_forward": 0.0, "student_forward": 0.0, "loss_forward": 0.0}
    parts.update(models.stages[0].timer.seconds())  # GPU time of each part (timing.py)
    result.seconds = {"step": total, **parts,
                      "backward_and_optimizer": max(0.0, total - sum(parts.values()))}
    return result


def batch_metrics(losses: list[dict]) -> dict:
    """Metrics of the global batch, on every rank: summed over this stage's
    microbatches and DP ranks on the last stage, then broadcast from there."""
    from megatron.core import parallel_state

    summary = None
    if parallel_state.is_pipeline_last_stage():
        summary = summarize_metrics(losses, group=parallel_state.get_data_parallel_group())
        summary["_tokens"] = sum(float(m["loss"][1]) for m in losses)
        group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            # On the loss's device: NCCL reduces CUDA tensors only.
            tokens = torch.tensor(summary["_tokens"], dtype=torch.float64, device=losses[0]["loss"].device)
            dist.all_reduce(tokens, group=group)
            summary["_tokens"] = float(tokens)
    holder = [summary]
    # Megatron orders ranks with pipeline stages slowest: the last global rank
    # is on the last stage.
    last = dist.get_world_size() - 1
    if dist.get_rank() == last:
        assert summary is not None, "the last global rank is not on the last pipeline stage"
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(holder, src=last)
    return holder[0]
