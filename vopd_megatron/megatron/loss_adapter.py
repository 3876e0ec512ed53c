"""The thin Megatron adapter of the loss: Megatron's pipeline-schedule contract.

Megatron's schedules call `forward_step(data_iterator, model)`, which returns
`(output_tensor, loss_func)`; on the last pipeline stage they call
`loss_func(output_tensor)` and expect `(loss_sum, num_tokens, metrics)`. With
`calculate_per_token_loss=True` Megatron then divides the gradients by the
token count summed over microbatches and data-parallel ranks, which gives the
global token-mean DESIGN §4 asks for, for any split of the global batch.

This is the only module of the loss that reads Megatron's global parallel
state (to find the tensor-parallel group when none is passed).
"""
from __future__ import annotations

from functools import partial

import torch

from ..loss import LossConfig, vocab_parallel_opd_loss


def tensor_parallel_group():
    """Megatron's tensor-parallel group, or None before model parallel is set up."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def opd_loss_func(
    output_tensor: torch.Tensor,
    *,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    config: LossConfig,
    vocab_size: int,
    tp_group=None,
    behavior_logprobs: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
):
    """Megatron `loss_func`: student logits in, `(loss_sum, num_tokens, metrics)` out.

    output_tensor: the student's vocab-parallel logits, `[b, s, V/tp]` as
        GPTModel returns them without labels (any layout works as long as the
        teacher logits, labels and mask share its leading dims).
    labels: `[b, s]` token ids already shifted: the logits at position t
        are scored against labels[t] (Megatron's data convention).
    vocab_size: the tokenizer's true vocabulary size (before padding).
    """
    group = tp_group if tp_group is not None else tensor_parallel_group()
    return vocab_parallel_opd_loss(
        output_tensor, teacher_logits, labels, loss_mask, config,
        vocab_size=vocab_size, group=group,
        behavior_logprobs=behavior_logprobs, old_logprobs=old_logprobs,
    )


def make_loss_func(**kwargs):
    """`loss_func` for Megatron's schedule with everything but the student logits bound."""
    return partial(opd_loss_func, **kwargs)


def fused_opd_loss_func(
    student,
    *,
    teacher,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    config: LossConfig,
    vocab_size: int,
    tp_group=None,
    behavior_logprobs: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
):
    """Megatron `loss_func` of `--vopd-fused-output`: output-layer inputs in, the same
    `(loss_sum, num_tokens, metrics)` out.

    student, teacher: `OutputLayerInput`s (megatron/fused_output.py) with
        hidden `[s, b, h]` and weight `[V/tp, h]`; the student's hidden states
        already pass through Megatron's TP copy / sequence-parallel gather,
        whose backward reduces their gradient, so the loss does not.
    labels, loss_mask (and log-probs): `[b, s]` as for `opd_loss_func`;
        transposed here to the hidden states' `[s, b]` order (cheaper than
        transposing `[s, b, h]`). A NonFiniteLogitsError names its token rows
        in the `[b, s]` order again (row `i * s + t`), as `opd_loss_func`'s
        do, which training.faults.naming_rows maps to data rows.
    """
    from ..loss.fused_output import fused_output_opd_loss
    from ..loss.per_token import NonFiniteLogitsError

    group = tp_group if tp_group is not None else tensor_parallel_group()

    def sb(t):
        return None if t is None else t.transpose(0, 1)

    try:
        return fused_output_opd_loss(
            student.hidden, student.weight, teacher.hidden, teacher.weight, sb(labels), sb(loss_mask), config,
            vocab_size=vocab_size, group=group, behavior_logprobs=sb(behavior_logprobs),
            old_logprobs=sb(old_logprobs), reduce_hidden_grad=False,
        )
    except NonFiniteLogitsError as exc:
        b, s = labels.shape[:2]
        rows = sorted((r % b) * s + r // b for r in exc.token_rows)  # [s, b] flat -> [b, s] flat
        raise NonFiniteLogitsError.found(exc.model, rows) from None


def make_fused_loss_func(**kwargs):
    """`loss_func` of `--vopd-fused-output` with everything but the student's output-layer input bound."""
    return partial(fused_opd_loss_func, **kwargs)
