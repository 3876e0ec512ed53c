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
import json

import torch.distributed as dist

from .. import launch
from ..errors import entry_point, reading_inputs
from ..loss.config import LOSS_MODES


@entry_point
def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--resamples", type=int, default=16)
    pre.add_argument("--prompts", type=int, default=32, help="prompts in the fixed batch (global batch size)")
    pre.add_argument("--modes", default="opd,vopd,vopd_topk,vopd_opt,full_kl")
    pre.add_argument("--out", default=None, help="write the result as JSON here")
    own, rest = pre.parse_known_args(argv)
    from ..config import parse_config
    from .inputs import load_inputs

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
        run.validate(launch.world_size() or 1)
        inputs = load_inputs(run)  # tokenized exactly as vopd-train's prompts
    top_k = run.distill.vopd_top_k  # the k of the top-k modes among --modes (validated with a top-k --vopd-loss)
    if len(inputs.prompts) < own.prompts:  # the fixed batch would silently be smaller
        raise SystemExit(f"error: --prompts {own.prompts}: {run.data.prompt_data} has only {len(inputs.prompts)} "
                         "prompts that fit the sequence")
    from ..megatron import cpu_compat
    from ..runtime.startup import start
    from .checkpoint import load_model_weights
    from .setup import build_models
    from .step import wire_megatron_hooks
    from .variance import measure

    cpu_compat.enable()  # without CUDA: megatron-core on CPU with gloo (MEGATRON_ON_CPU.md); no-op with CUDA
    ctx = start(run)
    models = build_models(run, ctx)
    wire_megatron_hooks(models)
    if run.checkpoint.teacher_load:
        load_model_weights(run.checkpoint.teacher_load, [models.teacher])
    if run.checkpoint.load:
        load_model_weights(run.checkpoint.load, models.student)
    result = measure(models, run, ctx, inputs.prompts[: own.prompts], modes, own.resamples,
                     top_k=top_k or 4, seed=run.train.seed, tokenizer=inputs.tokenizer)
    if ctx.reports:
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
