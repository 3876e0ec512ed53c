"""Rollouts from a file written by an external inference server (`JsonlRolloutSource`)."""
from __future__ import annotations

from pathlib import Path

from ..data import checks
from ..errors import DataError
from ..runtime.sharding import shard_bounds
from .types import Rollout


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
    Other fields are ignored (servers write text, rewards, ids), except that
    fields named like log-probs but not `logprobs` (`behavior_logprobs`,
    `log_probs`, ...) are collected in `misnamed_logprobs`: the caller warns,
    since such a file's log-probs would silently go unused.
    """

    def __init__(self, path: str | Path, vocab_size: int | None = None, *, seq_length: int | None = None,
                 needs_logprobs: str | None = None):
        self.path = checks.require_file(path, "rollout file")
        self.seq_length, self.needs_logprobs, self.truncated = seq_length, needs_logprobs, 0
        self.misnamed_logprobs: set[str] = set()
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
        rec = checks.json_object(where, line)
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
        misnamed = sorted(k for k in rec if k != "logprobs" and "logprob" in k.replace("_", "").lower())
        self.misnamed_logprobs.update(misnamed)
        lp = rec.get("logprobs")
        if lp is not None:
            lp = checks.logprobs(where, "logprobs", lp, len(completion))
        elif self.needs_logprobs:
            hint = f"; the record has {', '.join(map(repr, misnamed))}: rename it 'logprobs'" if misnamed else ""
            raise DataError(f"{where}: no 'logprobs' field, which {self.needs_logprobs} needs "
                            f"(the sampler's log-prob of every completion token){hint}")
        return Rollout(prompt, completion, lp, source=where)

    def take(self, n, dp_size=1, dp_rank=0):
        lo, hi = shard_bounds(n, dp_size, dp_rank)
        out = [self.rollouts[(self._consumed + i) % len(self.rollouts)] for i in range(lo, hi)]
        self._consumed += n
        return out

    @property
    def consumed(self):
        return self._consumed

    def seek(self, consumed):
        self._consumed = consumed
