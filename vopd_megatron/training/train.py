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

from ..config import parse_config
from ..config.args import to_flat_dict
from ..config.schema import ConfigError
from ..data import check_compatible, load_prompt_dataset, load_tokenizer
from ..net import free_local_port
from ..progress import Progress
from .data import JsonlRolloutSource, collate, rollout_stats


def init_distributed() -> int:
    """Default process group from torchrun's environment (or a 1-process one)."""
    from ..megatron import cpu_compat

    cpu_compat.enable()  # no-op with CUDA
    if "RANK" not in os.environ:  # plain `python`: a single rank
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_local_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(minutes=30))
    return dist.get_world_size()


def dp_microbatches(rollouts, run, device):
    """This data-parallel rank's share of the global batch, as microbatch tensors."""
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = len(rollouts) // dp
    mine = rollouts[rank * per_rank : (rank + 1) * per_rank]
    mbs = run.train.micro_batch_size
    batches = [collate(mine[i : i + mbs], run.model.seq_length) for i in range(0, per_rank, mbs)]
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def run_tokenizer(run):
    """The student's tokenizer (None without --tokenizer-model), checked against the teacher's."""
    d = run.data
    tokenizer = load_tokenizer(d.tokenizer_model) if d.tokenizer_model else None
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
    rollout_file: JsonlRolloutSource | None  # --rollout-data
    eval_problems: list | None  # --eval-data (only when --eval-interval > 0)


def load_inputs(run, evaluate: bool) -> RunInputs:
    """Tokenizer (checked against the teacher's), prompts or rollout file, eval problems.
    Raises ValueError / FileNotFoundError naming the file and the problem."""
    d = run.data
    tokenizer = run_tokenizer(run)
    prompts = rollout_file = problems = None
    if d.rollout_data:
        rollout_file = JsonlRolloutSource(d.rollout_data, vocab_size=run.model.vocab_size)
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
    return RunInputs(tokenizer, prompts, rollout_file, problems)


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
                                 dp_group=parallel_state.get_data_parallel_group())


def rank0_print(message: str) -> None:
    """Print on global rank 0 (from torchrun's environment: works before the process group exists)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, flush=True)


def dry_run(run, ns, world_size):
    from ..model.dry_run import dry_run_report, format_report

    report = dry_run_report(run, world_size, num_nodes=ns.num_nodes)
    print(format_report(report, gpu_memory_gb=ns.gpu_memory_gb))


def main(argv=None):
    run, ns = parse_config(argv)
    if ns.dry_run:  # no process group, no weights: validate and estimate
        world = ns.world_size or (ns.num_nodes * ns.gpus_per_node if ns.num_nodes
                                  else int(os.environ.get("WORLD_SIZE", 1)))
        run.validate(world)
        return dry_run(run, ns, world)
    if not (run.data.rollout_data or run.data.prompt_data):
        raise SystemExit("error: give --prompt-data (on-policy: the student samples) "
                         "or --rollout-data (rollouts from an external sampler)")
    try:  # bad flags or data: a one-line error before anything is built
        run.validate(int(os.environ.get("WORLD_SIZE", 1))).check_runtime()
        inputs = load_inputs(run, evaluate=bool(run.eval.eval_interval))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None

    from .checkpoint import load_checkpoint, load_model_weights, save_checkpoint
    from .logging import StepLogger
    from .setup import build_models, build_optimizer, initialize_parallel
    from .step import train_step, wire_megatron_hooks

    world = init_distributed()
    initialize_parallel(run)
    models = build_models(run)
    optimizer, scheduler = build_optimizer(run, models.student)
    wire_megatron_hooks(models, run)
    ck = run.checkpoint
    if ck.teacher_load:
        load_model_weights(ck.teacher_load, [models.teacher])
    elif dist.get_rank() == 0:
        print("[vopd] warning: no --teacher-load: the teacher keeps its random initialisation", flush=True)
    state = None
    if ck.load and ck.finetune:  # weights only: a converted or pretrained student
        load_model_weights(ck.load, models.student)
    elif ck.load:
        state = load_checkpoint(ck.load, models.student, optimizer, scheduler)
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
    interval = run.eval.eval_interval
    if evaluator is not None and start == 0:  # the baseline before any update
        logger.log_eval(0, evaluator.evaluate().metrics)
    progress = Progress(run.train.train_iters, "[vopd] train", initial=start)  # rank 0: bar, or a line every 30 s
    for iteration in range(start + 1, run.train.train_iters + 1):
        t0 = time.perf_counter()
        rollouts = source.take(run.train.global_batch_size)  # identical on every rank
        rollout_s = time.perf_counter() - t0
        microbatches = dp_microbatches(rollouts, run, device)
        for _ in range(run.distill.vopd_updates_per_batch):  # >1: PPO-clipped reuse of the batch
            result = train_step(models, optimizer, scheduler, microbatches, run, loss_config)
        result.seconds["rollout"] = rollout_s
        result.metrics.update(rollout_stats(rollouts))
        logger.log(iteration, result)
        progress.update(1, kl=result.metrics.get("kl"), loss=result.metrics.get("loss"))
        last = iteration == run.train.train_iters
        if evaluator is not None and (iteration % interval == 0 or last):
            logger.log_eval(iteration, evaluator.evaluate().metrics)
        if ck.save and ((ck.save_interval and iteration % ck.save_interval == 0) or last):
            save_checkpoint(ck.save, iteration, models.student, optimizer, scheduler,
                            {"iteration": iteration, "consumed_samples": source.consumed})
    progress.close()
    logger.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
