"""Typed configuration of the OPD / vOPD loss family.

One frozen dataclass carries every knob of DESIGN §2, validated on
construction so that a bad value fails before any tensor is touched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: Every loss mode, in the order of DESIGN §2.
LOSS_MODES = ("opd", "vopd", "vopd_topk", "vopd_opt", "full_kl", "topk_kl")
#: Modes whose gradient is a score-function estimate from the sampled token.
SAMPLED_MODES = ("opd", "vopd", "vopd_topk", "vopd_opt")
#: Modes that need the student's top-k vocabulary entries.
TOPK_MODES = ("vopd_topk", "topk_kl")
#: Ways to correct for a sampling engine whose log-probs differ from the trainer's.
ROLLOUT_CORRECTIONS = (None, "truncate", "mask")
#: Implementations of the passes over the logit shards (backend.py).
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class LossConfig:
    """What the loss computes; shared by the reference and vocab-parallel paths."""

    mode: str = "vopd"
    """One of LOSS_MODES. `vopd` subtracts the per-token reverse KL from the
    sampled log-ratio; `vopd_opt` uses the variance-optimal scalar baseline."""

    top_k: int | None = None
    """Size of the student top-k set S; required by `vopd_topk` and `topk_kl`,
    clamped to the true vocabulary size."""

    temperature: float = 1.0
    """Both models' logits are divided by this before any softmax; must match
    the rollout sampling temperature."""

    rollout_correction: str | None = None
    """None, "truncate" (multiply sampled-mode token losses by the detached
    weight min(p(a)/mu(a), C)) or "mask" (drop tokens whose ratio exceeds C).
    Needs behaviour log-probs log mu(a) from the sampling engine."""

    rollout_correction_cap: float = 2.0
    """C in the rollout correction above."""

    ppo_clip: float | None = None
    """PPO ratio clip epsilon for several updates per rollout batch; needs the
    log-probs of the policy that generated the batch (old_logprobs)."""

    opt_baseline_eps: float | None = None
    """`vopd_opt` falls back to the KL baseline where 1 - sum(p^2) is at most
    this (a nearly deterministic state, where the closed form is 0/0 and its
    rounding error explodes). None: 1e-4 for fp32 statistics, 1e-10 for fp64.
    Such states carry almost no gradient variance either way."""

    check_inputs: bool = True
    """Validate targets, the 0/1 loss mask, side log-probs, and student and
    teacher finiteness on completion tokens. Costs two host syncs per call."""

    backend: str = "auto"
    """"auto" (fused Triton kernels for CUDA tensors when triton imports, the
    PyTorch path otherwise), "torch" or "triton". Same results either way."""

    def __post_init__(self):
        if self.mode not in LOSS_MODES:
            raise ValueError(f"unknown loss mode {self.mode!r}; expected one of {LOSS_MODES}")
        if self.mode in TOPK_MODES:
            if self.top_k is None:
                raise ValueError(f"loss mode {self.mode!r} needs top_k (--vopd-top-k)")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown loss backend {self.backend!r}; expected one of {BACKENDS}")
        if self.rollout_correction not in ROLLOUT_CORRECTIONS:
            raise ValueError(
                f"unknown rollout_correction {self.rollout_correction!r}; "
                f"expected one of {ROLLOUT_CORRECTIONS}"
            )
        if not self.rollout_correction_cap > 0:
            raise ValueError(f"rollout_correction_cap must be > 0, got {self.rollout_correction_cap!r}")
        if self.opt_baseline_eps is not None and not self.opt_baseline_eps >= 0:
            raise ValueError(f"opt_baseline_eps must be >= 0, got {self.opt_baseline_eps!r}")
        if self.ppo_clip is not None and not 0 < self.ppo_clip < 1:
            raise ValueError(f"ppo_clip must be in (0, 1), got {self.ppo_clip!r}")
        if self.ppo_clip is not None and self.mode not in SAMPLED_MODES:
            raise ValueError(f"ppo_clip applies to sampled modes {SAMPLED_MODES}, not {self.mode!r}")

    def baseline_eps(self, dtype) -> float:
        """The `vopd_opt` fallback threshold for statistics of this dtype."""
        if self.opt_baseline_eps is not None:
            return self.opt_baseline_eps
        return 1e-10 if dtype == torch.float64 else 1e-4

    @property
    def sampled(self) -> bool:
        """True for the score-function modes (gradient from the sampled token)."""
        return self.mode in SAMPLED_MODES

    @property
    def needs_topk(self) -> bool:
        return self.mode in TOPK_MODES
