"""Exact per-state variance of the sampled-token gradient estimators.

For one state, every sampled mode estimates the `full_kl` logit gradient
`p * (r - K)` by `g_a = (r_a - b)(e_a - p)` with `a ~ p`. Its total variance
(trace of the covariance over the vocabulary) has the closed form

    Var(b) = sum_a p_a (r_a - b)^2 |e_a - p|^2 - |p * (r - K)|^2,
    |e_a - p|^2 = 1 - 2 p_a + sum_v p_v^2,

quadratic in b with its minimum at `reference.optimal_baseline`. Used by the
tests (against enumeration) and by benchmarks/variance_table.py.
"""
from __future__ import annotations

import torch

from .reference import optimal_baseline, reverse_kl, topk_reverse_kl


def estimator_variance(logp: torch.Tensor, logq: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Total variance of (r_a - b)(e_a - p), a ~ p, per row.

    logp, logq: [..., V] log-probabilities; baseline: [...] detached b.
    """
    p = logp.exp()
    r = logp - logq  # [..., V]
    kl = (p * r).sum(-1, keepdim=True)
    s2 = (p * p).sum(-1, keepdim=True)
    second = (p * (r - baseline.unsqueeze(-1)) ** 2 * (1.0 - 2.0 * p + s2)).sum(-1)
    mean_sq = ((p * (r - kl)) ** 2).sum(-1)
    return second - mean_sq


def sampled_baselines(logp, logq, top_k: int | None = None, eps: float = 1e-10) -> dict[str, torch.Tensor]:
    """The baseline b of every sampled mode for each row: {mode: [...]}."""
    kl = reverse_kl(logp, logq)
    out = {"opd": torch.zeros_like(kl), "vopd": kl, "vopd_opt": optimal_baseline(logp, logq, eps)}
    if top_k is not None:
        out["vopd_topk"] = topk_reverse_kl(logp, logq, top_k)
    return out
