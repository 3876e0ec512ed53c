"""`vopd-sft`'s step: token-level cross entropy on the completion, through the shared pipeline runner.

Normalisation is Megatron's `calculate_per_token_loss`: the loss function
returns `(sum of token losses, completion tokens)`, and `finalize_model_grads`
divides the summed gradients by the global token count, so the gradient is the
token mean over the whole batch for any TP/DP/microbatch split.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from ..runtime.context import ParallelContext
from ..runtime.pipeline import run_pipeline


def sft_loss_func(labels: torch.Tensor, loss_mask: torch.Tensor, logits: torch.Tensor):
    """Megatron's contract `(loss_sum, num_tokens, metrics)` for token-level cross entropy.

    labels, loss_mask: [b, s]; logits: [b, s, V_padded/tp] this rank's vocab shard.
    Megatron's vocab-parallel cross entropy runs over the padded vocabulary, as
    Megatron-LM's own pretraining loss does (padded columns learn to be unlikely).
    """
    from megatron.core import tensor_parallel

    # Megatron's CE overwrites fp32 logits in place (MEGATRON_ON_CPU.md): nothing reads them after.
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)  # [b, s]
    mask = loss_mask.float()
    loss_sum = (losses * mask).sum()
    count = mask.sum()
    return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count])}


def sft_forward_step(mask, data_iterator, model):
    """Megatron's forward step for supervised training (`runtime.pipeline` binds the mask)."""
    mb = next(data_iterator)
    logits = model(mb["tokens"], mb["position_ids"], mask)  # [b, s, V/tp] (last stage)
    return logits, partial(sft_loss_func, mb["labels"], mb["loss_mask"])


def sft_forward_backward(models, microbatches: list[dict], run, forward_only: bool = False) -> list[dict]:
    """Megatron's schedule over this DP rank's microbatches (gradients finalized in the DDP buffers)."""
    return run_pipeline(models.student, sft_forward_step, microbatches, seq_length=run.model.seq_length,
                        micro_batch_size=run.train.micro_batch_size, grad_chunks=models.student,
                        forward_only=forward_only)


def mean_loss(losses: list[dict], ctx: ParallelContext) -> float:
    """Token-mean loss of the global batch (DP-reduced), on the last pipeline stage."""
    total = torch.stack([m["lm loss"] for m in losses]).sum(0).double()  # [2]
    if ctx.dp_size > 1:
        dist.all_reduce(total, group=ctx.dp_group)
    return float(total[0] / total[1])
