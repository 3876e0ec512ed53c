"""One optimizer step of on-policy distillation through Megatron's pipeline schedule.

Forward: every microbatch runs through the `DistillationStage`s (teacher
no-grad, student with grad); on the last pipeline stage the loss plugin turns
both models' vocab-parallel logits into `(loss_sum, num_tokens, metrics)`.
With `calculate_per_token_loss`, Megatron's `finalize_model_grads` divides the
summed gradients by the batch's token count (summed over microbatches and
data-parallel ranks): the global token mean, identical for any split.

Metrics are reduced once, where they are produced: on the last stage, one
all-reduce over the data-parallel group of every `[sum, count]` pair (the
loss's, whose count is the batch's token count, and the rollouts' length and
cut-off statistics). With PP > 1 the other stages' ranks, which print and
check for faults too, receive the result from their pipeline's last stage.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..loss import LossConfig
from ..loss.terms import metric_totals, summarize_totals
from ..megatron.fused_output import OutputLayerInput
from ..megatron.loss_adapter import make_fused_loss_func, make_loss_func
from ..model.distill import p2p_shape_adjuster
from ..runtime.context import ParallelContext
from ..runtime.pipeline import run_pipeline, wire_grad_hooks
from ..timing import SectionTimer
from .faults import naming_rows
from .setup import scheduler_increment


@dataclass
class StepResult:
    metrics: dict = field(default_factory=dict)  # means over the global batch (summarize_totals)
    grad_norm: float = float("nan")
    lr: float = float("nan")
    num_tokens: int = 0
    skipped: bool = False
    seconds: dict = field(default_factory=dict)  # step, teacher_forward, student_forward, loss_forward,
    # backward_and_optimizer (the rest of the step); vopd-train adds rollout


class DistillationForwardStep:
    """Megatron's forward step for distillation (`runtime.pipeline` binds the mask).

    Its `timer` collects the teacher, student and loss forward time of every
    microbatch it runs (GPU time on GPU, timing.py)."""

    def __init__(self, loss_config: LossConfig, vocab_size: int, timer: SectionTimer | None = None):
        self.loss_config, self.vocab_size = loss_config, vocab_size
        self.timer = timer if timer is not None else SectionTimer()

    def __call__(self, mask, data_iterator, model):
        mb = next(data_iterator)
        out = model(mb["tokens"], mb["position_ids"], mask, timer=self.timer)
        if not isinstance(out, tuple):  # not the last pipeline stage
            return out, None
        student_out, teacher_out = out  # [b, s, V/tp] logits each, or OutputLayerInputs (--vopd-fused-output)
        # The engine's log-probs, when the rollouts carry them: used by the rollout
        # correction if configured, and always reported as the trainer/engine gap.
        behavior = mb["behavior_logprobs"] if bool(mb["has_logprobs"]) else None
        old = None
        if self.loss_config.ppo_clip is not None:  # the sampling policy is the PPO ratio's old policy
            if behavior is None:
                raise ValueError("--vopd-ppo-clip needs rollouts that carry the sampler's log-probs")
            old = behavior
        common = dict(labels=mb["labels"], loss_mask=mb["loss_mask"], config=self.loss_config,
                      vocab_size=self.vocab_size, behavior_logprobs=behavior, old_logprobs=old)
        if isinstance(student_out, OutputLayerInput):  # output layers fused into the loss
            loss_func = make_fused_loss_func(teacher=teacher_out, **common)
        else:
            loss_func = make_loss_func(teacher_logits=teacher_out, **common)
        loss_func = naming_rows(loss_func, mb.get("sources"), mb["labels"].shape[-1])
        return student_out, self._timed(loss_func)

    def _timed(self, loss_func):
        """The loss forward inside the "loss_forward" section (its backward runs
        inside the schedule's backward pass)."""
        def timed(output_tensor):
            with self.timer.section("loss_forward"):
                return loss_func(output_tensor)

        return timed


def wire_megatron_hooks(models) -> None:
    """The schedule runs the distillation stages; the gradients it finalizes are the student's."""
    wire_grad_hooks(models.stages[0].config, models.student)


def forward_backward(models, microbatches: list[dict], run: RunConfig, loss_config: LossConfig,
                     forward_only: bool = False, timer: SectionTimer | None = None) -> list[dict]:
    """Megatron's schedule over this DP rank's microbatches; gradients end in the
    student's DDP buffers, finalized (DP-reduced, divided by the global token
    count). Returns the last stage's per-microbatch metrics ([] elsewhere)."""
    adjust = None
    if run.parallel.pipeline_model_parallel_size > 1:  # stage boundaries carry both models' hidden states
        adjust = p2p_shape_adjuster(run.model.hidden_size, run.teacher.hidden_size)
    return run_pipeline(models.stages, DistillationForwardStep(loss_config, run.model.vocab_size, timer),
                        microbatches, seq_length=run.model.seq_length, micro_batch_size=run.train.micro_batch_size,
                        grad_chunks=models.student, forward_only=forward_only, adjust_tensor_shapes_fn=adjust)


def train_step(models, optimizer, scheduler, microbatches: list[dict], run: RunConfig, loss_config: LossConfig,
               ctx: ParallelContext, extra_totals: dict | None = None) -> StepResult:
    """Forward/backward over this DP rank's microbatches, then one optimizer step.

    extra_totals: more `{name: [sum, count]}` pairs of this rank's share of the
    batch (the rollouts' statistics), reduced with the loss's metrics."""
    t0 = time.perf_counter()
    timer = SectionTimer()
    optimizer.zero_grad()
    losses = forward_backward(models, microbatches, run, loss_config, timer=timer)
    result = StepResult()
    ok, grad_norm, _ = optimizer.step()
    result.skipped = not ok
    result.grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    scheduler.step(increment=scheduler_increment(run))
    result.lr = optimizer.param_groups[0]["lr"]
    result.metrics, result.num_tokens = batch_metrics(losses, ctx, extra_totals)
    total = time.perf_counter() - t0
    parts = {"teacher_forward": 0.0, "student_forward": 0.0, "loss_forward": 0.0}
    parts.update(timer.seconds())  # GPU time of each part (timing.py)
    result.seconds = {"step": total, **parts, "backward_and_optimizer": max(0.0, total - sum(parts.values()))}
    return result


def batch_metrics(losses: list[dict], ctx: ParallelContext, extra_totals: dict | None = None) -> tuple[dict, int]:
    """(metrics of the global batch, its completion-token count), on every rank.

    On the last stage: the microbatches' `[sum, count]` pairs and `extra_totals`
    in one all-reduce over the data-parallel group. A pair nothing was counted
    in (e.g. the rollouts' cut-off flag, unknown for rollout files) is left out."""
    reduced = None
    if ctx.last_stage:
        totals = metric_totals(losses)
        device = next(iter(totals.values())).device  # NCCL reduces tensors on the loss's device only
        totals.update({k: torch.as_tensor(v, dtype=torch.float32, device=device)
                       for k, v in (extra_totals or {}).items()})
        stacked = torch.stack(list(totals.values()))  # [M, 2]
        if ctx.dp_size > 1:
            dist.all_reduce(stacked, group=ctx.dp_group)
        reduced = dict(zip(totals, stacked.double().cpu().tolist()))
    if ctx.pp_size > 1:  # the earlier stages' ranks print and check the step too
        holder = [reduced]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(ctx.pp_group, ctx.pp_size - 1),
                                   group=ctx.pp_group)
        reduced = holder[0]
    tokens = int(round(reduced["loss"][1]))
    empty = [k for k in extra_totals or {} if reduced[k][1] == 0]
    return summarize_totals({k: v for k, v in reduced.items() if k not in empty}), tokens
