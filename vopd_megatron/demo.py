"""A small real distillation on CPU: every loss mode, vocab-parallel over gloo.

The student is a table of logits, one row per state (a stand-in for the
contexts of a language model), split by vocabulary columns across `--tp`
ranks exactly as Megatron splits its output layer; the teacher is a fixed
table. Each step samples one token per state from the student (on-policy, at
the loss temperature), computes the loss with the vocab-parallel
implementation over the ranks' shards, and takes an Adam step. The printed
table is the mean reverse KL(student || teacher) over states as training goes,
per mode, with the same seed and steps for every mode.

    python -m vopd_megatron.demo [--tp 2] [--steps 150] [--vocab 4000]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from .errors import entry_point
from .loss import LOSS_MODES, LossConfig, vocab_parallel_opd_loss
from .testing import GlooPool


def make_tables(states, vocab, seed):
    """Teacher logits and the student's initial logits, [states, vocab] each."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(states, vocab, generator=g) * 3.0
    student = teacher + torch.randn(states, vocab, generator=g) * 2.0
    return student, teacher


def distill(mode, states, vocab, steps, lr, top_k, seed):
    """One rank's run; returns the mean reverse KL every 10 steps (rank 0's view)."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    student, teacher = make_tables(states, vocab, seed)
    part = vocab // tp
    cols = slice(rank * part, (rank + 1) * part)
    z = torch.nn.Parameter(student[:, cols].clone())  # [S, V/tp] this rank's shard
    u = teacher[:, cols]  # [S, V/tp]
    opt = torch.optim.Adam([z], lr=lr)
    config = LossConfig(mode=mode, top_k=top_k)
    gen = torch.Generator().manual_seed(seed + 1)  # same samples on every rank
    curve = []
    for step in range(steps + 1):
        full = [torch.empty_like(z) for _ in range(tp)]
        dist.all_gather(full, z.detach())
        logp = torch.cat(full, -1).log_softmax(-1)  # [S, V] small toy: gather to sample and report
        if step % 10 == 0:
            curve.append(float((logp.exp() * (logp - teacher.log_softmax(-1))).sum(-1).mean()))
        if step == steps:
            break
        targets = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1)  # [S] a ~ p
        loss_sum, num_tokens, _ = vocab_parallel_opd_loss(
            z, u, targets, torch.ones(states), config, group=dist.group.WORLD)
        opt.zero_grad()
        (loss_sum / num_tokens).backward()
        opt.step()
    return curve


@entry_point
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (gloo processes)")
    ap.add_argument("--states", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default=",".join(LOSS_MODES))
    args = ap.parse_args(argv)
    for flag, value, low in (("--tp", args.tp, 1), ("--states", args.states, 1), ("--vocab", args.vocab, 1),
                             ("--steps", args.steps, 1), ("--top-k", args.top_k, 1)):
        if value < low:
            ap.error(f"{flag} {value} must be >= {low}")
    if not args.lr > 0:
        ap.error(f"--lr {args.lr} must be > 0")
    if args.vocab % args.tp:
        ap.error(f"--vocab {args.vocab} must be divisible by --tp {args.tp}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        ap.error("--modes names no loss mode")
    for m in modes:
        try:
            LossConfig(mode=m, top_k=args.top_k)  # fail early on a bad mode
        except ValueError as exc:
            ap.error(f"--modes: {exc}")
    print(f"[demo] distilling a {args.states} x {args.vocab} student table toward a teacher, "
          f"TP={args.tp} over gloo, {args.steps} Adam steps (lr {args.lr}) per mode")
    curves = {}
    with GlooPool(args.tp) as pool:
        for mode in modes:
            t0 = time.perf_counter()
            curves[mode] = pool.run(distill, mode, args.states, args.vocab, args.steps,
                                    args.lr, args.top_k, args.seed)[0]
            print(f"[demo] {mode:<10} KL {curves[mode][0]:.4f} -> {curves[mode][-1]:.4f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    marks = list(range(0, args.steps + 1, 10))
    shown = [i for i in range(len(marks)) if i % max(1, len(marks) // 6) == 0 or i == len(marks) - 1]
    print("\nmean reverse KL(student || teacher) over states, by step")
    print("| mode | " + " | ".join(f"step {marks[i]}" for i in shown) + " |")
    print("|---" * (len(shown) + 1) + "|")
    for mode, curve in curves.items():
        print(f"| {mode} | " + " | ".join(f"{curve[i]:.4f}" for i in shown) + " |")


if __name__ == "__main__":
    main()
