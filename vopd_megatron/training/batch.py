"""Rollouts in, fixed-shape microbatches out (the step's input).

`collate` lays rollouts out the Megatron way: `tokens = seq[:-1]`,
`labels = seq[1:]`, so the logits at position t are scored against token
t + 1; `loss_mask[t] = 1` exactly where `labels[t]` is a completion token.
"""
from __future__ import annotations

from .data import collate


def to_microbatches(rollouts: list, micro_batch_size: int, seq_length: int, device) -> list[dict]:
    """This rank's rollouts (its data-parallel share) as microbatch tensors on `device`,
    each with the rows' `sources` for messages that name data rows."""
    out = []
    for i in range(0, len(rollouts), micro_batch_size):
        rows = rollouts[i : i + micro_batch_size]
        batch = {k: v.to(device) for k, v in collate(rows, seq_length).items()}
        batch["sources"] = [r.source for r in rows]
        out.append(batch)
    return out
