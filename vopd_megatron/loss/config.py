"""Typed configuration of the OPD / vOPD loss family.

One frozen dataclass carries every knob of DESIGN §2, validated on
construction so that a bad value fails before any tensor is touched.

Each rule about these fields lives here once. vopd-train's `--vopd-*` flags
set them (config/schema.py, `DistillArgs.loss_config`), so a rule's error also
carries its wording in those flags' names (`LossConfigError.flags`), and the
numeric ranges are declared once (`RANGES`) for LossConfig and the flags that
mirror its fields alike.
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
#: Admissible range of each numeric field: (lo, hi, lo_open, hi_open), None an unbounded side.
#: LossConfig checks them; the --vopd-* flags that mirror these fields declare the same ones.
RANGES = {
    "top_k": (1, None, False, False),
    "temperature": (0, None, True, False),
    "rollout_correction_cap": (0, None, True, False),
    "ppo_clip": (0, 1, True, True),
    "opt_baseline_eps": (0, None, False, False),
}


def in_range(value, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> bool:
    """Whether `value` lies in the range (NaN never does)."""
    above_lo = lo is None or (value > lo if lo_open else value >= lo)
    below_hi = hi is None or (value < hi if hi_open else value <= hi)
    return bool(above_lo and below_hi)


def describe_range(lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> str:
    """`> 0`, `>= 1`, `in (0, 1)`, ... for messages."""
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


class LossConfigError(ValueError):
    """A LossConfig that cannot work. `flags` is the same message in the words of the
    `--vopd-*` flags that set these fields, for the vopd-train front end."""

    def __init__(self, message: str, flags: str | None = None):
        super().__init__(message)
        self.flags = flags or message


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
        """Raise LossConfigError for a value or combination that cannot work.

        A `top_k` with a mode that does not use it is accepted (one k serves a
        sweep over modes); vopd-train refuses that as a flag with no effect."""
        if self.mode not in LOSS_MODES:
            raise LossConfigError(f"unknown loss mode {self.mode!r}; expected one of {LOSS_MODES}",
                                  f"unknown --vopd-loss {self.mode!r}; expected one of {LOSS_MODES}")
        if self.mode in TOPK_MODES and self.top_k is None:
            raise LossConfigError(f"loss mode {self.mode!r} needs top_k (--vopd-top-k)",
                                  f"--vopd-loss {self.mode} needs --vopd-top-k")
        if self.top_k is not None and (int(self.top_k) != self.top_k or not in_range(self.top_k, *RANGES["top_k"])):
            raise LossConfigError(f"top_k must be a positive integer, got {self.top_k!r}")
        self._check_range("temperature")
        if self.backend not in BACKENDS:
            raise LossConfigError(f"unknown loss backend {self.backend!r}; expected one of {BACKENDS}")
        if self.rollout_correction not in ROLLOUT_CORRECTIONS:
            raise LossConfigError(
                f"unknown rollout_correction {self.rollout_correction!r}; "
                f"expected one of {ROLLOUT_CORRECTIONS}"
            )
        for name in ("rollout_correction_cap", "opt_baseline_eps", "ppo_clip"):
            self._check_range(name)
        if self.ppo_clip is not None and self.mode not in SAMPLED_MODES:
            raise LossConfigError(f"ppo_clip applies to sampled modes {SAMPLED_MODES}, not {self.mode!r}")

    def _check_range(self, name: str) -> None:
        value = getattr(self, name)
        if value is not None and not in_range(value, *RANGES[name]):
            raise LossConfigError(f"{name} must be {describe_range(*RANGES[name])}, got {value!r}")

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
