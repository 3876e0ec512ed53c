"""Write a model's random initialisation as a checkpoint `vopd-train` can load.

For smoke tests and examples that need a fixed teacher (or student) on every
layout: the weights are built once, at whatever layout this runs with, and
dist-checkpointing reshards them on load. Real runs load trained weights
(converted from Hugging Face or trained with Megatron) instead.

    python tools/init_checkpoint.py --config examples/tiny/config.yaml --which teacher --out runs/tiny/teacher

--out must be missing or empty (`--overwrite` replaces its contents): writing
iteration 0 into an existing run would re-point its tracker at these weights.
"""
import argparse
import os
import shutil
import sys

from vopd_megatron.errors import UserError, entry_point, reading_inputs


@entry_point
def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--which", choices=["student", "teacher"], required=True)
    pre.add_argument("--out", required=True, help="checkpoint directory to write")
    pre.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    own, rest = pre.parse_known_args(argv)

    import torch.distributed as dist

    from vopd_megatron.config import parse_config
    from vopd_megatron.training.checkpoint import save_checkpoint
    from vopd_megatron import launch
    from vopd_megatron.megatron import cpu_compat
    from vopd_megatron.runtime.startup import start
    from vopd_megatron.training.setup import build_models

    with reading_inputs():  # before any process group: flags and --out
        run, _ = parse_config(rest)
        run.validate(launch.world_size() or 1)
        if os.path.exists(own.out) and (not os.path.isdir(own.out) or os.listdir(own.out)) and not own.overwrite:
            raise UserError(f"--out {own.out} exists and is not an empty directory; pass --overwrite to replace it")
    if own.overwrite and launch.rank() == 0 and os.path.isdir(own.out):
        shutil.rmtree(own.out)
    cpu_compat.enable()  # without CUDA: megatron-core on CPU with gloo; no-op with CUDA
    ctx = start(run)
    models = build_models(run, ctx)
    chosen = models.student if own.which == "student" else [models.teacher]
    path = save_checkpoint(own.out, 0, chosen, None, None, {"iteration": 0, "consumed_samples": 0})
    if ctx.reports:
        print(f"wrote the {own.which}'s initial weights to {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
