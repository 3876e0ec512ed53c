"""Plain full-vocabulary reference of every loss in DESIGN §2: the specification.

No distribution, no fusion, no chunking: each quantity is written the way the
formula reads, in the dtype of the inputs (tests use float64), and gradients
come from autograd. The vocab-parallel implementation, the Megatron adapter and
the benchmarks are all checked against these functions.

Inputs carry the whole (possibly padded) vocabulary in their last dimension;
columns at or beyond `vocab_size` are padding and are dropped before any
softmax, for student and teacher alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LossConfig
from .terms import TokenTerms, reduce_token_terms


def tempered_logits(student_logits, teacher_logits, vocab_size, temperature):
    """Both models' logits over the real vocabulary, divided by the temperature.

    Returns `(z [..., V], u [..., V])`; the teacher is detached.
    """
    z = student_logits[..., :vocab_size] / temperature
    u = teacher_logits[..., :vocab_size].detach() / temperature
    return z, u


def reverse_kl(logp, logq):
    """K = sum_v p_v (log p_v - log q_v), per row."""
    return (logp.exp() * (logp - logq)).sum(-1)


def topk_reverse_kl(z, u, k):
    """K^k: the reverse KL of both distributions renormalised inside the
    student's top-k set S (k clamped to the vocabulary size).

    z, u: [..., V] logits or log-probs (renormalisation makes them equivalent;
    logits keep the gradient outside S exactly zero).
    """
    k = min(k, z.shape[-1])
    idx = z.topk(k, dim=-1).indices  # [..., k]
    logp_s = F.log_softmax(z.gather(-1, idx), dim=-1)  # log p~
    logq_s = F.log_softmax(u.gather(-1, idx), dim=-1)  # log q~
    return reverse_kl(logp_s, logq_s)


def optimal_baseline(logp, logq, eps):
    """Variance-optimal scalar baseline of the logit gradient (r_a - b)(e_a - p).

    b* = ((1 + s2) K - 2 sum_v p_v^2 r_v) / (1 - s2), s2 = sum_v p_v^2, which
    minimises sum_a p_a (r_a - b)^2 |e_a - p|^2; falls back to K where 1 - s2
    is below `eps` (a nearly deterministic state).
    """
    p = logp.exp()
    r = logp - logq
    kl = (p * r).sum(-1)
    s2 = (p * p).sum(-1)
    pr2 = (p * p * r).sum(-1)
    denom = 1.0 - s2
    safe = denom > eps
    b = ((1.0 + s2) * kl - 2.0 * pr2) / torch.where(safe, denom, torch.ones_like(denom))
    return torch.where(safe, b, kl)


def _baseline(config, logp, logq, kl, topk_kl):
    if config.mode == "opd":
        return torch.zeros_like(kl)
    if config.mode == "vopd_topk":
        return topk_kl
    if config.mode == "vopd_opt":
        return optimal_baseline(logp, logq, config.baseline_eps(logp.dtype))
    return kl  # vopd; also the reported baseline of the KL modes


def reference_token_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    config: LossConfig,
    vocab_size: int | None = None,
    behavior_logprobs: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
) -> TokenTerms:
    """Per-token losses and statistics, computed the plain way.

    student_logits, teacher_logits: [..., Vp] full (padded) vocabulary.
    targets: [...] sampled token ids a; loss_mask: [...] 1 on completion tokens.
    behavior_logprobs: [...] log mu(a) from the sampling engine (rollout correction).
    old_logprobs: [...] log p_old(a) of the policy that sampled the batch (PPO).
    """
    vocab_size = student_logits.shape[-1] if vocab_size is None else vocab_size
    mask = (loss_mask != 0).to(student_logits.dtype)  # [...]
    safe_targets = torch.where(loss_mask != 0, targets, torch.zeros_like(targets)).long()
    z, u = tempered_logits(student_logits, teacher_logits, vocab_size, config.temperature)
    logp, logq = F.log_softmax(z, dim=-1), F.log_softmax(u, dim=-1)
    kl = reverse_kl(logp, logq)  # [...], differentiable through p
    logp_a = logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # [...]
    logq_a = logq.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # [...]
    topk_kl = topk_reverse_kl(z, u, config.top_k) if config.needs_topk else None
    baseline = _baseline(config, logp.detach(), logq, kl.detach(), None if topk_kl is None else topk_kl.detach())

    weight = None
    if config.rollout_correction is not None:
        if behavior_logprobs is None:
            raise ValueError(f"rollout_correction={config.rollout_correction!r} needs behavior_logprobs")
        proximal = logp_a.detach() if old_logprobs is None else old_logprobs.to(logp.dtype)
        ratio_mu = torch.exp(proximal - behavior_logprobs.to(logp.dtype))
        if config.rollout_correction == "truncate":
            weight = torch.clamp(ratio_mu, max=config.rollout_correction_cap)
        else:
            weight = (ratio_mu <= config.rollout_correction_cap).to(logp.dtype)
            mask = mask * weight  # masked tokens leave every mode's loss

    clipped = None
    if config.sampled:
        cost = (logp_a - logq_a - baseline).detach()  # r_t - b_t, fully detached
        if config.ppo_clip is not None:
            if old_logprobs is None:
                raise ValueError("ppo_clip needs old_logprobs")
            ratio = torch.exp(logp_a - old_logprobs.to(logp.dtype))
            clipped_ratio = ratio.clamp(1.0 - config.ppo_clip, 1.0 + config.ppo_clip)
            loss = torch.maximum(ratio * cost, clipped_ratio * cost)
            clipped = (clipped_ratio * cost > ratio * cost).to(logp.dtype).detach()
        else:
            loss = cost * logp_a
        if config.rollout_correction == "truncate":
            loss = loss * weight
    elif config.mode == "full_kl":
        loss = kl
    else:
        loss = topk_kl

    return TokenTerms(
        token_loss=torch.where(mask != 0, loss * mask, 0.0),  # a masked token adds 0, even if not finite
        mask=mask.detach(),
        logp=logp_a.detach(),
        logq=logq_a.detach(),
        kl=kl.detach(),
        baseline=baseline.detach(),
        topk_kl=None if topk_kl is None else topk_kl.detach(),
        rollout_weight=weight,
        ppo_clipped=clipped,
        behavior_logprob=None if behavior_logprobs is None else behavior_logprobs.detach(),
    )


def reference_loss(*args, **kwargs):
    """`(loss_sum, num_tokens, metrics)` of `reference_token_terms`."""
    return reduce_token_terms(reference_token_terms(*args, **kwargs))
