"""What a run reads from files, before any process group or model exists.

Bad data fails in seconds with one message naming the file and row, not after
minutes of building models: the tokenizer (checked against the teacher's),
the prompts to sample from or the rollout file to train on. Evaluation
problems are read by the evaluator's own loader (eval/runner.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data import check_compatible, check_vocab_fits, load_prompt_dataset, load_tokenizer
from ..launch import rank0_print
from ..rollout.file_source import JsonlRolloutSource


@dataclass
class RunInputs:
    tokenizer: object | None
    prompts: list[list[int]] | None  # --prompt-data, tokenized
    prompt_rows: list[str] | None  # where each prompt is in --prompt-data (for messages)
    rollout_file: JsonlRolloutSource | None  # --rollout-data


def run_tokenizer(run):
    """The student's tokenizer (None without --tokenizer-model), checked against the teacher's."""
    d = run.data
    tokenizer = load_tokenizer(d.tokenizer_model) if d.tokenizer_model else None
    if tokenizer is not None:
        check_vocab_fits(tokenizer, run.model.vocab_size)
    if d.teacher_tokenizer_model:
        if tokenizer is None:
            raise ValueError("--teacher-tokenizer-model needs --tokenizer-model (the student's) to compare with")
        check_compatible(tokenizer, load_tokenizer(d.teacher_tokenizer_model))
    return tokenizer


def run_eos_id(run, tokenizer) -> int | None:
    """--eos-id, else the tokenizer's EOS (None: neither is known)."""
    if run.data.eos_id is not None:
        return run.data.eos_id
    return tokenizer.eos_id if tokenizer is not None else None


def load_inputs(run) -> RunInputs:
    """Tokenizer, then the prompts (--prompt-data) or the rollout file (--rollout-data).
    Raises ValueError / FileNotFoundError naming the file and the problem."""
    d = run.data
    tokenizer = run_tokenizer(run)
    prompts = rollout_file = report = None
    if d.rollout_data:
        rollout_file = load_rollout_file(run)
    elif d.prompt_data:
        budget = run.model.seq_length + 1 - d.rollout_max_new_tokens
        prompts, report = load_prompt_dataset(d.prompt_data, tokenizer, budget, prompt_field=d.prompt_field,
                                              use_chat_template=d.apply_chat_template,
                                              vocab_size=run.model.vocab_size)
        rank0_print(f"[vopd] {report['kept']}/{report['total']} prompts from {d.prompt_data}; "
                    f"{report['skipped_too_long']} skipped as longer than {budget} tokens")
    return RunInputs(tokenizer, prompts, report["rows"] if report else None, rollout_file)


def load_rollout_file(run) -> JsonlRolloutSource:
    """--rollout-data, every row checked against the vocabulary and the sequence length."""
    distill, d = run.distill, run.data
    needs = ("--vopd-rollout-correction" if distill.vopd_rollout_correction
             else "--vopd-ppo-clip" if distill.vopd_ppo_clip is not None else None)
    source = JsonlRolloutSource(d.rollout_data, vocab_size=run.model.vocab_size,
                                seq_length=run.model.seq_length, needs_logprobs=needs)
    n, gbs = len(source.rollouts), run.train.global_batch_size
    rank0_print(f"[vopd] {n} rollouts from {d.rollout_data}"
                + (f"; {source.truncated} longer than --seq-length + 1, their completions cut" if source.truncated
                   else "")
                + (f"; warning: fewer than --global-batch-size {gbs}, rows repeat within a step" if n < gbs else ""))
    if source.misnamed_logprobs:
        rank0_print(f"[vopd] warning: {d.rollout_data}: field(s) {', '.join(sorted(source.misnamed_logprobs))} "
                    "not read; the sampler's per-token log-probs are read from 'logprobs'")
    return source
