"""Write a model's random initialisation as a checkpoint `vopd-train` can load.

For smoke tests and examples that need a fixed teacher (or student) on every
layout: the weights are built once, at whatever layout this runs with, and
dist-checkpointing reshards them on load. Real runs load trained weights
(converted from Hugging Face or trained with Megatron) instead.

    python tools/init_checkpoint.py --config examples/tiny/config.yaml --which teacher --out runs/tiny/teacher
"""
import argparse
import sys


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--which", choices=["student", "teacher"], required=True)
    pre.add_argument("--out", required=True, help="checkpoint directory to write")
    own, rest = pre.parse_known_args(argv)

    import torch.distributed as dist

    from vopd_megatron.config import parse_config
    from vopd_megatron.training.checkpoint import save_checkpoint
    from vopd_megatron.training.setup import build_models, initialize_parallel
    from vopd_megatron.training.train import init_distributed

    from vopd_megatron.config import ConfigError

    try:
        run, _ = parse_config(rest)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    world = init_distributed(run.parallel.distributed_timeout_minutes)
    run.validate(world)
    initialize_parallel(run)
    models = build_models(run)
    chosen = models.student if own.which == "student" else [models.teacher]
    path = save_checkpoint(own.out, 0, chosen, None, None, {"iteration": 0, "consumed_samples": 0})
    if dist.get_rank() == 0:
        print(f"wrote the {own.which}'s initial weights to {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
