"""Functional API of the vocab-parallel loss: validate, flatten, apply.

`vocab_parallel_token_terms` returns per-token terms (for custom
normalisation); `vocab_parallel_opd_loss` reduces them to Megatron's
`(loss_sum, num_tokens, metrics)`. The process group is explicit: pass the
tensor-parallel group (None or a size-1 group at TP = 1).
"""
from __future__ import annotations

import torch

from .backend import use_triton
from .config import LossConfig
from .terms import TokenTerms, reduce_token_terms
from .vocab_parallel import CHUNK_ELEMENTS, VocabParallelOPDLoss, group_rank_size


def validate_inputs(student, teacher, targets, loss_mask, config, vocab_size, tp, behavior, old):
    """Raise ValueError naming the problem; cheap shape checks, plus one sync
    for the value checks (`check_values`) when `config.check_inputs`."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher logit shards differ in shape: {tuple(student.shape)} vs "
            f"{tuple(teacher.shape)} (same tokens and the same padded vocabulary are required)"
        )
    if not (student.is_floating_point() and teacher.is_floating_point()):
        raise ValueError(f"logits must be floating point, got {student.dtype} and {teacher.dtype}")
    lead = tuple(student.shape[:-1])
    for name, t in (("targets", targets), ("loss_mask", loss_mask),
                    ("behavior_logprobs", behavior), ("old_logprobs", old)):
        if t is not None and tuple(t.shape) != lead:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {lead} (the logits' leading dims)")
    padded = student.shape[-1] * tp
    if not 0 < vocab_size <= padded:
        raise ValueError(
            f"true vocab size {vocab_size} must be in [1, {padded}] "
            f"(the padded vocabulary: {student.shape[-1]} columns x tp {tp})"
        )
    use_triton(config.backend, student)  # raises if "triton" cannot run on these tensors
    if config.rollout_correction is not None and behavior is None:
        raise ValueError(f"rollout_correction={config.rollout_correction!r} needs behavior_logprobs")
    if config.ppo_clip is not None and old is None:
        raise ValueError("ppo_clip needs old_logprobs (log-probs of the policy that sampled the batch)")
    if config.check_inputs:
        check_values(targets, loss_mask, vocab_size, behavior, old)


def check_values(targets, loss_mask, vocab_size, behavior=None, old=None):
    """Raise ValueError naming the first bad input: a live target outside
    [0, vocab_size), a loss_mask value other than 0 and 1, a non-finite
    behaviour or old log-prob on a live token. Tokens with mask 0 are not
    read. One host sync (a `.tolist()` of per-check counts) on good input."""
    live = loss_mask != 0  # [...]
    checks = {"targets": live & ((targets < 0) | (targets >= vocab_size))}
    if loss_mask.dtype != torch.bool:
        checks["loss_mask"] = live & (loss_mask != 1)  # NaN is != 0 and != 1
    for name, t in (("behavior_logprobs", behavior), ("old_logprobs", old)):
        if t is not None:
            checks[name] = live & ~torch.isfinite(t)
    counts = torch.stack([bad.sum() for bad in checks.values()]).tolist()
    for (name, bad), count in zip(checks.items(), counts):
        if not count:
            continue
        if name == "targets":
            raise ValueError(f"target ids {targets[bad][:5].tolist()} outside the true vocabulary [0, {vocab_size})")
        where = tuple(int(i) for i in bad.nonzero()[0])
        value = float((loss_mask if name == "loss_mask" else behavior if name == "behavior_logprobs" else old)[where])
        if name == "loss_mask":
            raise ValueError(f"loss_mask holds values other than 0 and 1 (e.g. {value} at index {where}, "
                             f"{count} in all): a loss mask selects tokens, it does not weight them")
        raise ValueError(f"{name} is not finite on {count} live token(s) (e.g. {value} at index {where}); "
                         "the sampling engine's log-probs must be finite where the loss mask is 1")


def vocab_parallel_token_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    config: LossConfig,
    *,
    vocab_size: int | None = None,
    group=None,
    behavior_logprobs: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> TokenTerms:
    """Per-token terms from this rank's vocabulary shard.

    student_logits, teacher_logits: [..., V/tp] shards (bf16 or fp32), read-only.
    targets: [...] sampled token ids (global vocabulary ids).
    loss_mask: [...] 1 on completion tokens, 0 on prompt and padding.
    vocab_size: true vocabulary size; columns past it are padding. Defaults
        to V/tp * tp (no padding).
    group: tensor-parallel process group; rank r owns columns [r V/tp, (r+1) V/tp).
    """
    _, tp = group_rank_size(group)
    part = student_logits.shape[-1]
    vocab_size = part * tp if vocab_size is None else int(vocab_size)
    validate_inputs(student_logits, teacher_logits, targets, loss_mask, config, vocab_size, tp,
                    behavior_logprobs, old_logprobs)
    lead = targets.shape

    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32

    def flat(t):
        return None if t is None else t.reshape(-1).to(dtype)

    outs = VocabParallelOPDLoss.apply(
        student_logits.reshape(-1, part),
        teacher_logits.detach().reshape(-1, part),
        targets.reshape(-1).long(),
        (loss_mask.reshape(-1) != 0).to(dtype),
        flat(behavior_logprobs),
        flat(old_logprobs),
        config,
        vocab_size,
        group,
        chunk_elements,
    )
    token_loss, mask, logp, logq, kl, baseline, topk_kl, weight, clipped = (
        None if t is None else t.view(lead) for t in outs
    )
    return TokenTerms(token_loss=token_loss, mask=mask, logp=logp, logq=logq, kl=kl,
                      baseline=baseline, topk_kl=topk_kl, rollout_weight=weight, ppo_clipped=clipped,
                      behavior_logprob=None if behavior_logprobs is None else behavior_logprobs.detach())


def vocab_parallel_opd_loss(*args, **kwargs):
    """Megatron's `(loss_sum, num_tokens, metrics)` for this rank's shards.

    Same arguments as `vocab_parallel_token_terms`. The loss sum and metrics
    are identical on every rank of the tensor-parallel group.
    """
    return reduce_token_terms(vocab_parallel_token_terms(*args, **kwargs))
