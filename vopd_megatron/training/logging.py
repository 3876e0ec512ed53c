"""TensorBoard scalars, a JSON-lines copy of them, and the one-line progress report.

Rank 0 prints; the last global rank (on the last pipeline stage, where the
loss lives) writes TensorBoard events and appends every logged scalar dict as
one line `{"iteration": i, ...}` to `<tensorboard-dir>/metrics.jsonl` (train
and eval lines alike; non-finite values as null), so scripts can read curves
without TensorBoard. Both ranks see the same numbers: the training step
reduces the metrics on the last stage and, with PP > 1, sends them to the
pipeline's earlier stages; evaluation metrics are computed on every rank.
"""
from __future__ import annotations

import json
import math
import os

import torch

from ..progress import echo


def peak_memory_gb() -> float:
    """Peak device memory of this process (GPU), or its peak RSS (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class StepLogger:
    def __init__(self, tensorboard_dir: str | None, log_interval: int = 1, config_dict: dict | None = None,
                 ctx=None):
        """ctx: the run's `ParallelContext` (None: a 1-process run)."""
        self.log_interval = max(1, log_interval)
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        self.printer = rank == 0
        self.writer = self.jsonl = None
        if tensorboard_dir and rank == world - 1:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tensorboard_dir, exist_ok=True)
            self.writer = SummaryWriter(tensorboard_dir)
            if config_dict:
                text = "\n".join(f"    {k}: {v}" for k, v in sorted(config_dict.items()))
                self.writer.add_text("config", text, 0)
            self.jsonl = open(os.path.join(tensorboard_dir, "metrics.jsonl"), "a", encoding="utf-8")

    def scalars(self, result) -> dict[str, float]:
        m, sec = result.metrics, result.seconds
        out = {
            "loss": m.get("loss", float("nan")),
            "kl": m.get("kl", float("nan")),
            "log_ratio": m.get("log_ratio", float("nan")),
            "advantage": m.get("advantage", float("nan")),
            "student_logprob": m.get("student_logprob", float("nan")),
            "baseline_explained_variance": m.get("baseline_explained_variance", float("nan")),
            "grad_norm": result.grad_norm,
            "lr": result.lr,
            "tokens_per_s": result.num_tokens / max(sec.get("step", 0.0), 1e-9),
            "time/step_s": sec.get("step", 0.0),
            "time/rollout_s": sec.get("rollout", 0.0),
            "time/teacher_forward_s": sec.get("teacher_forward", 0.0),
            "time/student_forward_s": sec.get("student_forward", 0.0),
            "time/loss_forward_s": sec.get("loss_forward", 0.0),
            "time/backward_and_optimizer_s": sec.get("backward_and_optimizer", 0.0),
            "memory/peak_gb": peak_memory_gb(),
        }
        for key in ("topk_kl", "rollout_weight", "ppo_clipped", "rollout_logprob_gap", "rollout_logprob_abs_gap",
                    "rollout/completion_tokens", "rollout/hit_max_length",
                    "variance/opd_signal", "variance/vopd_signal", "variance/mode_signal", "variance/ratio"):
            if key in m:
                out[key] = m[key]
        return out

    def write(self, iteration: int, scalars: dict[str, float]) -> None:
        """TensorBoard scalars at step `iteration`, and one metrics.jsonl line."""
        if self.writer is None:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, iteration)
        self.writer.flush()
        line = {"iteration": iteration}
        line.update({k: (float(v) if math.isfinite(v) else None) for k, v in scalars.items()})
        self.jsonl.write(json.dumps(line) + "\n")
        self.jsonl.flush()

    def log_eval(self, iteration: int, metrics: dict[str, float]) -> None:
        """Evaluation scalars (`eval/*`) at step `iteration`, and a progress line."""
        self.write(iteration, metrics)
        if self.printer:
            text = " | ".join(f"{k[5:] if k.startswith('eval/') else k} {v:.4f}" for k, v in metrics.items())
            echo(f"[vopd] eval @ iter {iteration:6d} | {text}")

    def log(self, iteration: int, result, extra: str = "") -> None:
        scalars = self.scalars(result)
        self.write(iteration, scalars)
        if self.printer and iteration % self.log_interval == 0:
            echo(
                f"[vopd] iter {iteration:6d} | KL {scalars['kl']:.4f} | r {scalars['log_ratio']:+.4f} "
                f"| baseline EV {scalars['baseline_explained_variance']:+.3f} | grad norm {scalars['grad_norm']:.3f} "
                f"| lr {scalars['lr']:.2e} | {scalars['tokens_per_s']:.0f} tok/s "
                f"| step {scalars['time/step_s']:.2f} s, rollout {scalars['time/rollout_s']:.2f} s"
                f"{' | skipped' if result.skipped else ''}{extra}"
            )

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()
