"""Grading completions against reference answers, and the metrics over k samples.

Answers are compared with `math-verify` (Hugging Face): it extracts the final
answer of a completion (a `\\boxed{...}` or the last expression) and checks
mathematical equivalence with the reference (`0.5` equals `\\frac12`), not
string equality.

Metrics for one problem with n sampled completions of which c are correct:

- avg@n: c / n, the expected accuracy of one sample;
- pass@k: the probability that at least one of k completions drawn without
  replacement from the n is correct, `1 - C(n - c, k) / C(n, k)` (the unbiased
  estimator of Chen et al., 2021); with k = n it is 1 if any is correct;
- maj@n: whether the majority answer is correct. Extracted answers are grouped
  by equivalence (math-verify again); the largest group wins, ties go to the
  group whose first member came first; completions with no extractable answer
  do not vote.

The metrics of a set of problems are the means over problems.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise ImportError("grading needs `math-verify` (pip install math-verify)") from None
    return math_verify


def parse_reference(answer) -> list:
    """The parsed reference answer; a bare value ("5", 5, "x^2") is read as math, `$...$`/`\\boxed` as written."""
    mv = _math_verify()
    text = str(answer).strip()
    if "$" not in text and "\\boxed" not in text:
        text = f"${text}$"
    return mv.parse(text)


def parse_prediction(text: str) -> list:
    """math-verify's extraction of a completion's final answer ([] when none)."""
    return _math_verify().parse(text)


def equivalent(gold: list, pred: list) -> bool:
    """Whether a parsed prediction equals the parsed reference (False when either is empty)."""
    if not gold or not pred:
        return False
    return bool(_math_verify().verify(gold, pred))


def answer_text(parsed: list) -> str | None:
    """The extracted answer as text (for records), or None."""
    return str(parsed[-1]) if parsed else None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_index(preds: list[list]) -> int | None:
    """Index of the first member of the largest group of equivalent extracted answers
    (ties: the group that appeared first); None if no completion has an answer."""
    groups: list[list[int]] = []  # indices; groups[g][0] is the representative
    for i, p in enumerate(preds):
        if not p:
            continue
        for g in groups:
            if equivalent(preds[g[0]], p):
                g.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return None
    best = max(groups, key=lambda g: (len(g), -g[0]))
    return best[0]


@dataclass
class ProblemGrade:
    correct: list[bool]
    """One flag per sampled completion."""
    answers: list[str | None]
    """Each completion's extracted answer (None: nothing to extract)."""
    majority_answer: str | None
    majority_correct: bool


def grade_problem(completions: list[str], reference) -> ProblemGrade:
    """Grade the n completions of one problem against its reference answer."""
    gold = parse_reference(reference)
    preds = [parse_prediction(t) for t in completions]
    correct = [equivalent(gold, p) for p in preds]
    m = majority_index(preds)
    return ProblemGrade(
        correct=correct, answers=[answer_text(p) for p in preds],
        majority_answer=None if m is None else answer_text(preds[m]),
        majority_correct=False if m is None else correct[m],
    )


def summarize_grades(grades: list[ProblemGrade], k: int) -> dict[str, float]:
    """avg@k, pass@k, maj@k over problems (means); each problem has the same n >= k samples."""
    if not grades:
        raise ValueError("no graded problems")
    out = {"avg@k": 0.0, "pass@k": 0.0, "maj@k": 0.0}
    for g in grades:
        n, c = len(g.correct), sum(g.correct)
        out["avg@k"] += c / n
        out["pass@k"] += pass_at_k(n, c, k)
        out["maj@k"] += float(g.majority_correct)
    return {key: v / len(grades) for key, v in out.items()}
