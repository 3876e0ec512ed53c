"""`vopd-eval`: evaluate a student checkpoint on problems with reference answers.

Takes the same model flags / `--config` as vopd-train and any checkpoint that
vopd-train or vopd-convert writes (`--load DIR`, loaded weights-only at any
TP layout); samples `--eval-samples` completions per problem of `--eval-data`,
grades them with math-verify (needs `--tokenizer-model` to decode), and with
`--teacher-load` also measures the reverse KL to the teacher. Prints a table;
`--eval-output DIR` gets `summary.json` and `problems.jsonl` (one record per
problem: completions, extracted answers, correctness, majority answer).

    vopd-eval --config examples/tiny/config.yaml --load runs/tiny/np1/checkpoints \\
              --eval-data examples/tiny/eval.jsonl --eval-samples 4 --eval-output runs/tiny/eval
    torchrun --nproc-per-node 2 -m vopd_megatron.eval.cli ... --tensor-model-parallel-size 2

The evaluation itself is the one vopd-train runs every --eval-every
iterations (vopd_megatron/eval/runner.py), so both report the same numbers
for the same weights and layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from ..config.args import parse_run, to_flat_dict
from ..config.schema import ConfigError
from ..data.checks import require_writable_dir
from ..errors import entry_point, reading_inputs
from ..model.runtime_checks import check_runtime
from ..progress import Progress


def format_table(metrics: dict[str, float], n: int, k: int) -> str:
    rows = [(name.replace("eval/", "").replace("@k", f"@{n if name != 'eval/pass@k' else k}"), value)
            for name, value in metrics.items()]
    width = max(len(r[0]) for r in rows)
    return "\n".join([f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
                     + [f"{name:<{width}}  {value:.4f}" for name, value in rows])


def write_outputs(out_dir: str, summary: dict, records: list[dict]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (out / "problems.jsonl").open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


@entry_point
def main(argv=None):
    from ..launch import rank0_print
    from ..training.checkpoint_preflight import preflight_weights
    from ..training.inputs import run_tokenizer
    from .runner import build_evaluator, load_run_problems

    with reading_inputs():  # bad flags or data: a one-line error before anything is built
        parsed = parse_run(argv, tool="eval")
        run = parsed.run
        run.data.prompt_data = run.data.rollout_data = None  # vopd-eval samples from --eval-data only
        ck, e = run.checkpoint, run.eval
        if not ck.load:
            raise ConfigError("vopd-eval needs --load DIR (a checkpoint written by vopd-train or vopd-convert)")
        if not e.eval_data:
            raise ConfigError("vopd-eval needs --eval-data FILE.jsonl (records with a problem and an answer)")
        if e.eval_output:  # the results must have somewhere to go after the whole evaluation
            require_writable_dir(e.eval_output, "--eval-output")
        check_runtime(run.validate(parsed.namespace.world_size))
        tokenizer = run_tokenizer(run)
        problems = load_run_problems(run, tokenizer, log=rank0_print)
        preflight_weights(run)  # --load, --teacher-load: before any process group

    from ..megatron import cpu_compat
    from ..runtime.startup import initialize_parallel, start_process_group
    from ..training.checkpoint import load_model_weights
    from ..training.setup import build_models

    cpu_compat.enable()  # without CUDA: megatron-core on CPU with gloo (MEGATRON_ON_CPU.md); no-op with CUDA
    start_process_group(run.parallel.distributed_timeout_minutes)
    try:
        ctx = initialize_parallel(run)
        models = build_models(run, ctx, with_teacher=bool(ck.teacher_load))
        iteration = load_model_weights(ck.load, models.student, fallback=ck.checkpoint_fallback)
        if ck.teacher_load:
            load_model_weights(ck.teacher_load, [models.teacher], fallback=ck.checkpoint_fallback)
        evaluator = build_evaluator(run, models, tokenizer, problems, ctx)
        with Progress(evaluator.local_samples(), "[vopd-eval] sampling", unit="sample") as progress:
            result = evaluator.evaluate(on_samples=progress.update)
        n, k = e.eval_samples, e.eval_pass_k or e.eval_samples
        if ctx.reports:
            print(f"[vopd-eval] {ck.load} (iteration {iteration}), {len(result.records)} problems x {n} samples"
                  + ("" if ck.teacher_load else "; no --teacher-load: no reverse KL"), flush=True)
            print(format_table(result.metrics, n, k), flush=True)
            if e.eval_output:
                summary = {"checkpoint": ck.load, "iteration": iteration, "teacher": ck.teacher_load,
                           "eval_data": e.eval_data, "problems": len(result.records), "samples": n, "pass_k": k,
                           "metrics": result.metrics, "config": to_flat_dict(run)}
                write_outputs(e.eval_output, summary, result.records)
                print(f"[vopd-eval] wrote {e.eval_output}/summary.json and problems.jsonl", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
