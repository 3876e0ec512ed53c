"""What a rollout is, and the seam between the trainer and what produces rollouts.

A rollout is one sampled completion: the prompt's token ids, the completion's
token ids, and optionally the sampling engine's log-probs of the completion
tokens (for the rollout correction). `RolloutSource` is the seam between the
trainer and whatever produces rollouts: the in-process sampler
(`rollout.source.OnPolicyRolloutSource`), or a file written by an external
inference server (`rollout.file_source.JsonlRolloutSource`). The trainer lays
them out as microbatch tensors with `training.batch.collate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float] | None = None
    """log mu(a) of each completion token under the sampling engine."""
    hit_max_length: bool | None = None
    """The sampler reached its token limit without EOS / stop (kept, trained on,
    counted in `rollout/hit_max_length`); None: unknown (rollout files)."""
    source: str | None = None
    """Where the rollout comes from, for messages (`rollouts.jsonl:12`, or the
    prompt's location for on-policy rollouts); None: unknown."""


def rollout_stats(rollouts: list[Rollout]) -> dict[str, float]:
    """`rollout/completion_tokens` (mean) and, when the sampler flagged them,
    `rollout/hit_max_length` (fraction) of a step's rollouts."""
    out = {"rollout/completion_tokens": sum(len(r.completion_ids) for r in rollouts) / max(1, len(rollouts))}
    flags = [r.hit_max_length for r in rollouts if r.hit_max_length is not None]
    if flags:
        out["rollout/hit_max_length"] = sum(flags) / len(flags)
    return out


class RolloutSource(Protocol):
    """Produces the rollouts of a training step, deterministically resumable."""

    def take(self, n: int) -> list[Rollout]:
        """The next n rollouts (the same n on every rank: ranks slice their share)."""

    @property
    def consumed(self) -> int:
        """Rollouts handed out so far (saved in checkpoints)."""

    def seek(self, consumed: int) -> None:
        """Resume after `consumed` rollouts."""
