"""`vopd-train --dry-run`: validate the flags and print the layout plan; nothing is built."""
from __future__ import annotations


def print_dry_run(run, ns) -> None:
    """The memory and layout estimate of model/dry_run.py, and what the real run still needs."""
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
