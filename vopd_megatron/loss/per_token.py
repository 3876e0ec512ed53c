"""From the gathered statistics to per-token losses, and the per-mode gradient coefficients.

Both autograd Functions of the loss -- the logits path (vocab_parallel.py)
and the fused output layer (fused_output.py) -- make the same `[R, N]`
statistics rows per rank and gather them once. Everything after that gather
is the same math whichever way the rows were made, so it lives here, once:
the combine, the finiteness check, the baselines, the per-token loss and its
derivative for every mode, and the top-k gradient on the saved candidates.
The two Functions differ only in how they reach the logits (a shard in
memory, or tiles recomputed from hidden states) and in what they keep for
backward; a precision or masking fix made here reaches both (the merge of
issues 15 and 16 found the fused copy of this code without them).

Precision (docs/loss.md): every log-probability is `(x - max) - log sum
exp(x - max)`, never `x - lse`, whose `lse` is rounded at the logits'
magnitude. Masking: a token with mask 0 adds exactly 0 (`masked`, a select,
not `loss * 0`, which is NaN for a non-finite masked token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from . import stats as S
from .config import LossConfig


class NonFiniteLogitsError(UserError, ValueError):
    """Student or teacher logits that are NaN or infinite on a live token (a
    diverged student, a broken teacher checkpoint): a fault of the run's
    inputs, reported as one line by the entry points.

    model: "student" or "teacher"; token_rows: flat indices into the loss
    call's leading dims (e.g. b * s + t for [b, s] targets)."""

    HINTS = {"student": "a diverged student (check the learning rate and the last checkpoint)",
             "teacher": "check the teacher checkpoint and its vocabulary padding"}

    def __init__(self, message: str, *, model: str, token_rows: list[int]):
        super().__init__(message)
        self.model, self.token_rows = model, token_rows

    @classmethod
    def found(cls, model: str, token_rows: list[int]) -> NonFiniteLogitsError:
        """The error for `model`'s non-finite logits on these flat token rows."""
        more = "..." if len(token_rows) > 5 else ""
        return cls(f"non-finite {model} logits on real vocabulary columns (token rows {token_rows[:5]}{more}); "
                   f"{cls.HINTS[model]}", model=model, token_rows=list(token_rows))


def check_finite(st: S.GlobalStats, mask: torch.Tensor) -> bool:
    """Raise NonFiniteLogitsError naming the model (student first) and the token
    rows whose logits are not finite on real columns; tokens with mask 0 are not
    checked. Returns whether some masked token has non-finite statistics. One
    host sync; the statistics are global, so every TP rank decides the same.

    Which statistic shows what (given the other model finite): NaN or +inf in z
    makes lse_z non-finite, -inf in z makes E_p[z - u] NaN (0 * -inf), so K is
    NaN with both normalisers finite; NaN or +inf in u makes lse_u non-finite,
    -inf in u makes K +inf.
    """
    live = mask != 0  # [N]
    fin_z, fin_u, fin_kl = torch.isfinite(st.lse_z), torch.isfinite(st.lse_u), torch.isfinite(st.kl)
    student = ~fin_z | (torch.isnan(st.kl) & fin_u)  # [N]
    teacher = ~student & (~fin_u | ~fin_kl)  # [N]
    flags = torch.stack([(student & live).any(), (teacher & live).any(), ((student | teacher) & ~live).any()])
    flags = flags.tolist()
    for name, bad, flag in (("student", student, flags[0]), ("teacher", teacher, flags[1])):
        if flag:
            raise NonFiniteLogitsError.found(name, (bad & live).nonzero().flatten().tolist())
    return bool(flags[2])


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values * mask, exactly 0 where the mask is 0 (a non-finite masked token
    must not turn the sum into NaN, as `values * 0` would)."""
    return torch.where(mask != 0, values * mask, 0.0)


def rollout_weight(cfg: LossConfig, logp, behavior, old):
    """Truncated IS weight min(p/mu, C), or the keep flag (ratio <= C); None if off."""
    if cfg.rollout_correction is None:
        return None
    proximal = logp if old is None else old
    ratio_mu = torch.exp(proximal - behavior)
    if cfg.rollout_correction == "truncate":
        return ratio_mu.clamp(max=cfg.rollout_correction_cap)
    return (ratio_mu <= cfg.rollout_correction_cap).to(ratio_mu.dtype)


def sampled_coefficients(cfg: LossConfig, st: S.GlobalStats, baseline, mask, behavior, old):
    """Per-token loss value and its derivative wrt log p(a), for sampled modes.

    Mirrors reference.reference_token_terms with the derivative written out.
    Returns (token_loss, coef, weight, clipped, mask), all [N] fp32.
    """
    cost = st.logp - st.logq - baseline  # r_t - b_t
    weight, clipped = rollout_weight(cfg, st.logp, behavior, old), None
    if cfg.rollout_correction == "mask":
        mask = mask * weight
    if cfg.ppo_clip is not None:
        ratio = torch.exp(st.logp - old)
        clipped_ratio = ratio.clamp(1.0 - cfg.ppo_clip, 1.0 + cfg.ppo_clip)
        loss = torch.maximum(ratio * cost, clipped_ratio * cost)
        clipped = (clipped_ratio * cost > ratio * cost).to(cost.dtype)
        coef = cost * ratio * (1.0 - clipped)  # d loss / d log p(a)
    else:
        loss, coef = cost * st.logp, cost
    if cfg.rollout_correction == "truncate":
        loss, coef = loss * weight, coef * weight
    return masked(loss, mask), masked(coef, mask), weight, clipped, mask


@dataclass
class ModeTerms:
    """What a Function needs after the combine, the same for both paths.

    outputs: the 9 per-token results the Functions return (token_loss, mask,
        logp, logq, kl, baseline, topk_kl | None, weight | None, clipped | None).
    saved: the `[N]` / `[N, k_loc]` tensors the mode's backward reads --
        sampled: (z_max, z_logsum, coef, local_target, owned);
        full_kl: (z_max, z_logsum, u_max, u_logsum, kl, mask);
        topk_kl: (cz, cu, member, z_max, z_logsum, u_max, u_logsum, kl, mask),
        this shard's candidate z and u, its picks, the top-k set's normalisers.
    zero_masked: whether gradient rows of masked tokens must be zeroed
        explicitly (some masked token has non-finite logits, or unknown
        because `check_inputs` is off): there `0 * p` may be NaN.
    """

    st: S.GlobalStats
    outputs: tuple
    saved: tuple
    zero_masked: bool

    @property
    def mask(self) -> torch.Tensor:
        """[N] the mask after the rollout correction's "mask" flag."""
        return self.outputs[1]


def mode_terms(cfg: LossConfig, gathered, local, mask, behavior, old, *, rank: int, k: int, width: int,
               local_target, owned) -> ModeTerms:
    """Per-token losses of `cfg.mode` from the gathered statistics `[tp, R, N]`.

    local: this rank's `[R, N]` rows (its top-k candidates for topk_kl); k: the
    clamped top-k size (0 without top-k); width: this shard's real columns;
    local_target, owned: [N] the target's column in this shard, and whether it is here.
    """
    need_opt = cfg.mode == "vopd_opt"
    st = S.combine_statistics(gathered, need_opt)
    topk = S.combine_topk(gathered, k, k) if k else None
    zero_masked = check_finite(st, mask) if cfg.check_inputs else True
    baseline = {
        "opd": torch.zeros_like(st.kl),
        "vopd_topk": topk.kl if topk is not None else None,
        "vopd_opt": S.optimal_baseline_from_stats(st.kl, st.s2, st.p2_dev, cfg.baseline_eps(st.kl.dtype))
        if need_opt else None,
    }.get(cfg.mode, st.kl)
    weight = clipped = None
    if cfg.sampled:
        token_loss, coef, weight, clipped, mask = sampled_coefficients(cfg, st, baseline, mask, behavior, old)
        saved = (st.z_max, st.z_logsum, coef, local_target, owned)
    else:
        if cfg.rollout_correction is not None:
            weight = rollout_weight(cfg, st.logp, behavior, old)
            if cfg.rollout_correction == "mask":
                mask = mask * weight
        if cfg.mode == "full_kl":
            token_loss = masked(st.kl, mask)
            saved = (st.z_max, st.z_logsum, st.u_max, st.u_logsum, st.kl, mask)
        else:
            token_loss = masked(topk.kl, mask)
            k_loc = min(k, width)
            member = topk.member[:, rank * k : rank * k + k_loc]  # [N, k_loc] this shard's picks
            cand = local[-2 * k :].t()  # [N, 2k] this shard's candidate z and u
            saved = (cand[:, :k_loc].contiguous(), cand[:, k : k + k_loc].contiguous(), member,
                     topk.z_max, topk.z_logsum, topk.u_max, topk.u_logsum, topk.kl, mask)
    outputs = (token_loss, mask, st.logp, st.logq, st.kl, baseline,
               None if topk is None else topk.kl, weight, clipped)
    return ModeTerms(st=st, outputs=outputs, saved=saved, zero_masked=zero_masked)


def sampled_row_coef(grad_loss, coef, temperature: float) -> torch.Tensor:
    """[N] c_t = g_t coef_t / tau: the sampled modes' gradient is c_t (e_a - p) per row."""
    return grad_loss.to(coef.dtype) * coef / temperature


def kl_row_coef(grad_loss, mask, temperature: float) -> torch.Tensor:
    """[N] g_t mask_t / tau, in the mask's dtype (fp64 stays fp64): the KL modes' row factor."""
    return grad_loss.to(mask.dtype) * mask / temperature


def topk_kl_candidate_grad(saved: tuple, grad_loss, temperature: float) -> torch.Tensor:
    """[N, k_loc] d loss / d z at this shard's top-k candidates (topk_kl), from
    ModeTerms.saved: c p~ (log p~ - log q~ - K^k) on picked candidates, exact 0
    elsewhere and on masked tokens (a select: their candidates may not be finite)."""
    cz, cu, member, z_max, z_logsum, u_max, u_logsum, kl_s, mask = saved
    logp = (cz - z_max[:, None]) - z_logsum[:, None]  # [N, k_loc] log p~
    r = logp - ((cu - u_max[:, None]) - u_logsum[:, None])  # log p~ - log q~
    c = kl_row_coef(grad_loss, mask, temperature)[:, None]  # [N, 1]
    return torch.where((c != 0) & member, logp.exp() * (r - kl_s[:, None]) * c, 0.0)


def zero_dead_rows_(grad: torch.Tensor, row_coef: torch.Tensor, zero_masked: bool) -> torch.Tensor:
    """Zero, in place, the rows of a gradient chunk `[n, w]` whose coefficient
    `row_coef [n]` is 0 (masked tokens), when `zero_masked` says one may hold
    NaN (0 * NaN); a no-op otherwise. Returns `grad`."""
    if zero_masked:
        grad.masked_fill_((row_coef == 0)[:, None], 0.0)
    return grad
