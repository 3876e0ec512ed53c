"""`OnPolicyRolloutSource`: the trainer's `RolloutSource` backed by the in-process sampler.

`take(n, dp_size, dp_rank)` samples completions for this data-parallel rank's
block of the next n prompts of a (optionally per-epoch shuffled) prompt list,
with the student's current weights, and returns only those rollouts: the
ones this rank trains on (`runtime.sharding`: the block
`[r n / dp, (r + 1) n / dp)`). Nothing is exchanged between data-parallel
ranks; the step reduces the few statistics that need the whole batch. Ranks
of one TP group sample the same block with the same seed (identical draws;
see sampler.py).

Determinism: prompt order depends on (seed, epoch); the sampling seed of a
`take` depends on (seed, consumed, DP rank). So a run resumed with `seek(c)` on
the same weights and the same DP size reproduces the rollouts of the
uninterrupted run; a different DP size gives different (equally distributed)
draws.
"""
from __future__ import annotations

import torch

from ..runtime.sharding import shard_bounds
from .sampler import RolloutSampler
from .sampling import mix_seed
from .types import Rollout


class OnPolicyRolloutSource:
    """Rollouts sampled on demand from the student over a list of tokenized prompts."""

    def __init__(self, sampler: RolloutSampler, prompts: list[list[int]], seed: int = 0, shuffle: bool = True,
                 sources: list[str] | None = None):
        """sources: where each prompt is (`prompts.jsonl:7`), carried by its rollouts for messages."""
        if not prompts:
            raise ValueError("OnPolicyRolloutSource needs at least one prompt")
        self.sampler = sampler
        self.prompts = [list(p) for p in prompts]
        self.sources = list(sources) if sources is not None else [None] * len(self.prompts)
        self.seed, self.shuffle = int(seed), shuffle
        self._consumed = 0
        self._order = {}  # epoch -> permutation of prompt indices

    def prompt_index(self, i: int) -> int:
        """The prompt of global rollout number i."""
        epoch, k = divmod(i, len(self.prompts))
        if not self.shuffle:
            return k
        if epoch not in self._order:
            self._order = {epoch: torch.randperm(
                len(self.prompts), generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))}
        return int(self._order[epoch][k])

    def take(self, n: int, dp_size: int = 1, dp_rank: int = 0) -> list[Rollout]:
        lo, hi = shard_bounds(n, dp_size, dp_rank)
        index = [self.prompt_index(self._consumed + i) for i in range(lo, hi)]
        prompts = [self.prompts[k] for k in index]
        completions = self.sampler.generate(prompts, seed=mix_seed(self.seed, self._consumed, dp_rank))
        self._consumed += n
        return [Rollout(list(p), c.completion_ids, c.logprobs, c.hit_max_length, source=self.sources[k])
                for k, p, c in zip(index, prompts, completions)]

    @property
    def consumed(self) -> int:
        return self._consumed

    def seek(self, consumed: int) -> None:
        self._consumed = int(consumed)
