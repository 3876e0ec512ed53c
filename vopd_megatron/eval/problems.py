"""Evaluation problems: records with a problem and a reference answer.

A problem is tokenized exactly as a training prompt is (`data.prompts`: text,
chat `messages` or token ids; the same tokenizer and chat-template option), so
evaluation measures the student on the distribution it is trained on. A
problem longer than the budget left after the completion is skipped and
counted, as training prompts are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.prompts import prompt_ids, read_records
from ..data.tokenizer import Tokenizer


@dataclass
class EvalProblem:
    index: int
    """Position of the record in the file (0-based, counting skipped ones)."""
    prompt_ids: list[int]
    answer: str
    problem: object
    """The record's problem as written (text, messages or ids), for the per-problem records."""


def load_eval_problems(path: str | Path, tokenizer: Tokenizer | None, max_prompt_tokens: int, *,
                       problem_field: str = "problem", answer_field: str = "answer",
                       use_chat_template: bool = False, vocab_size: int | None = None,
                       max_problems: int | None = None) -> tuple[list[EvalProblem], dict]:
    """Problems of a JSONL / Parquet file (the first `max_problems` records), and a
    report `path, total, kept, skipped_too_long, max_prompt_tokens`."""
    problems, skipped, total = [], 0, 0
    for i, (where, rec) in enumerate(read_records(path)):
        if max_problems is not None and i >= max_problems:
            break
        total += 1
        if answer_field not in rec:
            raise ValueError(f"{where}: missing answer field {answer_field!r} (set --eval-answer-field); "
                             f"the record has {sorted(rec)}")
        answer = rec[answer_field]
        if isinstance(answer, (list, dict)) or str(answer).strip() == "":
            raise ValueError(f"{where}: answer field {answer_field!r} must be a non-empty string or number")
        if problem_field not in rec and "messages" not in rec and "prompt_ids" not in rec:
            raise ValueError(f"{where}: missing problem field {problem_field!r} (set --eval-problem-field, "
                             f"or give 'messages' / 'prompt_ids'); the record has {sorted(rec)}")
        _, ids = prompt_ids(where, rec, tokenizer, problem_field, use_chat_template)
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in ids):
            raise ValueError(f"{where}: token id outside the vocabulary [0, {vocab_size})")
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        shown = next(rec[f] for f in (problem_field, "messages", "prompt_ids") if f in rec)
        problems.append(EvalProblem(i, ids, str(answer), shown))
    if total == 0:
        raise ValueError(f"evaluation file {path} has no records")
    if not problems:
        raise ValueError(f"evaluation file {path}: none of its {total} problems fits in {max_prompt_tokens} tokens")
    report = {"path": str(path), "total": total, "kept": len(problems), "skipped_too_long": skipped,
              "max_prompt_tokens": max_prompt_tokens}
    return problems, report
