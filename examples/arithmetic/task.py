"""The controlled task: multi-digit addition with a short worked solution.

A problem is `a+b=` with 2- or 3-digit operands; the solution adds column by
column from the units, writing each column's sum (with the carry), then the
answer in `\\boxed{...}` (what math-verify grades):

    prompt      "347+85="
    completion  "7+5=12;4+8+1=13;3+0+1=4;\\boxed{432}"   (+ <eos>)

Everything is a character, so a tiny character-level tokenizer (built here
with the Hugging Face `tokenizers` library) covers the task exactly, the truth
is computable for every sample, and teacher and student share one vocabulary.

Splits are disjoint by construction: the held-out problems are drawn first
(fixed seed), and every other split excludes them (and each other).

    python examples/arithmetic/task.py --out examples/arithmetic/data   # writes the files below
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

#: Every character the task uses; the tokenizer maps each to one id.
CHARS = list("0123456789+=;\\boxed{}")
PAD, EOS = "<pad>", "<eos>"
LO, HI = 10, 999  # operand range: 2- and 3-digit numbers


def solution(a: int, b: int) -> str:
    """The worked column-addition solution of `a+b`, ending in `\\boxed{a+b}`."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return ";".join(steps) + ";\\boxed{" + str(a + b) + "}"


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def draw_pairs(n: int, seed: int, exclude: set) -> list[tuple[int, int]]:
    """n distinct (a, b) pairs, none in `exclude` (which grows with them)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        pair = (rng.randint(LO, HI), rng.randint(LO, HI))
        if pair not in exclude:
            exclude.add(pair)
            out.append(pair)
    return out


def build_tokenizer(path: Path) -> None:
    """A character-level tokenizer.json: one id per character of CHARS, plus <pad> and <eos>.

    WordLevel over single characters (a regex split that isolates every
    character) and a Fuse decoder, so decode(encode(text)) == text exactly.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate([PAD, EOS] + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([PAD, EOS])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_splits(n_sft: int = 20000, n_prompts: int = 4000, n_eval: int = 200, seed: int = 0) -> dict:
    """Disjoint problem sets: held-out eval, distillation prompts, supervised data."""
    seen: set = set()
    heldout = draw_pairs(n_eval, seed, seen)
    prompts = draw_pairs(n_prompts, seed + 1, seen)
    sft = draw_pairs(n_sft, seed + 2, seen)
    return {"heldout": heldout, "prompts": prompts, "sft": sft}


def write_data(out: Path, **kw) -> dict:
    """Write tokenizer.json and the JSONL splits into `out`; returns their paths."""
    splits = make_splits(**kw)
    files = {
        "tokenizer": out / "tokenizer.json",
        # vopd-sft: text prompt + target completion
        "sft": out / "sft.jsonl",
        # vopd-train --prompt-data (field "prompt"); answers kept for reference
        "prompts": out / "prompts.jsonl",
        # the held-out evaluation contract: {"problem", "answer"}
        "heldout": out / "heldout.jsonl",
    }
    build_tokenizer(files["tokenizer"])
    write_jsonl(files["sft"], [{"prompt": prompt(a, b), "completion": solution(a, b)} for a, b in splits["sft"]])
    write_jsonl(files["prompts"], [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in splits["prompts"]])
    write_jsonl(files["heldout"], [{"problem": prompt(a, b), "answer": str(a + b)} for a, b in splits["heldout"]])
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    files = write_data(Path(args.out), seed=args.seed)
    for name, path in files.items():
        print(f"wrote {name}: {path}")


if __name__ == "__main__":
    main()
