"""Evaluation: sample k completions per problem, reverse KL to the teacher, math-verify grades (docs/eval.md)."""
from .grading import grade_problem, majority_index, pass_at_k, summarize_grades
from .problems import EvalProblem, load_eval_problems
from .runner import EvalResult, Evaluator, build_evaluator, eval_sampling_config, load_run_problems

__all__ = ["EvalProblem", "EvalResult", "Evaluator", "build_evaluator", "eval_sampling_config", "grade_problem",
           "load_eval_problems", "load_run_problems", "majority_index", "pass_at_k", "summarize_grades"]
