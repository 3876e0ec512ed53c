"""The exact gradient variance of each loss mode (the measurement behind `grad_variance`).

For a fixed batch of prompts: R independent sets of on-policy completions,
each mode's finalized student gradient on every set (paired), and per mode
the trace of the gradient covariance across the sets. See grad_variance.py.
"""
from __future__ import annotations

import dataclasses

import torch

from ..loss.config import TOPK_MODES
from ..rollout.sampler import RolloutSampler
from ..rollout.types import Rollout
from ..runtime.context import ParallelContext
from ..runtime.sharding import shard
from .batch import to_microbatches
from .rollouts import rollout_sampling_config
from .step import forward_backward


def flat_grad(student_chunks) -> torch.Tensor:
    """The finalized gradient of every student parameter, concatenated, in the main-grad dtype (fp32). [P]"""
    from megatron.core.utils import unwrap_model

    grads = [p.main_grad.detach().reshape(-1) for c in student_chunks for p in unwrap_model(c).parameters()]
    return torch.cat(grads)


class VarianceAccumulator:
    """Running sums over resamples of one mode's gradient: sum_r g_r and sum_r ||g_r||^2.

    Holds one [P] vector (of `dtype`) instead of all R gradients (a real model's
    P is tens of millions of parameters); the total variance follows from
    sum_r ||g_r - mean||^2 = sum_r ||g_r||^2 - R ||mean||^2, with the norms
    summed in fp64. An fp32 sum of a few fp32 gradients is exact to ~1e-7
    relative, far below what R resamples resolve."""

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype, self.count, self.total, self.sq_norms = dtype, 0, None, 0.0

    def add(self, grad: torch.Tensor) -> None:
        """grad: [P]."""
        if self.total is None:
            self.total = grad.to(self.dtype, copy=True)
        else:
            self.total.add_(grad)
        self.sq_norms += float(torch.linalg.vector_norm(grad, dtype=torch.float64) ** 2)
        self.count += 1

    def summary(self) -> dict[str, float]:
        mean = self.total / self.count  # [P]
        mean_sq = float(torch.linalg.vector_norm(mean, dtype=torch.float64) ** 2)
        total = (self.sq_norms - self.count * mean_sq) / (self.count - 1)
        return {"total_variance": total, "mean_grad_sq_norm": mean_sq,
                "per_resample_sq_norm": self.sq_norms / self.count}


def variance_summary(grads: torch.Tensor) -> dict[str, float]:
    """grads: [R, P] gradient vectors of one mode over R resamples."""
    acc = VarianceAccumulator()
    for g in grads:
        acc.add(g)
    return acc.summary()


def measure(models, run, ctx: ParallelContext, prompts: list[list[int]], modes: list[str], resamples: int,
            top_k: int, seed: int = 0, tokenizer=None) -> dict[str, dict]:
    """Per mode: the variance summary of its gradient over `resamples` paired draws,
    sampled exactly as vopd-train samples its rollouts."""
    if resamples < 2:
        raise ValueError("--resamples must be >= 2")
    sampler = RolloutSampler(models.student, rollout_sampling_config(run, tokenizer), run.model.vocab_size,
                             tokenizer=tokenizer)
    grads = {m: VarianceAccumulator(torch.float32) for m in modes}
    base = run.distill.loss_config()
    for r in range(resamples):
        completions = sampler.generate(prompts, seed=seed * 100_003 + r)  # same on every rank
        rollouts = [Rollout(p, c.completion_ids) for p, c in zip(prompts, completions)]
        mine = shard(rollouts, ctx.dp_size, ctx.dp_rank)
        microbatches = to_microbatches(mine, run.train.micro_batch_size, run.model.seq_length, ctx.device)
        for mode in modes:
            cfg = dataclasses.replace(base, mode=mode, top_k=top_k if mode in TOPK_MODES else None)
            forward_backward(models, microbatches, run, cfg)
            grads[mode].add(flat_grad(models.student))
    out = {m: acc.summary() for m, acc in grads.items()}
    if "opd" in out:
        for m in out:
            out[m]["ratio_to_opd"] = out[m]["total_variance"] / out["opd"]["total_variance"]
    return out
