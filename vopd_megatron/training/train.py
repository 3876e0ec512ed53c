"""`vopd-train`: on-policy distillation of a Megatron student from a co-located teacher.

Reads like the algorithm: set up (process groups, student + teacher on the
same TP/PP grid, optimizer, checkpoint), then for each iteration take this
rank's share of the global batch of rollouts, run one distillation step, log,
evaluate and save. Works under `torchrun` (any TP x PP x DP) or as a plain
single process.

    vopd-train --config examples/tiny/config.yaml                  # 1 process, CPU
    torchrun --nproc-per-node 2 -m vopd_megatron.training.train --config ... --tensor-model-parallel-size 2
    vopd-train --config examples/llama3_70b/config.yaml --dry-run  # check a layout, no GPU
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..config.args import parse_run, to_flat_dict
from ..config.schema import ConfigError
from ..errors import entry_point, reading_inputs
from ..launch import rank0_print
from ..model.runtime_checks import check_runtime
from ..progress import Progress
from .checkpoint_preflight import preflight_train
from .faults import at_iteration, check_step
from .inputs import load_inputs
from .plan import print_dry_run


def should_exit(run, iteration: int, started: float, device=None) -> str | None:
    """Megatron-LM's --exit-interval / --exit-duration-in-mins: why to save and stop now, or None.
    The duration is agreed on by every rank (the slowest clock decides), as Megatron-LM does."""
    t = run.train
    if t.exit_interval and iteration % t.exit_interval == 0:
        return f"--exit-interval {t.exit_interval}"
    if t.exit_duration_in_mins:
        late = torch.tensor([float((time.time() - started) / 60 > t.exit_duration_in_mins)], device=device)
        dist.all_reduce(late, op=dist.ReduceOp.MAX)
        if late.item():
            return f"--exit-duration-in-mins {t.exit_duration_in_mins}"
    return None


@entry_point
def main(argv=None):
    started = time.time()
    with reading_inputs():  # bad flags or data: a one-line error before anything is built
        parsed = parse_run(argv, tool="train")
        run, ns = parsed.run, parsed.namespace
        if ns.dry_run:  # no process group, no weights: validate and estimate
            run.validate(ns.world_size)
            return print_dry_run(run, ns)
        if not (run.data.rollout_data or run.data.prompt_data):
            raise ConfigError("give --prompt-data (on-policy: the student samples) "
                              "or --rollout-data (rollouts from an external sampler)")
        check_runtime(run.validate(ns.world_size))
        inputs = load_inputs(run)
        problems = None
        if run.eval.eval_every:
            from ..eval.runner import load_run_problems

            problems = load_run_problems(run, inputs.tokenizer, log=rank0_print)
        preflight_train(run)  # --load, --teacher-load, --save: before any process group

    from ..megatron import cpu_compat
    from ..rollout.types import rollout_totals
    from ..runtime.startup import shutdown, start
    from .batch import to_microbatches
    from .checkpoint import load_checkpoint, load_model_weights, save_checkpoint
    from .logging import StepLogger
    from .megatron_format import megatron_namespace
    from .rollouts import rollout_source
    from .setup import build_models, build_optimizer
    from .step import train_step, wire_megatron_hooks

    cpu_compat.enable()  # without CUDA: megatron-core on CPU with gloo (MEGATRON_ON_CPU.md); no-op with CUDA
    ctx = start(run)
    models = build_models(run, ctx)
    optimizer, scheduler = build_optimizer(run, models.student)
    wire_megatron_hooks(models)
    ck = run.checkpoint
    if ck.teacher_load:
        load_model_weights(ck.teacher_load, [models.teacher], fallback=ck.checkpoint_fallback)
    elif ctx.reports:
        print("[vopd] warning: no --teacher-load: the teacher keeps its random initialisation", flush=True)
    state = None
    if ck.load and ck.finetune:  # weights only: a converted or pretrained student
        load_model_weights(ck.load, models.student, fallback=ck.checkpoint_fallback)
    elif ck.load:  # ours or Megatron-LM's; None: --load is --save and holds nothing yet
        state = load_checkpoint(ck.load, models.student, optimizer, scheduler, fallback=ck.checkpoint_fallback)
    ckpt_args = megatron_namespace(models.student, run) if ck.save else None  # Megatron-LM reads it back
    start_iteration = state["iteration"] if state else 0
    source = rollout_source(run, models, inputs)
    source.seek(state["consumed_samples"] if state else 0)
    logger = StepLogger(run.logging.tensorboard_dir, run.logging.log_interval, to_flat_dict(run), ctx)
    evaluator = None
    if problems is not None:
        from ..eval.runner import build_evaluator

        evaluator = build_evaluator(run, models, inputs.tokenizer, problems, ctx)
    if ctx.reports:
        print(f"[vopd] world {ctx.world_size}: TP {ctx.tp_size} x PP {ctx.pp_size} x DP {ctx.dp_size}, "
              f"{run.num_microbatches(ctx.world_size)} microbatches/step, loss {run.distill.vopd_loss}, "
              f"iterations {start_iteration + 1}..{run.train.train_iters}", flush=True)

    loss_config = run.distill.loss_config()
    interval = run.eval.eval_every
    if evaluator is not None and start_iteration == 0:  # the baseline before any update
        logger.log_eval(0, evaluator.evaluate().metrics)
    progress = Progress(run.train.train_iters, "[vopd] train", initial=start_iteration)  # rank 0: bar, or lines
    for iteration in range(start_iteration + 1, run.train.train_iters + 1):
        t0 = time.perf_counter()
        rollouts = source.take(run.train.global_batch_size, ctx.dp_size, ctx.dp_rank)  # this DP rank's share
        rollout_s = time.perf_counter() - t0
        microbatches = to_microbatches(rollouts, run.train.micro_batch_size, run.model.seq_length, ctx.device)
        with at_iteration(iteration):  # a non-finite loss or gradient stops the run before any save
            for _ in range(run.distill.vopd_updates_per_batch):  # >1: PPO-clipped reuse of the batch
                result = train_step(models, optimizer, scheduler, microbatches, run, loss_config, ctx,
                                    extra_totals=rollout_totals(rollouts))
                check_step(result, rollouts, grad_norm_known=run.train.clip_grad > 0, dp_group=ctx.dp_group)
        result.seconds["rollout"] = rollout_s
        logger.log(iteration, result)
        progress.update(1, kl=result.metrics.get("kl"), loss=result.metrics.get("loss"))
        stop = should_exit(run, iteration, started, ctx.device)
        last = iteration == run.train.train_iters or stop is not None
        if evaluator is not None and (iteration % interval == 0 or last):
            logger.log_eval(iteration, evaluator.evaluate().metrics)
        if ck.save and ((ck.save_interval and iteration % ck.save_interval == 0) or last):
            save_checkpoint(ck.save, iteration, models.student, optimizer, scheduler,
                            {"iteration": iteration, "consumed_samples": source.consumed,
                             "vopd_loss": run.distill.vopd_loss}, args=ckpt_args)
        if stop is not None:
            progress.close()
            rank0_print(f"[vopd] stopping after iteration {iteration} ({stop})")
            break
    progress.close()
    logger.close()
    shutdown()


if __name__ == "__main__":
    main()
