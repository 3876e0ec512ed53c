"""Hugging Face <-> Megatron checkpoint conversion; the same as the `vopd-convert` console script.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir Meta-Llama-3.1-8B --out ckpt/llama8b
    python tools/convert_checkpoint.py megatron-to-hf --load ckpt/llama8b --out hf/llama8b

See docs/conversion.md.
"""
import sys

from vopd_megatron.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
