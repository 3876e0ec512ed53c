"""Per-record checks shared by every reader of user data files.

Prompts (`data.prompts`), evaluation problems (`eval.problems`), rollout files
(`rollout.file_source`) and SFT rows (`training.sft`) all hold the same few kinds
of values: token ids, log-probs, reference answers, and the path of the file
itself. Each check here raises `DataError` naming the file and row (`where`,
e.g. `rollouts.jsonl:12` or `prompts.parquet row 3`), the field, and, inside a
list, the index and value of the first bad element, so that bad data fails
while loading, before any process group or model exists, and never silently:
no float id is truncated, no `null` answer is graded as the string "None".
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import DataError, MissingFileError


def kind(value) -> str:
    """A JSON-ish name of a value's type, for messages."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def json_object(where: str, line: str) -> dict:
    """One JSONL line as a JSON object; DataError naming `where` (file:line) otherwise."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {kind(rec)}")
    return rec


def require_file(path, what: str) -> Path:
    """`path` as a Path if it is an existing, readable regular file; otherwise
    MissingFileError / DataError saying which of those it is not."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{what} {path} does not exist")
    if path.is_dir():
        raise MissingFileError(f"{what} {path} is a directory; expected a file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{what} {path} is not readable (permission denied)")
    return path


def is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def token_ids(where: str, field: str, value, vocab_size: int | None = None, *,
              empty: str | None = "is empty") -> list[int]:
    """`value` checked as a list of token ids in [0, vocab_size).

    empty: the complaint about an empty list (None: an empty list is fine)."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field {field!r} must be a list of token ids, got {kind(value)}")
    if not value and empty is not None:
        raise DataError(f"{where}: field {field!r} {empty}")
    for i, t in enumerate(value):
        if not is_token_id(t):
            extra = " (a float id would be truncated)" if isinstance(t, float) else ""
            raise DataError(f"{where}: field {field!r}[{i}] is {t!r}, {kind(t)}; token ids are integers{extra}")
        if vocab_size is not None and not 0 <= t < vocab_size:
            raise DataError(f"{where}: field {field!r}[{i}] = {t} is outside the vocabulary [0, {vocab_size}) "
                            "(--vocab-size)")
    return value


def logprobs(where: str, field: str, value, length: int) -> list[float]:
    """`value` checked as `length` finite log-probabilities (numbers <= 0)."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field {field!r} must be a list of log-probs, got {kind(value)}")
    if len(value) != length:
        raise DataError(f"{where}: field {field!r} has {len(value)} log-probs for {length} completion tokens")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise DataError(f"{where}: field {field!r}[{i}] is {x!r}, {kind(x)}; log-probs are numbers")
        if not math.isfinite(x):
            raise DataError(f"{where}: field {field!r}[{i}] is {x}; log-probs must be finite")
        if x > 1e-4:  # rounding may put log 1 slightly above 0, never further
            raise DataError(f"{where}: field {field!r}[{i}] = {x} is positive; a log-probability is <= 0 "
                            "(probabilities instead of log-probabilities?)")
    return [float(x) for x in value]


def answer(where: str, rec: dict, field: str, flag: str) -> str:
    """A reference answer (non-empty string, or a finite number) as text."""
    if field not in rec:
        raise DataError(f"{where}: missing answer field {field!r} (set {flag}); the record has {sorted(rec)}")
    value = rec[field]
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where}: answer field {field!r} is {value}, not an answer")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
        shown = "a blank string" if isinstance(value, str) else kind(value)
        raise DataError(f"{where}: answer field {field!r} must be a non-empty string or number, got {shown}")
    return str(value)


def require_writable_dir(path, what: str) -> Path:
    """`path` as a Path if it is, or can be created as, a writable directory:
    checked before the work whose results go there, not after it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{what} {path} exists and is not a directory")
    existing = path
    while not existing.exists():  # the nearest existing ancestor is where it would be created
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"{what} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{what} {path}: {existing} is not writable (permission denied)")
    return path
