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

from ..data import checks
from ..data.prompts import prompt_ids, read_records
from ..data.tokenizer import Tokenizer
from ..errors import DataError


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
    report `path, total, kept, skipped_too_long, max_prompt_tokens`. A record's
    problem is read by `data.prompts.prompt_ids`, the training prompts' reader;
    its answer must be a non-empty string or a finite number (never null)."""
    problems, skipped, total = [], 0, 0
    for i, (where, rec) in enumerate(read_records(path, "evaluation file")):
        if max_problems is not None and i >= max_problems:
            break
        total += 1
        answer = checks.answer(where, rec, answer_field, "--eval-answer-field")
        _, ids = prompt_ids(where, rec, tokenizer, problem_field, use_chat_template, vocab_size=vocab_size,
                            field_flag="--eval-problem-field", noun="problem")
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        shown = next(rec[f] for f in (problem_field, "messages", "prompt_ids") if f in rec)
        problems.append(EvalProblem(i, ids, answer, shown))
    if total == 0:
        raise DataError(f"evaluation file {path} has no records")
    if not problems:
        raise DataError(f"evaluation file {path}: none of its {total} problems fits in {max_prompt_tokens} tokens")
    report = {"path": str(path), "total": total, "kept": len(problems), "skipped_too_long": skipped,
              "max_prompt_tokens": max_prompt_tokens}
    return problems, report
