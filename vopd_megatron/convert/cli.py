"""`vopd-convert`: Hugging Face <-> Megatron checkpoints, and depth pruning of Megatron checkpoints.

    vopd-convert hf-to-megatron --hf-dir DIR --out CKPT [--dtype bf16] [--make-vocab-size-divisible-by 128]
                                [--tensor-model-parallel-size 8 --pipeline-model-parallel-size 4]
    vopd-convert megatron-to-hf --load CKPT --out DIR [--config model.yaml] [--model-type llama]
                                [--max-shard-size-gb 5]
    vopd-convert prune --load CKPT --out PRUNED (--drop-layers 1-29:2 | --keep-layers 0-9,20-29)
                       [--config model.yaml]

The TP/PP sizes given to hf-to-megatron are only checked (heads, query groups,
layers, FFN must divide); the checkpoint itself loads at any layout.

`--out` must be missing or empty: a conversion writes a new directory, built
aside and moved in place when complete; `--overwrite` replaces a non-empty
one (only once the new one is complete). A problem with the input or the
output is one `error: ...` line naming the file, and exit status 1.
"""
from __future__ import annotations

import argparse
import sys

import yaml

from ..errors import entry_point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vopd-convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    h2m = sub.add_parser("hf-to-megatron", help="HF directory -> torch_dist checkpoint + model_flags.yaml")
    h2m.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    h2m.add_argument("--out", required=True, help="checkpoint directory to write (use as --load / --teacher-load)")
    h2m.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                     help="cast the weights (default: keep the HF dtype)")
    h2m.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    h2m.add_argument("--tensor-model-parallel-size", type=int, default=1, help="layout to check the model against")
    h2m.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="layout to check the model against")
    h2m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (default: refuse)")
    m2h = sub.add_parser("megatron-to-hf", help="torch_dist checkpoint -> HF config.json + safetensors")
    m2h.add_argument("--load", required=True, help="checkpoint directory (newest complete iteration is read)")
    m2h.add_argument("--out", required=True, help="HF directory to write")
    m2h.add_argument("--config", default=None,
                     help="model flags YAML (Megatron-LM names); needed only for checkpoints not converted from HF")
    m2h.add_argument("--model-type", choices=["llama", "mistral", "qwen2", "qwen3"], default=None)
    m2h.add_argument("--max-shard-size-gb", type=float, default=5.0)
    m2h.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (default: refuse)")
    prune = sub.add_parser("prune", help="drop transformer layers of a torch_dist checkpoint (depth pruning)")
    prune.add_argument("--load", required=True, help="checkpoint directory (newest complete iteration is read)")
    prune.add_argument("--out", required=True, help="checkpoint directory to write (weights only, iteration 0)")
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--drop-layers", help="0-based layers to remove: 3,7 or ranges 20-25, 1-29:2 (every other)")
    which.add_argument("--keep-layers", help="0-based layers to keep (same syntax); the rest are removed")
    prune.add_argument("--config", default=None,
                       help="model flags YAML of the source, for a checkpoint not converted from HF: the output's "
                            "model_flags.yaml is then complete (otherwise it sets only --num-layers)")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (default: refuse)")
    prune.add_argument("--skip-check", action="store_true",
                       help="do not read the output back to compare it with the source")
    return parser


@entry_point
def main(argv=None) -> int:
    from .hf_config import ConversionError

    args = build_parser().parse_args(argv)
    if args.direction == "hf-to-megatron":
        from .hf_to_megatron import FLAGS_FILE, convert_hf_to_megatron

        flags = convert_hf_to_megatron(
            args.hf_dir, args.out, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            dtype=args.dtype, check_tp=args.tensor_model_parallel_size,
            check_pp=args.pipeline_model_parallel_size, overwrite=args.overwrite, show_progress=True,
        )
        print(f"wrote {args.out} (torch_dist); model flags ({args.out}/{FLAGS_FILE}):")
        print(yaml.safe_dump(flags, sort_keys=False), end="")
    elif args.direction == "prune":
        from .prune import FLAGS_FILE, prune_checkpoint

        model_args = None
        if args.config:
            from ..config import parse_config

            model_args = parse_config(["--config", args.config])[0].model
        info = prune_checkpoint(args.load, args.out, drop=args.drop_layers, keep=args.keep_layers,
                                model_args=model_args, check=not args.skip_check, overwrite=args.overwrite,
                                show_progress=True)
        print(f"wrote {args.out}: layers {info['kept']} of {info['num_layers']} kept, renumbered "
              f"0..{len(info['kept']) - 1}" + (f"; checked {info['checked']} items bit for bit against the "
                                              "source" if info["checked"] else ""))
        print(f"model flags ({args.out}/{FLAGS_FILE}):")
        print(yaml.safe_dump(info["flags"], sort_keys=False), end="")
    else:
        from .megatron_to_hf import convert_megatron_to_hf

        if not args.max_shard_size_gb > 0:
            raise ConversionError(f"--max-shard-size-gb {args.max_shard_size_gb} must be > 0")
        model_args = None
        if args.config:
            from ..config import parse_config

            model_args = parse_config(["--config", args.config])[0].model
        files = convert_megatron_to_hf(args.load, args.out, model_args=model_args, model_type=args.model_type,
                                       max_shard_bytes=int(args.max_shard_size_gb * 2**30),
                                       overwrite=args.overwrite, show_progress=True)
        print(f"wrote {args.out}: config.json + {len(files)} safetensors file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
