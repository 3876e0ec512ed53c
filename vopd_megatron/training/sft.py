"""`vopd-sft`: supervised fine-tuning of a Megatron GPT on prompt/completion text.

What it is for: producing a teacher (and a warmed-up student) that `vopd-train`
loads directly, `--teacher-load DIR` and `--load DIR --finetune`, with the same
model builder, the same checkpoint writer and the same flags. It is
deliberately small: Megatron's pipeline schedule over microbatches, Megatron's
vocab-parallel cross entropy on the completion tokens (the prompt is context
only), Megatron's optimizer and LR schedule, a checkpoint at the end.

Data: JSONL rows `{"prompt": text, "completion": text}`, tokenized with
`--tokenizer-model`; the EOS id (`--eos-id`, else the tokenizer's) is appended
to every completion so the model learns to stop. Rows are visited in a seeded
per-epoch shuffle; each iteration takes `--global-batch-size` of them, split
over data-parallel ranks like `vopd-train`.

`--load DIR` starts from a checkpoint's weights (a fresh optimizer and LR
schedule): a recipe in stages. `--lr-decay-iters` longer than `--train-iters`
stops partway along a longer schedule.

The model is built as vopd-train builds its student (`--bf16`: bf16
parameters with fp32 main weights in the optimizer, as Megatron-LM trains);
the loss and its normalisation are in sft_step.py.

    vopd-sft --config examples/arithmetic/config.yaml --which teacher --sft-data data/sft.jsonl \\
             --train-iters 400 --save runs/teacher --save-interval 400
    torchrun --nproc-per-node 2 -m vopd_megatron.training.sft ... --tensor-model-parallel-size 2
"""
from __future__ import annotations

import dataclasses
import sys
import time
from types import SimpleNamespace

from .. import launch
from ..errors import UserError, entry_point, reading_inputs
from ..progress import Progress, echo
from .checkpoint_preflight import preflight_weights
from .faults import at_iteration, check_step
from .inputs import run_eos_id, run_tokenizer
from .sft_data import ShuffledRows, load_sft_rows


def _parse(argv):
    """(vopd-sft's own flags, RunConfig); the model, training and checkpoint flags are vopd-train's."""
    from ..config.args import parse_run
    from ..config.megatron_args import FrontEndParser
    from ..config.schema import ConfigError

    argv = sys.argv[1:] if argv is None else list(argv)
    pre = FrontEndParser(prog="vopd-sft", add_help=False, allow_abbrev=False)
    pre.add_argument("--sft-data", required=True, help="JSONL of {\"prompt\": text, \"completion\": text}")
    pre.add_argument("--which", choices=["student", "teacher"], default="student",
                     help="train the model the flags describe (student) or the one "
                          "--teacher-model-config describes (teacher)")

    if "-h" in argv or "--help" in argv:  # vopd-sft's own flags, then the shared model/training flags
        pre.print_help()
        print("\nModel, parallelism, training, checkpoint and logging flags are vopd-train's:\n")
        parse_run(["--help"], tool="sft")
    try:
        own, rest = pre.parse_known_args(argv)
        run = parse_run(rest, tool="sft").run
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    if own.which == "teacher":
        run = dataclasses.replace(run, model=run.teacher)
    return own, run


@entry_point
def main(argv=None):
    own, run = _parse(argv)
    with reading_inputs():  # bad flags or data: a one-line error before anything is built
        if not run.data.tokenizer_model:
            raise UserError("vopd-sft needs --tokenizer-model (the text is tokenized here)")
        run.validate(launch.world_size() or 1)
        tokenizer = run_tokenizer(run)
        eos = run_eos_id(run, tokenizer)
        rows = ShuffledRows(load_sft_rows(own.sft_data, tokenizer, eos, run.model.seq_length,
                                          run.data.apply_chat_template), run.train.seed)
        preflight_weights(run)  # --load: before any process group

    from ..megatron import cpu_compat
    from ..runtime.pipeline import wire_grad_hooks
    from ..runtime.sharding import shard
    from ..runtime.startup import shutdown, start
    from .batch import to_microbatches
    from .checkpoint import load_model_weights, save_checkpoint
    from .setup import build_models, build_optimizer, scheduler_increment
    from .sft_step import mean_loss, sft_forward_backward

    cpu_compat.enable()  # without CUDA: megatron-core on CPU with gloo (MEGATRON_ON_CPU.md); no-op with CUDA
    ctx = start(run)
    models = build_models(run, ctx, with_teacher=False)  # the student alone, DDP (and bf16) wrapped
    wire_grad_hooks(models.student[0].config, models.student)
    optimizer, scheduler = build_optimizer(run, models.student)
    if run.checkpoint.load:  # weights only: continue from an earlier stage with a fresh optimizer
        load_model_weights(run.checkpoint.load, models.student, fallback=run.checkpoint.checkpoint_fallback)
    if ctx.reports:
        print(f"[sft] {len(rows.rows)} rows from {own.sft_data}; {run.train.train_iters} iterations "
              f"of {run.train.global_batch_size}", flush=True)
    t0 = time.perf_counter()
    progress = Progress(run.train.train_iters, "[sft]")  # rank 0: a live bar, or a line every 30 s in a log
    for it in range(1, run.train.train_iters + 1):
        batch = rows.take(run.train.global_batch_size)  # the same on every rank
        mine = shard(batch, ctx.dp_size, ctx.dp_rank)
        microbatches = to_microbatches(mine, run.train.micro_batch_size, run.model.seq_length, ctx.device)
        optimizer.zero_grad()
        losses = sft_forward_backward(models, microbatches, run)
        ok, grad_norm, _ = optimizer.step()
        with at_iteration(it):  # a non-finite gradient stops the run before any save
            check_step(SimpleNamespace(metrics=None, skipped=not ok, grad_norm=float(grad_norm or 0.0)), batch,
                       grad_norm_known=grad_norm is not None and run.train.clip_grad > 0)
        scheduler.step(increment=scheduler_increment(run))  # Megatron-LM counts samples
        loss = mean_loss(losses, ctx) if ctx.last_stage else None  # a DP collective on the last stage
        progress.update(1, loss=loss)
        if loss is not None and (it % run.logging.log_interval == 0 or it == run.train.train_iters):
            norm = float("nan") if grad_norm is None else float(grad_norm)  # None: --clip-grad 0
            if ctx.dp_rank == 0 and ctx.tp_rank == 0:
                echo(f"[sft] iter {it:5d} | loss {loss:.4f} | grad norm {norm:.3f} "
                     f"| lr {optimizer.param_groups[0]['lr']:.2e} | {time.perf_counter() - t0:.0f} s")
        ck = run.checkpoint
        if ck.save and (it == run.train.train_iters or (ck.save_interval and it % ck.save_interval == 0)):
            # Weights only (no optimizer): what --teacher-load and --load --finetune read.
            path = save_checkpoint(ck.save, it, models.student, None, None,
                                   {"iteration": it, "consumed_samples": rows.consumed})
            if ctx.reports:
                echo(f"[sft] saved {path}")
    progress.close()
    shutdown()


if __name__ == "__main__":
    main()
