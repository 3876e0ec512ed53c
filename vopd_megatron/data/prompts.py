"""Prompt datasets: JSONL or Parquet records in, token-id prompts out.

Each record carries its prompt in one of three forms, recognised by the value's
type, looked up in this order of fields: `prompt_field` (default "prompt"),
"messages", "prompt_ids":

- a string: text, encoded by the tokenizer (wrapped as one user turn and
  rendered by the chat template when `use_chat_template`);
- a list of `{"role", "content"}` dicts: a chat, always rendered by the chat
  template with the assistant turn opened (`add_generation_prompt=True`);
- a list of ints: already token ids, used as they are.

A prompt longer than `max_prompt_tokens` (the sequence budget left after the
completion) is skipped and counted, not truncated: a cut prompt would be a
different question. The report says how many records were read, kept and
skipped, and of which form they were.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator

from ..errors import DataError, MissingDependency
from . import checks
from .tokenizer import Tokenizer

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


def load_prompt_dataset(path: str | Path, tokenizer: Tokenizer | None, max_prompt_tokens: int,
                        prompt_field: str = "prompt", use_chat_template: bool = False, *,
                        vocab_size: int | None = None) -> tuple[list[list[int]], dict]:
    """Prompts (token ids) from a JSONL or Parquet file, and a report dict:
    `path, total, kept, skipped_too_long, max_prompt_tokens, forms` (records per
    form: text / chat / ids) and `rows` (the location of each kept prompt, for
    messages about it later). `vocab_size`, when given, bounds every token id."""
    path = checks.require_file(path, "prompt file")
    prompts, rows, skipped, forms = [], [], 0, Counter()
    for where, rec in _records(path):
        form, ids = prompt_ids(where, rec, tokenizer, prompt_field, use_chat_template, vocab_size=vocab_size)
        forms[form] += 1
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        prompts.append(ids)
        rows.append(where)
    total = sum(forms.values())
    if total == 0:
        raise DataError(f"prompt file {path} has no records")
    if not prompts:
        raise DataError(f"prompt file {path}: none of its {total} prompts fits in "
                        f"{max_prompt_tokens} tokens")
    report = {"path": str(path), "total": total, "kept": len(prompts), "skipped_too_long": skipped,
              "max_prompt_tokens": max_prompt_tokens, "forms": dict(forms), "rows": rows}
    return prompts, report


def read_records(path: str | Path, what: str = "data file") -> Iterator[tuple[str, dict]]:
    """(location for error messages, record) for each record of a JSONL / Parquet file."""
    return _records(checks.require_file(path, what))


def prompt_ids(where: str, rec: dict, tokenizer: Tokenizer | None, prompt_field: str,
               use_chat_template: bool, *, vocab_size: int | None = None,
               field_flag: str = "--prompt-field", noun: str = "prompt") -> tuple[str, list[int]]:
    """(form, token ids) of one record's prompt, exactly as training prompts are
    tokenized, checked: not empty, integer ids, inside [0, vocab_size) when given.
    The one per-record reader of prompts (training prompts and evaluation problems).

    field_flag, noun: the flag that names `prompt_field` and what the record
    holds ("prompt", "problem"), for the missing-field message."""
    form, field, ids = _prompt_ids(where, rec, tokenizer, prompt_field, use_chat_template, field_flag, noun)
    if not ids:
        raise DataError(f"{where}: empty prompt")
    if vocab_size is not None:
        checks.token_ids(where, field if form == "ids" else f"{field} (tokenized)", ids, vocab_size)
    return form, ids


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """(location for error messages, record) for each record of the file."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _jsonl_records(path)
    elif suffix in PARQUET_SUFFIXES:
        yield from _parquet_records(path)
    else:
        raise DataError(f"data file {path}: unknown extension {path.suffix!r} "
                        f"(expected one of {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)})")


def _jsonl_records(path: Path):
    with path.open(encoding="utf-8") as f:
        i = -1
        try:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                where = f"{path}:{i + 1}"
                yield where, checks.json_object(where, line)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{i + 2}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                            "is this a JSONL file?") from None


def _parquet_records(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependency(f"reading {path} (Parquet) needs `pyarrow` (pip install pyarrow)") from None
    import pyarrow

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
    except pyarrow.ArrowException as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    row = 0
    for batch in batches:
        for rec in batch.to_pylist():
            # A column missing from some rows reads as None: the same as absent.
            yield f"{path} row {row}", {k: v for k, v in rec.items() if v is not None}
            row += 1


def _prompt_ids(where: str, rec: dict, tokenizer: Tokenizer | None, prompt_field: str,
                use_chat_template: bool, field_flag: str, noun: str) -> tuple[str, str, list[int]]:
    """(form, field read, token ids) of one record; form is "text", "chat" or "ids"."""
    for field in dict.fromkeys((prompt_field, "messages", "prompt_ids")):  # ordered, unique
        if field in rec:
            value = rec[field]
            break
    else:
        raise DataError(f"{where}: missing {noun} field {prompt_field!r} (set {field_flag}, or give "
                        f"'messages' / 'prompt_ids'); the record has {sorted(rec)}")
    if isinstance(value, str):
        text = value
        if not text.strip():  # checked before encoding: BOS alone would not look empty
            raise DataError(f"{where}: empty prompt")
        if use_chat_template:
            return "chat", field, _tokenizer(where, tokenizer, "chat").apply_chat_template(
                [{"role": "user", "content": text}])
        return "text", field, _tokenizer(where, tokenizer, "text").encode(text)
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for m in value:
            if not {"role", "content"} <= m.keys():
                raise DataError(f"{where}: field {field!r}: a chat message needs 'role' and 'content', got {sorted(m)}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: field {field!r}: a chat message's 'content' must be text, "
                                f"got {checks.kind(m['content'])}")
        return "chat", field, _tokenizer(where, tokenizer, "chat").apply_chat_template(value)
    if isinstance(value, list) and not any(isinstance(m, dict) for m in value):
        return "ids", field, list(checks.token_ids(where, field, value, empty="is empty (an empty prompt)"))
    raise DataError(f"{where}: field {field!r} is neither a string, a list of chat messages, "
                    f"nor a list of token ids (got {checks.kind(value)})")


def _tokenizer(where: str, tokenizer: Tokenizer | None, form: str) -> Tokenizer:
    if tokenizer is None:
        raise DataError(f"{where}: a {form} prompt needs a tokenizer (set --tokenizer-model), "
                        "or give pre-tokenized 'prompt_ids'")
    return tokenizer
