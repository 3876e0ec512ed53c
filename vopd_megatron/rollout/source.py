"""`OnPolicyRolloutSource`: the trainer's `RolloutSource` backed by the in-process sampler.

`take(n)` samples completions for the next n prompts of a (optionally
per-epoch shuffled) prompt list with the student's current weights and returns
the same n rollouts on every rank, as the `RolloutSource` protocol requires.

With a data-parallel group each DP rank samples only its contiguous slice
`[r n / dp, (r + 1) n / dp)` (the slice `dp_microbatches` will train it on),
then the token lists are all-gathered so every rank returns all n. Ranks of one
TP group sample the same slice with the same seed (identical draws; see
sampler.py). Without a group every rank samples all n (correct, redundant).

Determinism: prompt order depends on (seed, epoch); the sampling seed of a
`take` depends on (seed, consumed, DP rank). So a run resumed with `seek(c)` on
the same weights and the same DP size reproduces the rollouts of the
uninterrupted run; a different DP size gives different (equally distributed)
draws.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .sampler import RolloutSampler
from .sampling import mix_seed
from .types import Rollout


class OnPolicyRolloutSource:
    """Rollouts sampled on demand from the student over a list of tokenized prompts."""

    def __init__(self, sampler: RolloutSampler, prompts: list[list[int]], seed: int = 0, shuffle: bool = True,
                 dp_group=None, sources: list[str] | None = None):
        """sources: where each prompt is (`prompts.jsonl:7`), carried by its rollouts for messages."""
        if not prompts:
            raise ValueError("OnPolicyRolloutSource needs at least one prompt")
        self.sampler = sampler
        self.prompts = [list(p) for p in prompts]
        self.sources = list(sources) if sources is not None else [None] * len(self.prompts)
        self.seed, self.shuffle, self.dp_group = int(seed), shuffle, dp_group
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

    def take(self, n: int) -> list[Rollout]:
        index = [self.prompt_index(self._consumed + i) for i in range(n)]
        prompts = [self.prompts[k] for k in index]
        dp = dist.get_world_size(self.dp_group) if self.dp_group is not None else 1
        rank = dist.get_rank(self.dp_group) if self.dp_group is not None else 0
        lo, hi = rank * n // dp, (rank + 1) * n // dp
        completions = self.sampler.generate(prompts[lo:hi], seed=mix_seed(self.seed, self._consumed, rank))
        mine = [(c.completion_ids, c.logprobs, c.hit_max_length) for c in completions]
        if dp > 1:
            pieces = [None] * dp
            dist.all_gather_object(pieces, mine, group=self.dp_group)
            mine = [x for piece in pieces for x in piece]
        self._consumed += n
        return [Rollout(list(p), ids, lps, hit, source=self.sources[k])
                for k, p, (ids, lps, hit) in zip(index, prompts, mine)]

    @property
    def consumed(self) -> int:
        return self._consumed

    def seek(self, consumed: int) -> None:
        self._consumed = int(consumed)
