"""Per-token terms of a loss call and their reduction to Megatron's contract.

Both the reference and the vocab-parallel implementation produce the same
`TokenTerms`; one reduction turns them into Megatron's
`(loss_sum, num_tokens, metrics)`, so the two paths cannot report differently.

Metrics follow Megatron-LM's convention for values that must be averaged
across microbatches and data-parallel ranks: each is a 2-element tensor
`[sum over tokens, token count]`. `summarize_metrics` adds them up (and
all-reduces over a group if given) and derives the means and the baseline's
explained variance `1 - Var(r - b) / Var(r)`.

Gradient-variance diagnostic (every call, any mode). Each sampled estimator's
logit gradient at a token is `c_t (e_a - p)` with coefficient `c_t = r_t - b_t`,
and all of them have the same mean (the `full_kl` gradient), so they differ
only in their second moment, driven by `E[c_t^2]`. The metrics carry the sums
of `r^2` (opd: b = 0), `(r - K)^2` (vopd: b = K) and `(r - b)^2` (this run's
mode), so `summarize_metrics` reports, over every token of the batch,

- `variance/opd_signal = mean r^2`, `variance/vopd_signal = mean (r - K)^2`,
- `variance/mode_signal = mean (r - b)^2` (meaningful for the sampled modes),
- `variance/ratio = vopd_signal / opd_signal` (vOPD's claim: below 1).

At one state, `E_a[r^2] = Var_a(r) + K^2` and `E_a[(r - K)^2] = Var_a(r)`
(since `E_a[r] = K`): the ratio is how much of opd's signal power the
baseline removes. Being `[sum, count]` pairs, they combine exactly over
microbatches and data-parallel ranks; tensor-parallel ranks hold identical
per-token terms.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TokenTerms:
    """Per-token outputs, all shaped like the targets (`[s, b]` or any `[...]`).

    Only `token_loss` carries gradient; the rest are detached fp32.
    """

    token_loss: torch.Tensor  # [...] masked, weighted per-token loss (differentiable)
    mask: torch.Tensor  # [...] 1.0 where the token is a completion token, else 0.0
    logp: torch.Tensor  # [...] student log p(a) at temperature
    logq: torch.Tensor  # [...] teacher log q(a) at temperature
    kl: torch.Tensor  # [...] per-token reverse KL K_t
    baseline: torch.Tensor  # [...] b_t of the mode (K_t for the KL modes, 0 for opd)
    topk_kl: torch.Tensor | None = None  # [...] K^k_t, top-k modes only
    rollout_weight: torch.Tensor | None = None  # [...] truncated IS weight or keep flag
    ppo_clipped: torch.Tensor | None = None  # [...] 1.0 where the PPO clip removed the gradient
    behavior_logprob: torch.Tensor | None = None  # [...] the sampling engine's log mu(a), when given

    @property
    def log_ratio(self) -> torch.Tensor:
        """r_t = log p(a) - log q(a)."""
        return self.logp - self.logq


def reduce_token_terms(terms: TokenTerms):
    """Megatron's loss contract: `(loss_sum, num_tokens, metrics)`.

    `loss_sum` is the plain sum of masked per-token losses (differentiable);
    `num_tokens` the number of completion tokens (int tensor), so the caller
    can normalise by the global token count across microbatches and ranks.
    """
    mask = terms.mask
    count = mask.sum()
    num_tokens = count.detach().to(torch.int)
    loss_sum = terms.token_loss.sum()
    r = terms.log_ratio
    advantage = terms.baseline - r  # reward -r minus value -b
    per_token = {
        "kl": terms.kl,
        "log_ratio": r,
        "log_ratio_sq": r * r,
        "baseline": terms.baseline,
        "advantage": advantage,
        "advantage_sq": advantage * advantage,
        "student_logprob": terms.logp,
        # gradient-variance diagnostic: the vopd coefficient's power, whatever the mode
        "vopd_signal_sq": (r - terms.kl) ** 2,
    }
    if terms.topk_kl is not None:
        per_token["topk_kl"] = terms.topk_kl
    if terms.rollout_weight is not None:
        per_token["rollout_weight"] = terms.rollout_weight
    if terms.ppo_clipped is not None:
        per_token["ppo_clipped"] = terms.ppo_clipped
    if terms.behavior_logprob is not None:  # trainer vs sampling engine: should be ~0 on-policy
        gap = terms.logp - terms.behavior_logprob.to(terms.logp.dtype)
        per_token["rollout_logprob_gap"] = gap
        per_token["rollout_logprob_abs_gap"] = gap.abs()
    count32 = count.detach().float()
    metrics = {"loss": torch.stack([loss_sum.detach().float(), count32])}
    live = mask != 0  # a masked token adds 0 to every sum, even if its terms are not finite
    for name, value in per_token.items():
        total = torch.where(live, value.detach().float() * mask.float(), 0.0).sum()
        metrics[name] = torch.stack([total, count32])
    return loss_sum, num_tokens, metrics


def metric_totals(metrics_list) -> dict[str, torch.Tensor]:
    """{name: [sum, count]} over the microbatches of one step (each metric is a `[2]` pair)."""
    if isinstance(metrics_list, dict):
        metrics_list = [metrics_list]
    return {n: torch.stack([m[n] for m in metrics_list]).sum(0) for n in metrics_list[0]}


def summarize_totals(totals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Means of `[sum, count]` totals (nan where nothing was counted), the
    baseline explained variance and the gradient-variance diagnostic."""
    out = {name: total / count if count > 0 else float("nan") for name, (total, count) in totals.items()}
    var_r = out["log_ratio_sq"] - out["log_ratio"] ** 2
    var_a = out["advantage_sq"] - out["advantage"] ** 2
    out["baseline_explained_variance"] = 1.0 - var_a / var_r if var_r > 0 else float("nan")
    out.update(signal_variance(out))
    return out


def summarize_metrics(metrics_list, group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Means over every token of a batch, and the baseline explained variance.

    metrics_list: the metrics dicts of the microbatches of one step.
    group: if given, the `[sum, count]` pairs are all-reduced over it first
        (the data-parallel group), so every rank reports the global batch.
    """
    totals = metric_totals(metrics_list)
    stacked = torch.stack(list(totals.values()))  # [M, 2]
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(stacked, group=group)
    return summarize_totals(dict(zip(totals, stacked.double().cpu().tolist())))


def signal_variance(means: dict[str, float]) -> dict[str, float]:
    """The gradient-variance diagnostic (module docstring) from the token means."""
    opd, vopd = means["log_ratio_sq"], means["vopd_signal_sq"]
    return {
        "variance/opd_signal": opd,
        "variance/vopd_signal": vopd,
        "variance/mode_signal": means["advantage_sq"],
        "variance/ratio": vopd / opd if opd > 0 else float("nan"),
    }
