"""Which implementation of the per-shard passes runs: PyTorch or Triton.

`LossConfig.backend` is "auto" (Triton for CUDA tensors when Triton imports,
PyTorch otherwise), "torch" or "triton". Both backends share the all-gather,
the online-softmax combine and every per-token formula (stats.py,
vocab_parallel.py); only the passes over `[N, V/tp]` differ. This module
never imports Triton itself, so choosing the PyTorch path costs nothing.

"triton" on CPU tensors runs Triton's interpreter, which must be switched on
with `TRITON_INTERPRET=1` before the kernels are first imported (the CI tests
do this in spawned processes); without it the launch would fail deep inside
Triton, so it is refused here with the reason.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .config import BACKENDS
#: Input dtypes the kernels accept (statistics are fp32; fp64 stays on PyTorch).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The kernels' launch shapes on a GPU, (BLOCK_N, BLOCK_V, num_warps) per kernel
#: family: "stats" for the row-reduction pass, "grad" for the element-wise
#: gradient kernels (triton_kernels.py). Not tuned on a GPU yet.
DEFAULT_GPU_TILES = {"stats": (1, 4096, 8), "grad": (4, 1024, 8)}
#: Overrides DEFAULT_GPU_TILES for one run, e.g. "stats=1x8192x16,grad=8x512x4"
#: (either family): how a tile-sweep winner is tried end to end without editing code.
TILES_ENV = "VOPD_TRITON_TILES"
#: Who forms the logit tiles of the fused output-layer loss (--vopd-fused-output)
#: on the Triton backend: "torch" -- torch GEMMs (cuBLAS on a GPU) write each
#: tile in fp32 and one Triton kernel per tile folds it (the logits path's
#: kernels); "triton" -- `tl.dot` inside the fused kernels, no tile in memory
#: (fused_output_triton.py). The default is "torch": the H200 run of 2026-11-30
#: measured the `tl.dot` kernels at 2.71x the logits path, which is GEMM-bound on
#: cuBLAS (docs/performance.md).
FUSED_GEMMS = ("torch", "triton")
FUSED_GEMM_ENV = "VOPD_FUSED_GEMM"


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_on() -> bool:
    """Triton's interpreter flag, read the way triton.knobs reads it."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def use_triton(backend: str, logits: torch.Tensor) -> bool:
    """True if the Triton kernels run for these logits; ValueError if "triton"
    was asked for and cannot run."""
    if backend == "torch":
        return False
    if backend == "auto":
        return logits.is_cuda and logits.dtype in TRITON_DTYPES and triton_importable()
    if backend != "triton":
        raise ValueError(f"unknown loss backend {backend!r}; expected one of {BACKENDS}")
    if not triton_importable():
        raise ValueError("loss backend 'triton' needs the triton package (pip install triton)")
    if logits.dtype not in TRITON_DTYPES:
        raise ValueError(f"loss backend 'triton' supports {TRITON_DTYPES}, not {logits.dtype}; use 'torch'")
    if not logits.is_cuda and not interpreter_on():
        raise ValueError(
            f"loss backend 'triton' got {logits.device.type} tensors: the kernels need CUDA, or Triton's "
            "interpreter (TRITON_INTERPRET=1 set before the kernels are imported) for CPU tensors"
        )
    return True


def parse_tiles(text: str | None, defaults: dict = DEFAULT_GPU_TILES) -> dict[str, tuple[int, int, int]]:
    """`defaults` with the families named in `text` ("stats=BNxBVxWARPS,grad=...")
    replaced. Every number must be a power of two (Triton's `tl.arange` and
    warp counts), warps at most 32; ValueError naming VOPD_TRITON_TILES otherwise."""
    tiles = dict(defaults)
    for item in filter(None, (text or "").replace(" ", "").split(",")):
        key, _, value = item.partition("=")
        parts = value.lower().split("x")
        ok = key in tiles and len(parts) == 3 and all(p.isdigit() and int(p) > 0 for p in parts)
        shape = tuple(int(p) for p in parts) if ok else ()
        if not ok or any(n & (n - 1) for n in shape) or shape[2] > 32:
            raise ValueError(
                f"{TILES_ENV}={text!r}: expected {' and/or '.join(tiles)}=BLOCK_NxBLOCK_VxNUM_WARPS, comma-separated, "
                f"powers of two, at most 32 warps (e.g. stats=1x4096x16,grad=4x1024x8); got {item!r}")
        tiles[key] = shape
    return tiles


def env_tiles() -> dict[str, tuple[int, int, int]]:
    """The GPU launch shapes of this process: the defaults, or VOPD_TRITON_TILES."""
    return parse_tiles(os.environ.get(TILES_ENV))


def fused_gemm(value: str | None = None) -> str:
    """`value`, else VOPD_FUSED_GEMM, else "torch"; ValueError naming the variable if unknown."""
    text = os.environ.get(FUSED_GEMM_ENV, "") if value is None else value
    text = text.strip().lower() or FUSED_GEMMS[0]
    if text not in FUSED_GEMMS:
        where = f"{FUSED_GEMM_ENV}={text!r}" if value is None else f"fused output GEMM {text!r}"
        raise ValueError(f"{where}: expected one of {', '.join(FUSED_GEMMS)}")
    return text
