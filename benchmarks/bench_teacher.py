"""Teacher forward in bf16 vs FP8 (Transformer Engine), and how far FP8 moves the teacher's distribution.

Why: the teacher runs a forward-only pass over every rollout token, so its
GEMMs are a large share of a distillation step; `--teacher-fp8` runs them in
FP8 (e4m3, tensorwise recipe; vopd_megatron/model/fp8.py). The price is a
teacher distribution `q_fp8` that is not exactly `q_bf16`; what matters to the
loss is the per-token drift `KL(q_bf16 || q_fp8)` next to the student-teacher
KL the loss is minimising.

One process (TP = 1). The same GPT (built by vopd_megatron.model.builder, with
identical weights copied into each variant) runs every variant on the same
tokens:

* `fp32` (reference scale for rounding drift), `bf16`, and on a GPU with TE
  `fp8` (TE layer spec, like the bf16 GPU variant);
* time: median forward (no grad) over `--repeats` after `--warmup`, CUDA
  events on a GPU, perf_counter on CPU;
* drift of each variant against bf16: mean / p99 / max per-token
  `KL(q_bf16 || q_x)` in nats, top-1 agreement, and mean |log q(a)| difference
  at tokens `a` sampled from q_bf16.

On CPU (no TE) the FP8 row reports why it cannot run, and the bf16-vs-fp32
drift is measured with the same code (tiny default shape).

    python benchmarks/bench_teacher.py                              # CPU smoke run
    python benchmarks/bench_teacher.py --csv teacher_h100.csv       # GPU defaults: 8 Llama-3-8B layers
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch
import torch.distributed as dist

from vopd_megatron.config.fp8_shapes import fp8_shape_problems
from vopd_megatron.config.schema import ModelArgs, ParallelArgs, TrainArgs
from vopd_megatron.errors import entry_point
from vopd_megatron.model.builder import build_gpt_stage, te_available, transformer_config
from vopd_megatron.model.fp8 import fp8_runtime_problems
from vopd_megatron.runtime.startup import start_process_group

GPU_SHAPE = dict(num_layers=8, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                 ffn_hidden_size=14336, vocab_size=128256, seq_length=4096)
CPU_SHAPE = dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=4,
                 ffn_hidden_size=512, vocab_size=1024, seq_length=64)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in GPU_SHAPE:
        p.add_argument("--" + name.replace("_", "-"), type=int, help="default: GPU %(default)s / CPU tiny")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default 2 on GPU, 2 on CPU")
    p.add_argument("--repeats", type=int, help="timed forwards per variant (default 20 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed forwards per variant (default 3 on GPU, 1 on CPU)")
    p.add_argument("--variants", default="fp32,bf16,fp8", help="comma-separated: fp32, bf16, fp8")
    p.add_argument("--csv", help="also write the table to this CSV file")
    return p.parse_args()


def init_single_process(device):
    from megatron.core import parallel_state, tensor_parallel

    if device.type == "cpu":
        from vopd_megatron.megatron import cpu_compat

        cpu_compat.enable()
    start_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def build_variant(variant: str, m: ModelArgs, mbs: int, device, reference=None):
    """The teacher GPT in one precision, with the reference's weights if given.

    Returns (model, reason): reason is why the variant cannot run (model None)."""
    from megatron.core.transformer.module import Float16Module

    fp8 = variant == "fp8"
    p, t = ParallelArgs(), TrainArgs(bf16=variant != "fp32", micro_batch_size=mbs)
    if fp8:
        problems = fp8_runtime_problems() + fp8_shape_problems(m, p, t)
        if problems:
            return None, "; ".join(problems)
    use_te = te_available() or fp8
    cfg = transformer_config(m, p, t, fp8=fp8)
    model = build_gpt_stage(m, p, t, pre_process=True, post_process=True, config=cfg, use_te=use_te).to(device)
    if reference is not None:
        # TE's _extra_state holds FP8 scaling metadata, not weights: each variant keeps its own.
        weights = {k: v for k, v in reference.state_dict().items() if not k.endswith("_extra_state")}
        result = model.load_state_dict(weights, strict=False)
        stray = [k for k in result.missing_keys + result.unexpected_keys if not k.endswith("_extra_state")]
        if stray:
            raise RuntimeError(f"{variant}: weights do not line up with the reference: {stray[:5]}")
    if t.bf16:
        model = Float16Module(cfg, model)
    return model.eval().requires_grad_(False), None


def forward(model, tokens, positions):
    return model(tokens, positions, None)  # [b, s, V] logits; None: the spec's causal mask


def time_forward(model, tokens, positions, repeats, warmup, device) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            forward(model, tokens, positions)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                forward(model, tokens, positions)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                forward(model, tokens, positions)
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def drift(ref_logits: torch.Tensor, logits: torch.Tensor, gen: torch.Generator) -> dict:
    """Per-token KL(q_ref || q) and friends, from [b, s, V] logits of the same tokens."""
    logq_ref = ref_logits.float().log_softmax(-1).flatten(0, 1)  # [T, V]
    logq = logits.float().log_softmax(-1).flatten(0, 1)  # [T, V]
    q_ref = logq_ref.exp()  # [T, V]
    kl = (q_ref * (logq_ref - logq)).sum(-1)  # [T]
    a = torch.multinomial(q_ref.cpu(), 1, generator=gen).to(logq.device)  # [T, 1] a ~ q_ref
    gap = (logq_ref.gather(-1, a) - logq.gather(-1, a)).abs()  # [T, 1]
    return {
        "kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)), "kl_max": float(kl.max()),
        "top1_agree": float((logq_ref.argmax(-1) == logq.argmax(-1)).float().mean()),
        "logq_a_gap": float(gap.mean()),
    }


@entry_point
def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    shape = {k: getattr(args, k) or (GPU_SHAPE if gpu else CPU_SHAPE)[k] for k in GPU_SHAPE}
    mbs = args.micro_batch_size or 2
    repeats = args.repeats or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    m = ModelArgs(**shape, swiglu=True, normalization="RMSNorm", disable_bias_linear=True,
                  untie_embeddings_and_output_weights=True)
    init_single_process(device)

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, m.vocab_size, (mbs, m.seq_length), generator=gen).to(device)  # [b, s]
    positions = torch.arange(m.seq_length, device=device)[None].expand(mbs, -1)  # [b, s]
    variants = [v for v in args.variants.split(",") if v]
    reference, _ = build_variant("fp32", m, mbs, device)  # the weights every variant gets
    rows, logits = [], {}
    for variant in variants:
        model, reason = (reference, None) if variant == "fp32" else build_variant(variant, m, mbs, device, reference)
        row = {"variant": variant, "ms": None, "error": reason}
        if model is not None:
            try:
                row["ms"] = time_forward(model, tokens, positions, repeats, warmup, device)
                with torch.no_grad():
                    logits[variant] = forward(model, tokens, positions).float()
            except Exception as exc:  # noqa: BLE001 - report, keep the other variants
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        rows.append(row)
        if model is not reference:
            del model
    base = next((r for r in rows if r["variant"] == "bf16" and r["ms"]), None)
    for r in rows:
        r["speedup_vs_bf16"] = f"{base['ms'] / r['ms']:.2f}" if base and r["ms"] else "-"
        if "bf16" in logits and r["variant"] in logits and r["variant"] != "bf16":
            r.update(drift(logits["bf16"], logits[r["variant"]], torch.Generator().manual_seed(1)))

    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"teacher forward, {shape} swiglu RMSNorm, micro-batch {mbs}, on {where}; "
          f"median of {repeats} after {warmup} warm-up; drift against the bf16 variant on the same tokens\n")
    cols = ["variant", "time ms", "speedup vs bf16", "KL mean", "KL p99", "KL max", "top-1 agree", "|d log q(a)|"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(" --- " for _ in cols) + "|")
    for r in rows:
        if r["error"]:
            print(f"| {r['variant']} | n/a ({r['error']}) |" + " |" * (len(cols) - 2))
            continue
        d = [f"{r[k]:.2e}" if k in r else "-" for k in ("kl_mean", "kl_p99", "kl_max")]
        agree = f"{r['top1_agree']:.4f}" if "top1_agree" in r else "-"
        gap = f"{r['logq_a_gap']:.2e}" if "logq_a_gap" in r else "-"
        print(f"| {r['variant']} | {r['ms']:.2f} | {r['speedup_vs_bf16']} | " + " | ".join(d) + f" | {agree} | {gap} |")
    if args.csv:
        fields = ["variant", "ms", "speedup_vs_bf16", "kl_mean", "kl_p99", "kl_max", "top1_agree", "logq_a_gap",
                  "error"]
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(shape) + ["micro_batch_size", "device"] + fields,
                                    extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({**shape, "micro_batch_size": mbs, "device": where, **r})
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # what Megatron-LM's launchers set
    main()
