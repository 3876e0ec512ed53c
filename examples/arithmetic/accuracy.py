"""Held-out accuracy of a checkpoint, measured exactly as vopd-train's evaluation measures it.

prepare.py reports the teacher's and the warmed-up student's accuracy with
this before any distillation; the distillation runs report theirs through
vopd-train's `--eval-*` evaluation. Both are one code path
(`vopd_megatron/eval/runner.py`: problems tokenized as training prompts, the
rollout sampler at `--eval-temperature` with `--rollout-max-new-tokens`,
math-verify grading, seeded by `--seed`), so this number and a run's
iteration-0 evaluation with the same seed, problems and samples are the same
number. One sample per problem is a noisy estimate (the warmed-up student's
is about 9% with a standard deviation of 2 points over 200 problems), so
prepare.py averages several (`--samples`, avg@k).

    python examples/arithmetic/accuracy.py --config examples/arithmetic/config.yaml \\
        --which teacher --load runs/arithmetic/teacher [--samples 8 | --greedy] [--temperature 1.0]

`boxed_answer` / `accuracy` are the task's own exact grader (the boxed answer
equals a + b); the tests check that math-verify grades the task's outputs
the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from vopd_megatron.errors import entry_point

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def boxed_answer(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text`, or None."""
    found = BOXED.findall(text)
    return found[-1] if found else None


def accuracy(texts: list[str], answers: list[str]) -> float:
    return sum(boxed_answer(t) == a for t, a in zip(texts, answers)) / max(len(answers), 1)


def student_evaluator(run, models, tokenizer, ctx, greedy: bool = False):
    """vopd-train's evaluator of `models.student` on the run's --eval-* problems;
    greedy: the argmax continuation (top-k 1), one sample per problem.

    ctx: the `ParallelContext` of the started run (runtime/startup.py)."""
    from vopd_megatron.eval import Evaluator, build_evaluator, eval_sampling_config, load_run_problems

    problems = load_run_problems(run, tokenizer, log=lambda _: None)
    if not greedy:
        return build_evaluator(run, models, tokenizer, problems, ctx)
    sampling = dataclasses.replace(eval_sampling_config(run, tokenizer), top_k=1)
    return Evaluator(run, models, problems, sampling, ctx, samples=1, tokenizer=tokenizer, seed=run.train.seed)


def parse(argv):
    """(own flags, RunConfig) of a command line: the model / checkpoint / sampling flags are
    vopd-train's, and the evaluation is the one its --eval-* flags describe."""
    ap = argparse.ArgumentParser(add_help=True, allow_abbrev=False)
    ap.add_argument("--which", choices=["student", "teacher"], default="student")
    ap.add_argument("--heldout", default=str(Path(__file__).parent / "data" / "heldout.jsonl"))
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--samples", type=int, default=1, help="samples per problem (avg@k); --greedy: 1")
    ap.add_argument("--max-problems", type=int, default=200)
    own, rest = ap.parse_known_args(argv)

    from vopd_megatron.config import parse_config

    run, _ = parse_config(rest + ["--eval-data", own.heldout, "--eval-max-problems", str(own.max_problems),
                                  "--eval-samples", str(own.samples), "--eval-temperature", str(own.temperature)])
    if own.which == "teacher":
        run = dataclasses.replace(run, model=run.teacher)
    return own, run


@entry_point
def main(argv=None):
    own, run = parse(argv)

    from vopd_megatron.data import load_tokenizer
    from vopd_megatron.progress import Progress
    from vopd_megatron.training.checkpoint import load_model_weights
    from vopd_megatron.megatron import cpu_compat
    from vopd_megatron.runtime.startup import start
    from vopd_megatron.training.setup import build_models

    cpu_compat.enable()  # without CUDA: megatron-core on CPU with gloo; no-op with CUDA
    ctx = start(run)
    models = build_models(run, ctx, with_teacher=False)
    load_model_weights(run.checkpoint.load, models.student)
    evaluator = student_evaluator(run, models, load_tokenizer(run.data.tokenizer_model), ctx, greedy=own.greedy)
    with Progress(evaluator.local_samples(), f"accuracy: {own.which}", unit="sample") as progress:
        result = evaluator.evaluate(on_samples=progress.update)
    acc, first = result.metrics["eval/avg@k"], result.records[0]
    mode = "greedy" if own.greedy else f"T={own.temperature}, avg@{own.samples}"
    print(f"accuracy {acc:.4f} ({mode}, {len(result.records)} held-out problems); e.g. "
          f"{first['problem']}{first['completions'][0]}", flush=True)
    return acc


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
