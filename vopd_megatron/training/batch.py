"""Rollouts in, fixed-shape microbatch tensors out: the input of a training step.

`collate` lays rollouts out the Megatron way: `tokens = seq[:-1]`,
`labels = seq[1:]`, so the logits at position t are scored against token
t + 1; `loss_mask[t] = 1` exactly where `labels[t]` is a completion token.
"""
from __future__ import annotations

import torch

from ..rollout.types import Rollout


def collate(rollouts: list[Rollout], seq_length: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Microbatch tensors, each `[b, seq_length]`.

    tokens, labels (long); position_ids (long); loss_mask (float, completion
    tokens of labels); behavior_logprobs (float, aligned with labels; 0 where
    unknown) and has_logprobs (bool, all rollouts carried them).
    """
    b = len(rollouts)
    seq = torch.full((b, seq_length + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(b, seq_length)
    logprobs = torch.zeros(b, seq_length)
    for i, r in enumerate(rollouts):
        ids = (r.prompt_ids + r.completion_ids)[: seq_length + 1]  # over-long: truncated
        seq[i, : len(ids)] = torch.tensor(ids)
        start = len(r.prompt_ids) - 1  # labels[start] is the first completion token
        end = len(ids) - 1
        if end > start:
            mask[i, start:end] = 1.0
            if r.logprobs is not None:
                logprobs[i, start:end] = torch.tensor(r.logprobs[: end - start], dtype=torch.float32)
    return {
        "tokens": seq[:, :-1].contiguous(),
        "labels": seq[:, 1:].contiguous(),
        "position_ids": torch.arange(seq_length).expand(b, seq_length).contiguous(),
        "loss_mask": mask,
        "behavior_logprobs": logprobs,
        "has_logprobs": torch.tensor(all(r.logprobs is not None for r in rollouts)),
    }



def to_microbatches(rollouts: list[Rollout], micro_batch_size: int, seq_length: int, device) -> list[dict]:
    """This rank's rollouts (its data-parallel share) as microbatch tensors on `device`,
    each with the rows' `sources` for messages that name data rows."""
    out = []
    for i in range(0, len(rollouts), micro_batch_size):
        rows = rollouts[i : i + micro_batch_size]
        batch = {k: v.to(device) for k, v in collate(rows, seq_length).items()}
        batch["sources"] = [r.source for r in rows]
        out.append(batch)
    return out
