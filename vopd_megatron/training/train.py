"""`vopd-train`: on-policy distillation of a Megatron student from a co-located teacher.

Reads like the algorithm: set up (process groups, student + teacher on the
same TP/PP grid, optimizer, checkpoint), then for each iteration take the
global batch of rollouts, run one distillation step, log, and save. Works
under `torchrun` (any TP x PP x DP) or as a plain single process.

    vopd-train --config examples/tiny/config.yaml                  # 1 process, CPU
    torchrun --nproc-per-node 2 -m vopd_megatron.training.train --config ... --tensor-model-parallel-size 2
    vopd-train --config examples/llama3_70b/config.yaml --dry-run  # check a layout, no GPU
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config.args import parse_run, to_flat_dict
from ..config.schema import ConfigError
from ..data import check_compatible, check_vocab_fits, load_prompt_dataset, load_tokenizer
from ..errors import entry_point, reading_inputs
from ..model.runtime_checks import check_runtime
from ..net import free_local_port
from .checkpoint_preflight import preflight_train
from ..progress import Progress
from .data import JsonlRolloutSource, collate, rollout_stats
from .faults import at_iteration, check_step


def init_distributed(timeout_minutes: int = 10) -> int:
    """Default process group from torchrun's environment (or a 1-process one);
    timeout_minutes: --distributed-timeout-minutes (Megatron-LM's default 10)."""
    from ..megatron import cpu_compat

    cpu_compat.enable()  # no-op with CUDA
    if "RANK" not in os.environ:  # plain `python`: a single rank
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_local_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return dist.get_world_size()


def dp_microbatches(rollouts, run, device):
    """This data-parallel rank's share of the global batch, as microbatch tensors."""
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = len(rollouts) // dp
    mine = rollouts[rank * per_rank : (rank + 1) * per_rank]
    mbs = run.train.micro_batch_size
    out = []
    for i in range(0, per_rank, mbs):
        batch = {k: v.to(device) for k, v in collate(mine[i : i + mbs], run.model.seq_length).items()}
        batch["sources"] = [r.source for r in mine[i : i + mbs]]  # for messages naming data rows
        out.append(batch)
    return out


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


@dataclass
class RunInputs:
    """Everything a run reads from files before any process group or model exists,
    so that bad data fails in seconds with a message, not after the build."""

    tokenizer: object | None
    prompts: list[list[int]] | None  # --prompt-data, tokenized
    prompt_rows: list[str] | None  # where each prompt is in --prompt-data (for messages)
    rollout_file: JsonlRolloutSource | None  # --rollout-data
    eval_problems: list | None  # --eval-data (only when --eval-every > 0)


def load_inputs(run, evaluate: bool) -> RunInputs:
    """Tokenizer (checked against the teacher's), prompts or rollout file, eval problems.
    Raises ValueError / FileNotFoundError naming the file and the problem."""
    d = run.data
    tokenizer = run_tokenizer(run)
    prompts = rollout_file = problems = report = None
    if d.rollout_data:
        rollout_file = load_rollout_file(run)
    elif d.prompt_data:
        budget = run.model.seq_length + 1 - d.rollout_max_new_tokens
        prompts, report = load_prompt_dataset(d.prompt_data, tokenizer, budget, prompt_field=d.prompt_field,
                                              use_chat_template=d.apply_chat_template,
                                              vocab_size=run.model.vocab_size)
        rank0_print(f"[vopd] {report['kept']}/{report['total']} prompts from {d.prompt_data}; "
                    f"{report['skipped_too_long']} skipped as longer than {budget} tokens")
    if evaluate:
        from ..eval import load_run_problems

        problems = load_run_problems(run, tokenizer, log=rank0_print)
    return RunInputs(tokenizer, prompts, report["rows"] if report else None, rollout_file, problems)


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
    return source


def run_eos_id(run, tokenizer) -> int | None:
    """--eos-id, else the tokenizer's EOS (None: neither is known)."""
    if run.data.eos_id is not None:
        return run.data.eos_id
    return tokenizer.eos_id if tokenizer is not None else None


def rollout_sampling_config(run, tokenizer):
    """How training rollouts are sampled: at the loss temperature, with the
    --rollout-* limits and filters, EOS and stop strings."""
    from ..rollout import SamplingConfig

    d = run.data
    return SamplingConfig(
        max_new_tokens=d.rollout_max_new_tokens, temperature=run.distill.vopd_temperature,
        top_k=d.rollout_top_k, top_p=d.rollout_top_p, eos_id=run_eos_id(run, tokenizer),
        max_batch_size=d.rollout_batch_size, stop_strings=run.data_stop_strings(),
    )


def rollout_source(run, models, inputs: RunInputs):
    """On-policy sampling from the student (--prompt-data) or a rollout file (--rollout-data)."""
    if inputs.rollout_file is not None:
        return inputs.rollout_file
    from megatron.core import parallel_state

    from ..rollout import OnPolicyRolloutSource, RolloutSampler

    tokenizer = inputs.tokenizer
    sampler = RolloutSampler(models.student, rollout_sampling_config(run, tokenizer), run.model.vocab_size,
                             loss_mode=run.distill.vopd_loss, tokenizer=tokenizer)
    return OnPolicyRolloutSource(sampler, inputs.prompts, seed=run.train.seed,
                                 dp_group=parallel_state.get_data_parallel_group(), sources=inputs.prompt_rows)


def rank0_print(message: str) -> None:
    """Print on global rank 0 (from torchrun's environment: works before the process group exists)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, flush=True)


def dry_run(run, ns) -> None:
    from ..model.dry_run import dry_run_report, format_report

    report = dry_run_report(run, ns.world_size, num_nodes=ns.num_nodes)
    print(format_report(report, gpu_memory_gb=ns.gpu_memory_gb))
    missing = [flag for flag, given in (("--lr", run.train.lr is not None),
                                        ("--train-iters (or --train-samples)", bool(run.train.train_iters)),
                                        ("--prompt-data or --rollout-data", run.data.prompt_data or run.data.rollout_data))
               if not given]
    if missing:
        print(f"note: the run itself also needs {', '.join(missing)}")
    if run.parallel.tensor_model_parallel_size > 1:
        print("note: Megatron-LM requires CUDA_DEVICE_MAX_CONNECTIONS=1 in the environment at TP > 1 before Blackwell")


def should_exit(run, iteration: int, started: float) -> str | None:
    """Megatron-LM's --exit-interval / --exit-duration-in-mins: why to save and stop now, or None.
    The duration is agreed on by every rank (the slowest clock decides), as Megatron-LM does."""
    t = run.train
    if t.exit_interval and iteration % t.exit_interval == 0:
        return f"--exit-interval {t.exit_interval}"
    if t.exit_duration_in_mins:
        late = torch.tensor([float((time.time() - started) / 60 > t.exit_duration_in_mins)])
        if torch.cuda.is_available():
            late = late.cuda()
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
            return dry_run(run, ns)
        if not (run.data.rollout_data or run.data.prompt_data):
            raise ConfigError("give --prompt-data (on-policy: the student samples) "
                              "or --rollout-data (rollouts from an external sampler)")
        check_runtime(run.validate(ns.world_size))
        inputs = load_inputs(run, evaluate=bool(run.eval.eval_every))
        preflight_train(run)  # --load, --teacher-load, --save: before any process group

    from .checkpoint import load_checkpoint, load_model_weights, save_checkpoint
    from .megatron_format import megatron_namespace
    from .logging import StepLogger
    from .setup import build_models, build_optimizer, initialize_parallel
    from .step import train_step, wire_megatron_hooks

    world = init_distributed(run.parallel.distributed_timeout_minutes)
    initialize_parallel(run)
    models = build_models(run)
    optimizer, scheduler = build_optimizer(run, models.student)
    wire_megatron_hooks(models, run)
    ck = run.checkpoint
    if ck.teacher_load:
        load_model_weights(ck.teacher_load, [models.teacher], fallback=ck.checkpoint_fallback)
    elif dist.get_rank() == 0:
        print("[vopd] warning: no --teacher-load: the teacher keeps its random initialisation", flush=True)
    state = None
    if ck.load and ck.finetune:  # weights only: a converted or pretrained student
        load_model_weights(ck.load, models.student, fallback=ck.checkpoint_fallback)
    elif ck.load:  # ours or Megatron-LM's; None: --load is --save and holds nothing yet
        state = load_checkpoint(ck.load, models.student, optimizer, scheduler, fallback=ck.checkpoint_fallback)
    ckpt_args = megatron_namespace(models.student, run) if ck.save else None  # Megatron-LM reads it back
    start = state["iteration"] if state else 0
    source = rollout_source(run, models, inputs)
    source.seek(state["consumed_samples"] if state else 0)
    logger = StepLogger(run.logging.tensorboard_dir, run.logging.log_interval, to_flat_dict(run))
    evaluator = None
    if inputs.eval_problems is not None:
        from ..eval import build_evaluator

        evaluator = build_evaluator(run, models, inputs.tokenizer, inputs.eval_problems)
    if dist.get_rank() == 0:
        print(f"[vopd] world {world}: TP {run.parallel.tensor_model_parallel_size} x "
              f"PP {run.parallel.pipeline_model_parallel_size} x DP {run.data_parallel_size(world)}, "
              f"{run.num_microbatches(world)} microbatches/step, loss {run.distill.vopd_loss}, "
              f"iterations {start + 1}..{run.train.train_iters}", flush=True)

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    loss_config = run.distill.loss_config()
    interval = run.eval.eval_every
    if evaluator is not None and start == 0:  # the baseline before any update
        logger.log_eval(0, evaluator.evaluate().metrics)
    progress = Progress(run.train.train_iters, "[vopd] train", initial=start)  # rank 0: bar, or a line every 30 s
    for iteration in range(start + 1, run.train.train_iters + 1):
        t0 = time.perf_counter()
        rollouts = source.take(run.train.global_batch_size)  # identical on every rank
        rollout_s = time.perf_counter() - t0
        microbatches = dp_microbatches(rollouts, run, device)
        with at_iteration(iteration):  # a non-finite loss or gradient stops the run before any save
            for _ in range(run.distill.vopd_updates_per_batch):  # >1: PPO-clipped reuse of the batch
                result = train_step(models, optimizer, scheduler, microbatches, run, loss_config)
                check_step(result, rollouts, grad_norm_known=run.train.clip_grad > 0)
        result.seconds["rollout"] = rollout_s
        result.metrics.update(rollout_stats(rollouts))
        logger.log(iteration, result)
        progress.update(1, kl=result.metrics.get("kl"), loss=result.metrics.get("loss"))
        stop = should_exit(run, iteration, started)
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
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
