"""Rollouts in, fixed-shape microbatches out.

A rollout is one sampled completion: the prompt's token ids, the completion's
token ids, and optionally the sampling engine's log-probs of the completion
tokens (for the rollout correction). `RolloutSource` is the seam between the
trainer and whatever produces rollouts: the in-process engine (later), or a
file written by an external inference server (`JsonlRolloutSource`).

`collate` lays rollouts out the Megatron way: `tokens = seq[:-1]`,
`labels = seq[1:]`, so the logits at position t are scored against token
t + 1; `loss_mask[t] = 1` exactly where `labels[t]` is a completion token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..data import checks
from ..errors import DataError


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


class JsonlRolloutSource:
    """Rollouts from a JSONL file: one `{"prompt_ids": [...], "completion_ids": [...],
    "logprobs": [...]?}` per line, read in file order and cycled.

    Every row is checked while loading (`DataError` naming the file, line and
    field): integer token ids inside [0, vocab_size), a non-empty prompt and
    completion, finite log-probs <= 0, one per completion token. With
    `seq_length`, a prompt that leaves no completion token inside the training
    sequence (longer than seq_length tokens) is an error too: that row would
    train on nothing. A completion cut at seq_length + 1 tokens is kept (its
    first tokens are trained on) and counted in `truncated`. With
    `needs_logprobs` (rollout correction, PPO ratio) every row must carry them.
    """

    def __init__(self, path: str | Path, vocab_size: int | None = None, *, seq_length: int | None = None,
                 needs_logprobs: str | None = None):
        self.path = checks.require_file(path, "rollout file")
        self.seq_length, self.needs_logprobs, self.truncated = seq_length, needs_logprobs, 0
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"rollout file {self.path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        self.rollouts = [self._parse(i, line, vocab_size) for i, line in enumerate(lines) if line.strip()]
        if not self.rollouts:
            raise DataError(f"rollout file {self.path} has no rollouts")
        self._consumed = 0

    def _parse(self, i, line, vocab_size):
        where = f"{self.path}:{i + 1}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {checks.kind(rec)}")
        for key in ("prompt_ids", "completion_ids"):
            if key not in rec:
                raise DataError(f"{where}: missing field {key!r}; the record has {sorted(rec)}")
        prompt = checks.token_ids(where, "prompt_ids", rec["prompt_ids"], vocab_size,
                                  empty="is empty (a completion needs a context)")
        completion = checks.token_ids(where, "completion_ids", rec["completion_ids"], vocab_size,
                                      empty="is empty: the rollout has no token to train on")
        if self.seq_length is not None and len(prompt) > self.seq_length:
            raise DataError(f"{where}: field 'prompt_ids' has {len(prompt)} tokens, which fill --seq-length "
                            f"{self.seq_length}: no completion token would be trained on")
        if self.seq_length is not None and len(prompt) + len(completion) > self.seq_length + 1:
            self.truncated += 1
        lp = rec.get("logprobs")
        if lp is not None:
            lp = checks.logprobs(where, "logprobs", lp, len(completion))
        elif self.needs_logprobs:
            raise DataError(f"{where}: no 'logprobs' field, which {self.needs_logprobs} needs "
                            "(the sampler's log-prob of every completion token)")
        return Rollout(prompt, completion, lp, source=where)

    def take(self, n):
        out = [self.rollouts[(self._consumed + i) % len(self.rollouts)] for i in range(n)]
        self._consumed += n
        return out

    @property
    def consumed(self):
        return self._consumed

    def seek(self, consumed):
        self._consumed = consumed


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

