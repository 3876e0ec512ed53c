"""Instructions with verifiable answers, generated here (no download): arithmetic and unit conversions.

Each problem is one plain-English question with an integer answer, asked as
one user turn through SmolLM2's chat template (`--apply-chat-template`):

    "What is 7 + 5? Answer with just the number."                           -> 12
    "Mia has 9 apples and buys 4 more. How many apples does Mia have now? ..." -> 13
    "How many days are in 3 weeks? Answer with just the number."             -> 21

Graded by math-verify (`vopd_megatron/eval/grading.py`: the last number of the
reply, compared as math). The families are the ones the 135M teacher answers
well greedily (measured before any distillation run; see
docs/smollm2_report.md), so that a pruned student that has lost the skill
has something to recover.

Every family enumerates all the questions it can ask (small operand ranges:
3,000 in all); the splits are disjoint by construction, a shuffled share of
each family held out (`make_splits`), the rest left to the prompts.

    python examples/smollm2/task.py --out runs/smollm2/data   # prompts.jsonl, heldout.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
from itertools import zip_longest
from pathlib import Path

SUFFIX = " Answer with just the number."
NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Emma"]
FRUITS = ["apples", "oranges", "pears", "plums"]


def add_digits():
    return [(f"What is {a} + {b}?", a + b) for a in range(1, 10) for b in range(1, 10)]


def add_words():
    return [(f"What is {a} plus {b}?", a + b) for a in range(1, 11) for b in range(1, 11)]


def buy_more():
    return [(f"{n} has {a} {f} and buys {b} more. How many {f} does {n} have now?", a + b)
            for n in NAMES for f in FRUITS for a in range(2, 13) for b in range(2, 10)]


def weeks_to_days():
    return [(f"How many days are in {n} weeks?", 7 * n) for n in range(2, 13)]


def dozens_to_eggs():
    return [(f"How many eggs are in {n} dozen?", 12 * n) for n in range(2, 13)]


#: family -> every question it can ask (with its answer), in a fixed order.
FAMILIES = {f.__name__: f for f in (add_digits, add_words, buy_more, weeks_to_days, dozens_to_eggs)}


def make_splits(heldout_per_family: int = 18, prompts_per_family: int = 80, seed: int = 0) -> dict[str, list[dict]]:
    """Per family: shuffle every question it can ask (fixed seed), give the first
    min(heldout_per_family, a third of them) to the held-out split and the next (at most
    `prompts_per_family`) to the prompts, so both splits hold every family, in proportions that do
    not follow the families' sizes, and never share a question. Prompts interleave the families."""
    heldout, rest = [], []
    for i, (name, family) in enumerate(FAMILIES.items()):
        items = family()
        random.Random(seed * 1000 + i).shuffle(items)
        k = min(heldout_per_family, len(items) // 3)
        as_rows = [{"question": q + SUFFIX, "answer": str(a), "family": name} for q, a in items]
        heldout += as_rows[:k]
        rest.append(as_rows[k : k + prompts_per_family])
    prompts = [row for turn in zip_longest(*rest) for row in turn if row is not None]
    return {"heldout": heldout, "prompts": prompts}


def write_data(out: Path, **kw) -> dict[str, Path]:
    """prompts.jsonl (`prompt`, for --prompt-data) and heldout.jsonl (`problem`, `answer`, for --eval-data)."""
    splits = make_splits(**kw)
    out.mkdir(parents=True, exist_ok=True)
    files = {"prompts": out / "prompts.jsonl", "heldout": out / "heldout.jsonl"}
    with files["prompts"].open("w") as f:
        for p in splits["prompts"]:
            f.write(json.dumps({"prompt": p["question"], "answer": p["answer"], "family": p["family"]}) + "\n")
    with files["heldout"].open("w") as f:
        for p in splits["heldout"]:
            f.write(json.dumps({"problem": p["question"], "answer": p["answer"], "family": p["family"]}) + "\n")
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/smollm2/data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name, path in write_data(Path(args.out), seed=args.seed).items():
        print(f"wrote {name}: {path}")


if __name__ == "__main__":
    main()
