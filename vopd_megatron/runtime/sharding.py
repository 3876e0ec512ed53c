"""The one rule for splitting a global batch over data-parallel ranks.

Data-parallel rank r of dp takes the contiguous block `[r n / dp, (r + 1) n / dp)`
of any n items (rollouts of a step, prompts to sample, evaluation problems).
Training batches divide evenly (Megatron-LM's rule, checked with the flags);
evaluation problems need not, and the blocks then differ by at most one.
Everything that shards uses this, so the sampler, the step and the evaluator
agree on which rows are whose.
"""
from __future__ import annotations


def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank `rank` of `size` over n items."""
    return rank * n // size, (rank + 1) * n // size


def shard(items: list, size: int, rank: int) -> list:
    """Rank `rank`'s contiguous block of items."""
    lo, hi = shard_bounds(len(items), size, rank)
    return items[lo:hi]
