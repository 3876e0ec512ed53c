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


def rollout_totals(rollouts: list[Rollout]) -> dict[str, tuple[float, float]]:
    """`[sum, count]` pairs of a step's rollouts (this rank's share; the step adds
    them up over data-parallel ranks with its metrics): `rollout/completion_tokens`
    (tokens, rollouts) and `rollout/hit_max_length` (flagged, rollouts the sampler
    flagged or not; count 0 for rollout files, whose rows carry no flag)."""
    flags = [r.hit_max_length for r in rollouts if r.hit_max_length is not None]
    return {"rollout/completion_tokens": (float(sum(len(r.completion_ids) for r in rollouts)), float(len(rollouts))),
            "rollout/hit_max_length": (float(sum(flags)), float(len(flags)))}


class RolloutSource(Protocol):
    """Produces the rollouts of a training step, deterministically resumable."""

    def take(self, n: int, dp_size: int = 1, dp_rank: int = 0) -> list[Rollout]:
        """This data-parallel rank's block of the next n rollouts (`runtime.sharding`);
        every rank advances by n."""

    @property
    def consumed(self) -> int:
        """Rollouts handed out so far (saved in checkpoints)."""

    def seek(self, consumed: int) -> None:
        """Resume after `consumed` rollouts."""
