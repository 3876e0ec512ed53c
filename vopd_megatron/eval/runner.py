"""One evaluation pass: sample n completions per problem from the student, measure
the reverse KL to the teacher on them, grade them. Shared by vopd-train (every
`--eval-every` iterations) and vopd-eval (once, on a checkpoint).

Layout: data-parallel rank r takes a contiguous block of *problems*
(`runtime.sharding`, with all n samples of each, so the majority vote is
local); the ranks of one TP group
sample the same block with the same seed (identical draws, see
rollout/sampler.py). Per-problem records are all-gathered over the DP group,
so every rank ends with all of them.

Reverse KL: `eval/reverse_kl` is the mean over completion tokens of the
full-vocabulary `K_t = sum_v p_v (log p_v - log q_v)` at the *loss*
temperature, computed by the loss core (`vocab_parallel_opd_loss`, its `kl`
metric: exact under TP, from the vocab-parallel statistics) in a forward-only
pass of Megatron's schedule over the same `DistillationStage`s training uses,
with the run's loss backend (`--vopd-loss-backend`).
The sampling temperature of evaluation may differ; the KL is always the one
the loss is about.

Evaluation does not perturb training: the sampler draws from its own
generator, and the whole RNG state (host generators and Megatron's TP tracker)
plus every module's training flag are saved before and restored after.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..loss.config import LossConfig
from ..rollout.sampler import RolloutSampler
from ..rollout.sampling import SamplingConfig, mix_seed
from ..rollout.types import Rollout
from ..runtime.context import ParallelContext
from ..runtime.sharding import shard_bounds
from ..training.batch import to_microbatches
from ..training.inputs import run_eos_id
from .grading import ProblemGrade, grade_problem, pass_at_k, summarize_grades
from .problems import EvalProblem

EVAL_SEED_SALT = 0xE7A1


@dataclass
class EvalResult:
    metrics: dict[str, float]
    """eval/* scalars (avg@k / pass@k / maj@k only when completions can be decoded)."""
    records: list[dict] = field(default_factory=list)
    """One dict per problem, in problem order (every rank holds all of them)."""


class Evaluator:
    """Evaluates the student of `models` on fixed problems; call `evaluate()` any number of times.

    models: `training.setup.Models` (teacher None: no reverse KL).
    tokenizer: decodes completions for grading; None: no accuracy metrics.
    pass_k: k of pass@k (<= samples).
    """

    def __init__(self, run, models, problems: list[EvalProblem], sampling: SamplingConfig, ctx: ParallelContext, *,
                 samples: int, pass_k: int | None = None, tokenizer=None, seed: int = 0):
        self.run, self.models, self.problems, self.ctx = run, models, problems, ctx
        self.samples, self.pass_k = samples, pass_k or samples
        self.tokenizer, self.seed = tokenizer, seed
        self.sampler = RolloutSampler(models.student, sampling, run.model.vocab_size, tokenizer=tokenizer)
        self.loss_config = eval_loss_config(run)

    def local_samples(self) -> int:
        """Completions this rank samples in one evaluation (its block of problems x samples)."""
        lo, hi = shard_bounds(len(self.problems), self.ctx.dp_size, self.ctx.dp_rank)
        return (hi - lo) * self.samples

    def evaluate(self, on_samples=None) -> EvalResult:
        """One evaluation pass; on_samples(n) is called as this rank's completions are sampled (progress)."""
        from ..training.rng_state import get_rng_state, set_rng_state

        rng = get_rng_state()
        modules = [m for stage in self.models.stages + self.models.student for m in stage.modules()]
        flags = [(m, m.training) for m in modules]
        try:
            return self._evaluate(on_samples)
        finally:
            for m, training in flags:
                m.training = training
            set_rng_state(rng)

    def _evaluate(self, on_samples=None) -> EvalResult:
        rank, dp = self.ctx.dp_rank, self.ctx.dp_size
        P, n = len(self.problems), self.samples
        lo, hi = shard_bounds(P, dp, rank)
        mine = self.problems[lo:hi]
        prompts = [p.prompt_ids for p in mine for _ in range(n)]  # problem-major: n rows per problem
        completions = self.sampler.generate(prompts, seed=mix_seed(self.seed, EVAL_SEED_SALT, rank),
                                            on_batch=on_samples)
        reverse_kl = self._reverse_kl(prompts, completions, rows_per_rank=-(-P // dp) * n)
        records = []
        for j, prob in enumerate(mine):
            comps = completions[j * n : (j + 1) * n]
            records.append(self._record(prob, comps))
        if dp > 1:
            pieces = [None] * dp
            dist.all_gather_object(pieces, records, group=self.ctx.dp_group)
            records = [r for piece in pieces for r in piece]
        metrics = {} if reverse_kl is None else {"eval/reverse_kl": reverse_kl}
        lengths = [t for r in records for t in r["completion_tokens"]]
        metrics["eval/completion_tokens"] = sum(lengths) / len(lengths)
        metrics["eval/hit_max_length"] = sum(h for r in records for h in r["hit_max_length"]) / len(lengths)
        if self.tokenizer is not None:
            grades = [ProblemGrade(r["correct"], r["answers"], r["majority_answer"], r["majority_correct"])
                      for r in records]
            metrics.update({f"eval/{k}": v for k, v in summarize_grades(grades, self.pass_k).items()})
        return EvalResult(metrics, records)

    def _record(self, prob: EvalProblem, comps) -> dict:
        rec = {
            "index": prob.index, "problem": prob.problem, "answer": prob.answer,
            "completion_ids": [c.completion_ids for c in comps],
            "completion_tokens": [len(c.completion_ids) for c in comps],
            "hit_max_length": [bool(c.hit_max_length) for c in comps],
        }
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(c.completion_ids) for c in comps]
            grade = grade_problem(texts, prob.answer)
            rec.update(completions=texts, answers=grade.answers, correct=grade.correct,
                       majority_answer=grade.majority_answer, majority_correct=grade.majority_correct,
                       pass_at_k=pass_at_k(len(comps), sum(grade.correct), self.pass_k))
        return rec

    def _reverse_kl(self, prompts, completions, rows_per_rank: int) -> float | None:
        """Mean of K_t over every completion token of the global evaluation batch (None: no teacher).

        Each DP rank runs the same number of microbatches (padded with empty rows,
        whose loss mask is zero), so the schedule's collectives line up."""
        if self.models.teacher is None:
            return None
        from ..training.step import batch_metrics, forward_backward

        run = self.run
        mbs = run.train.micro_batch_size
        rows = [Rollout(list(p), c.completion_ids) for p, c in zip(prompts, completions)]
        num_mb = max(1, math.ceil(rows_per_rank / mbs))
        rows += [Rollout([0], [])] * (num_mb * mbs - len(rows))  # all-masked padding
        microbatches = to_microbatches(rows, mbs, run.model.seq_length, self.ctx.device)
        for stage in self.models.stages:
            stage.eval()
        with torch.no_grad():
            losses = forward_backward(self.models, microbatches, run, self.loss_config, forward_only=True)
        return batch_metrics(losses, self.ctx)[0]["kl"]


def eval_loss_config(run) -> LossConfig:
    """The plain estimator at the loss temperature, with the run's loss backend (no
    correction, no PPO ratio): only its `kl` statistic is read."""
    d = run.distill
    return LossConfig(mode="vopd", temperature=d.vopd_temperature, backend=d.vopd_loss_backend)


def eval_sampling_config(run, tokenizer) -> SamplingConfig:
    """Evaluation sampling: unfiltered, at --eval-temperature, --eval-max-new-tokens,
    with the rollouts' EOS, stop strings and batch size."""
    return SamplingConfig(max_new_tokens=run.eval_max_new_tokens, temperature=run.eval_temperature,
                          eos_id=run_eos_id(run, tokenizer), max_batch_size=run.data.rollout_batch_size,
                          stop_strings=run.data_stop_strings())


def load_run_problems(run, tokenizer, *, log=print) -> list[EvalProblem]:
    """The problems of a run's --eval-data, tokenized as its training prompts are (count printed)."""
    from .problems import load_eval_problems

    e = run.eval
    budget = run.model.seq_length + 1 - run.eval_max_new_tokens
    problems, report = load_eval_problems(
        e.eval_data, tokenizer, budget, problem_field=e.eval_problem_field, answer_field=e.eval_answer_field,
        use_chat_template=run.data.apply_chat_template, vocab_size=run.model.vocab_size,
        max_problems=e.eval_max_problems)
    log(f"[vopd] eval: {report['kept']}/{report['total']} problems from {e.eval_data}; "
        f"{report['skipped_too_long']} skipped as longer than {budget} tokens; {e.eval_samples} sample(s) each"
        + ("" if tokenizer is not None else "; no tokenizer: reverse KL and lengths only, no grading"))
    return problems


def build_evaluator(run, models, tokenizer, problems: list[EvalProblem], ctx: ParallelContext) -> Evaluator:
    """The Evaluator of a run's --eval-* flags over already loaded problems."""
    e = run.eval
    return Evaluator(run, models, problems, eval_sampling_config(run, tokenizer), ctx, samples=e.eval_samples,
                     pass_k=e.eval_pass_k, tokenizer=tokenizer, seed=run.train.seed)
