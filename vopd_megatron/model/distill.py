"""A pipeline stage that carries the student and the frozen teacher together.

DESIGN §4: the teacher lives on the same ranks and the same TP/PP grid as the
student, its layers split across the same pipeline stages, and its activations
travel with the student's, so the last stage holds both models' vocab-parallel
logits for the same microbatch. Megatron's pipeline schedule sends one tensor
per stage boundary, so a stage's output is the concatenation
`[s, b, h_student + h_teacher]` (the teacher may be wider than the student);
`p2p_shape_adjuster` tells the 1F1B schedule about the wider tensors, the
mechanism Megatron-LM's own knowledge-distillation integration relies on.

The teacher runs under `torch.no_grad()` in eval mode: it keeps no activations
for backward, receives no gradient (its slice of the incoming tensor is
detached), and its logits live only as long as the microbatch's loss function.
Checkpointing, DDP and the optimizer see the student alone.

With `fused_output` (`--vopd-fused-output`, docs/loss.md) the last stage
returns no logits: each model's GPTModel stops before its output layer and
hands back the layer's input and weight (megatron/fused_output.py), and the
loss forms the logits tile by tile without ever holding a `[b, s, V/tp]` shard.
"""
from __future__ import annotations

import contextlib

import torch


def _unwrapped(module):
    """The GPTModel under DDP / Float16Module wrappers (megatron-core's unwrap_model)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(module)


class DistillationStage(torch.nn.Module):
    """This rank's stage of the student (trainable) and of the teacher (frozen).

    forward(input_ids, position_ids, attention_mask) returns, on the last
    stage, `(student_logits [b, s, V/tp], teacher_logits [b, s, V/tp])`, or
    with `fused_output` two `OutputLayerInput`s (hidden `[s, b, h]`, weight
    `[V/tp, h]`); on other stages the concatenated hidden states `[s, b, hs + ht]`.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, fused_output: bool = False):
        super().__init__()
        if fused_output:
            from ..megatron.fused_output import fused_output_problems

            problems = fused_output_problems(student) + fused_output_problems(teacher)
            if problems:
                raise ValueError("--vopd-fused-output cannot replace the output layer: " + "; ".join(problems))
        self.fused_output = fused_output
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        inner = _unwrapped(student)
        self.config = inner.config  # the schedule reads the student's config
        self.model_type = inner.model_type
        self.post_process = inner.post_process
        self.student_hidden = inner.config.hidden_size
        self.teacher_hidden = _unwrapped(teacher).config.hidden_size

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: never in training mode (dropout off)
        return self

    def set_input_tensor(self, input_tensor):
        """Split the received `[s, b, hs + ht]` tensor between the two models."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        if input_tensor is None:
            student_in = teacher_in = None
        else:
            student_in = input_tensor[..., : self.student_hidden]  # [s, b, hs], grads flow back
            teacher_in = input_tensor[..., self.student_hidden :].detach()  # [s, b, ht]
        _unwrapped(self.student).set_input_tensor(student_in)
        _unwrapped(self.teacher).set_input_tensor(teacher_in)

    def forward(self, input_ids, position_ids, attention_mask, timer=None):
        """timer: a `timing.SectionTimer` of the caller's step, which then holds the
        "teacher_forward" and "student_forward" time of every microbatch (None: untimed)."""
        kwargs = {}
        if self.fused_output and self.post_process:
            from ..megatron.fused_output import output_layer_input

            kwargs["output_processor"] = output_layer_input
        section = timer.section if timer is not None else lambda _name: contextlib.nullcontext()
        with torch.no_grad(), section("teacher_forward"):
            teacher_out = self.teacher(input_ids, position_ids, attention_mask, **kwargs)
        with section("student_forward"):
            student_out = self.student(input_ids, position_ids, attention_mask, **kwargs)
        if self.post_process:
            return student_out, teacher_out
        return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1)


def p2p_shape_adjuster(student_hidden: int, teacher_hidden: int):
    """`adjust_tensor_shapes_fn` for Megatron's 1F1B schedule: widen every
    stage-boundary tensor from hs to hs + ht."""

    def adjust(recv_shapes, send_shapes):
        widen = lambda shapes: [(*s[:-1], student_hidden + teacher_hidden) for s in shapes]  # noqa: E731
        assert all(s[-1] == student_hidden for s in recv_shapes + send_shapes), (recv_shapes, send_shapes)
        return widen(recv_shapes), widen(send_shapes)

    return adjust
