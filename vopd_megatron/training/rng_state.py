"""Per-rank RNG state for checkpoints: host generators and Megatron's TP tracker."""
from __future__ import annotations

import random

import numpy as np
import torch


def get_rng_state() -> dict:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {
            # graph-safe (CUDA-graph) trackers hold Generators, the others state tensors
            name: s.get_state() if isinstance(s, torch.Generator) else s.clone()
            for name, s in tracker.get_states().items()
        },
    }


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    graph_safe = (
        tensor_parallel.is_graph_safe_cuda_rng_tracker(tracker)
        if hasattr(tensor_parallel, "is_graph_safe_cuda_rng_tracker") else False
    )
    convert = getattr(tensor_parallel, "convert_cuda_rng_state", None)
    tracker.set_states({
        name: convert(s, to_graphable=graph_safe) if convert is not None else s
        for name, s in state["tracker"].items()
    })


def reseed(seed: int) -> None:
    """Megatron-LM's `_set_random_seed`: a per-PP-stage seed for the host RNGs and the TP tracker."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    host_seed = seed
    if ps.model_parallel_is_initialized():
        host_seed += 100 * ps.get_pipeline_model_parallel_rank()
        model_parallel_cuda_manual_seed(host_seed)  # tracker streams; also seeds the CUDA generator
    random.seed(host_seed)
    np.random.seed(host_seed % 2**32)
    torch.manual_seed(host_seed)
