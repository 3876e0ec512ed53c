"""`vopd-sft`'s data: tokenized (prompt, completion + EOS) rows, visited in a seeded shuffle."""
from __future__ import annotations

import torch

from ..data.prompts import prompt_ids, read_records
from ..errors import DataError
from ..rollout.types import Rollout


def load_sft_rows(path, tokenizer, eos_id: int | None, seq_length: int,
                  use_chat_template: bool = False) -> list[Rollout]:
    """Tokenized (prompt, completion + EOS) pairs from JSONL / Parquet records;
    a row longer than seq_length + 1, or with nothing to train on, is an error.

    The prompt is tokenized exactly as vopd-train tokenizes a prompt (and
    evaluation a problem): the tokenizer's own special tokens (a BOS) kept, the
    chat template applied with --apply-chat-template, so a model trained here
    sees its prompts in the form distillation and evaluation give them. The
    completion continues it: no special tokens of its own, EOS appended."""
    rows = []
    for where, rec in read_records(path, "SFT data file"):
        for key in ("prompt", "completion"):
            if not isinstance(rec.get(key), str):
                got = "missing" if key not in rec else f"got {type(rec[key]).__name__ if rec[key] is not None else 'null'}"
                raise DataError(f"{where}: needs a text field {key!r} ({got})")
        _, prompt = prompt_ids(where, rec, tokenizer, "prompt", use_chat_template)
        completion = tokenizer.encode(rec["completion"], add_special_tokens=False)
        completion += [eos_id] if eos_id is not None else []
        if not prompt:
            raise DataError(f"{where}: field 'prompt' is empty after tokenization (a completion needs a context)")
        if not completion:
            raise DataError(f"{where}: field 'completion' is empty and there is no EOS id to append "
                            "(--eos-id): the row has no token to train on")
        if len(prompt) + len(completion) > seq_length + 1:
            raise DataError(f"{where}: {len(prompt) + len(completion)} tokens do not fit "
                            f"--seq-length {seq_length} (+1)")
        rows.append(Rollout(prompt, completion, source=where))
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


class ShuffledRows:
    """Rows in a seeded per-epoch shuffle; `take(n)` is identical on every rank."""

    def __init__(self, rows: list, seed: int):
        self.rows, self.seed, self.consumed = rows, seed, 0
        self._epoch, self._order = -1, None

    def take(self, n: int) -> list:
        out = []
        for i in range(self.consumed, self.consumed + n):
            epoch, k = divmod(i, len(self.rows))
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._order = epoch, torch.randperm(len(self.rows), generator=g)
            out.append(self.rows[int(self._order[k])])
        self.consumed += n
        return out
