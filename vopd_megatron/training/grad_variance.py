"""Exact estimator variance of each loss mode's student gradient, by repeated sampling.

The per-step diagnostic (`variance/*` in the loss metrics) looks at the
per-token coefficient only. This measures what the claim is about: the
variance of the *full student gradient vector* that one optimizer step sees.
For a fixed batch of prompts, draw R independent sets of on-policy completions
from the student; on every set, compute each mode's finalized gradient (the
same Megatron schedule and loss plugin `vopd-train` uses, no optimizer step, so
the weights never change); then per mode

    mean  = (1/R) sum_r g_r
    total variance = (1/(R-1)) sum_r ||g_r - mean||^2      (trace of the covariance)

All modes see the same R sample sets (paired), so their variances compare
directly; `full_kl` (exact over the vocabulary at each sampled state) shows the
part that comes from which states were visited, a floor for the sampled
modes. Costs R rollouts plus R x modes forward/backward passes: for small
models. TP = 1 and PP = 1 (a rank then holds the whole gradient); any DP.

    python -m vopd_megatron.training.grad_variance --config examples/arithmetic/config.yaml \
        --load runs/arithmetic/student --finetune --teacher-load runs/arithmetic/teacher \
        --prompt-data examples/arithmetic/data/prompts.jsonl --resamples 16 --prompts 32 --out variance.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch
import torch.distributed as dist

from ..errors import entry_point, reading_inputs
from ..loss.config import LOSS_MODES, TOPK_MODES


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


def measure(models, run, prompts: list[list[int]], modes: list[str], resamples: int, top_k: int,
            seed: int = 0, tokenizer=None) -> dict[str, dict]:
    """Per mode: the variance summary of its gradient over `resamples` paired draws,
    sampled exactly as vopd-train samples its rollouts."""
    from ..rollout import RolloutSampler
    from ..rollout.types import Rollout
    from .step import forward_backward
    from .train import dp_microbatches, rollout_sampling_config

    if resamples < 2:
        raise ValueError("--resamples must be >= 2")
    sampler = RolloutSampler(models.student, rollout_sampling_config(run, tokenizer), run.model.vocab_size,
                             tokenizer=tokenizer)
    grads = {m: VarianceAccumulator(torch.float32) for m in modes}
    base = run.distill.loss_config()
    for r in range(resamples):
        completions = sampler.generate(prompts, seed=seed * 100_003 + r)  # same on every rank
        rollouts = [Rollout(p, c.completion_ids) for p, c in zip(prompts, completions)]
        microbatches = dp_microbatches(rollouts, run, next(models.student[0].parameters()).device)
        for mode in modes:
            cfg = dataclasses.replace(base, mode=mode, top_k=top_k if mode in TOPK_MODES else None)
            forward_backward(models, microbatches, run, cfg)
            grads[mode].add(flat_grad(models.student))
    out = {m: acc.summary() for m, acc in grads.items()}
    if "opd" in out:
        for m in out:
            out[m]["ratio_to_opd"] = out[m]["total_variance"] / out["opd"]["total_variance"]
    return out


@entry_point
def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--resamples", type=int, default=16)
    pre.add_argument("--prompts", type=int, default=32, help="prompts in the fixed batch (global batch size)")
    pre.add_argument("--modes", default="opd,vopd,vopd_topk,vopd_opt,full_kl")
    pre.add_argument("--out", default=None, help="write the result as JSON here")
    own, rest = pre.parse_known_args(argv)
    from ..config import parse_config
    from .checkpoint import load_model_weights
    from .setup import build_models, initialize_parallel
    from .step import wire_megatron_hooks
    from .train import init_distributed, load_inputs

    with reading_inputs():  # a bad flag: one error line
        run, _ = parse_config(rest + ["--global-batch-size", str(own.prompts)])
    modes = own.modes.split(",")
    unknown = set(modes) - set(LOSS_MODES)
    if unknown:
        raise SystemExit(f"error: unknown modes {sorted(unknown)}")
    if run.parallel.tensor_model_parallel_size != 1 or run.parallel.pipeline_model_parallel_size != 1:
        raise SystemExit("error: the exact variance measurement supports TP = 1 and PP = 1 (small models)")
    if not run.data.prompt_data:
        raise SystemExit("error: give --prompt-data (the fixed batch is its first --prompts prompts)")
    with reading_inputs():  # bad flags or data: a one-line error before anything is built
        run.validate(int(os.environ.get("WORLD_SIZE", 1)))
        inputs = load_inputs(run, evaluate=False)  # tokenized exactly as vopd-train's prompts
    top_k = run.distill.vopd_top_k  # the k of the top-k modes among --modes (validated with a top-k --vopd-loss)
    if len(inputs.prompts) < own.prompts:  # the fixed batch would silently be smaller
        raise SystemExit(f"error: --prompts {own.prompts}: {run.data.prompt_data} has only {len(inputs.prompts)} "
                         "prompts that fit the sequence")
    init_distributed()
    initialize_parallel(run)
    models = build_models(run)
    wire_megatron_hooks(models, run)
    if run.checkpoint.teacher_load:
        load_model_weights(run.checkpoint.teacher_load, [models.teacher])
    if run.checkpoint.load:
        load_model_weights(run.checkpoint.load, models.student)
    result = measure(models, run, inputs.prompts[: own.prompts], modes, own.resamples,
                     top_k=top_k or 4, seed=run.train.seed, tokenizer=inputs.tokenizer)
    if dist.get_rank() == 0:
        for mode, s in result.items():
            print(f"[variance] {mode:10s} total variance {s['total_variance']:.4e} "
                  f"| ratio to opd {s.get('ratio_to_opd', float('nan')):.3f} "
                  f"| |mean grad|^2 {s['mean_grad_sq_norm']:.4e}", flush=True)
        if own.out:
            with open(own.out, "w") as f:
                json.dump({"resamples": own.resamples, "prompts": own.prompts, "modes": result}, f, indent=1)
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
