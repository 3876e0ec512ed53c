"""Math steps of the vocab-parallel loss, shared by every mode (DESIGN §3).

Each tensor-parallel rank holds `V/tp` columns of the student logits `z` and
teacher logits `u`. One pass over its shard produces a few fp32 statistics per
token, relative to the shard's own maxima; after one all-gather every rank
combines the `[tp, rows, N]` statistics online-softmax style into the global
log-normalisers, the reverse KL and the target log-probs. Nothing here touches
a process group: these functions are pure tensor math, so the collective and
autograd layers (vocab_parallel.py) and any fused kernel can reuse them.

Local statistics, per token and per rank (e = exp(z - max_z) over real columns,
d = (z - max_z) - (u - max_u)):

    Z_MAX, U_MAX       shard maxima of z and u
    Z_SUM, U_SUM       sum e, sum exp(u - max_u)
    Z_DIFF             sum e * d             (-> E_p[z - u])
    Z_TARGET, U_TARGET z_a and u_a where this rank owns a, else 0
    Z_SUM2, Z_DIFF2    sum e^2, sum e^2 * d  (vopd_opt only)

followed, for the top-k modes, by the shard's k largest `z` and their `u`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Z_MAX, U_MAX, Z_SUM, U_SUM, Z_DIFF, Z_TARGET, U_TARGET, Z_SUM2, Z_DIFF2 = range(9)
BASE_ROWS = 7  # rows without the vopd_opt sums
OPT_ROWS = 9


def stat_rows(need_opt: bool, k: int) -> int:
    """Rows of the per-rank statistics tensor: scalars, then k z-values and k u-values."""
    return (OPT_ROWS if need_opt else BASE_ROWS) + 2 * k


def shard_width(vocab_size: int, vocab_start: int, partition_size: int) -> int:
    """Number of real (unpadded) vocabulary columns in a shard."""
    return max(0, min(partition_size, vocab_size - vocab_start))


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are fp32, or fp64 for fp64 inputs (tests of the exact math)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled_fp32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Chunk of logits in fp32 (fp64 stays fp64) divided by the temperature.

    For fp32 input at temperature 1 this is the input itself: callers treat the
    result as read-only and never write into it.
    """
    out = logits.to(stat_dtype(logits.dtype))
    return out / temperature if temperature != 1.0 else out


def local_statistics(zs, us, local_target, owned, need_opt, k, out, cols_out=None):
    """Fill `out [R, n]` with the statistics of one chunk of one shard.

    zs, us: [n, w] fp32 tempered logits of the real columns (w may be 0).
    local_target: [n] column of the target inside the shard (valid where owned).
    owned: [n] bool, this shard holds the target column.
    k: number of top-k candidates to emit (padded with -inf where w < k).
    cols_out: optional [n, min(k, w)] long, receives the candidates' columns.
    """
    n, w = zs.shape
    out.zero_()
    if w == 0:
        out[Z_MAX].fill_(float("-inf"))
        out[U_MAX].fill_(float("-inf"))
        if k:  # no candidates: -inf values, 0 teacher logits
            local_topk(zs, us, k, out[-2 * k :], cols_out)
        return
    z_max = zs.amax(dim=-1)  # [n]
    u_max = us.amax(dim=-1)  # [n]
    # At most three [n, w] fp32 temporaries live at once: d, e and e * d.
    d = us - u_max[:, None]  # [n, w] u - max_u for now
    out[U_SUM] = d.exp().sum(-1)
    e = zs - z_max[:, None]  # [n, w] z - max_z for now
    torch.sub(e, d, out=d)  # [n, w] d = (z - max_z) - (u - max_u)
    e.exp_()  # [n, w] e = exp(z - max_z)
    out[Z_MAX] = z_max
    out[U_MAX] = u_max
    out[Z_SUM] = e.sum(-1)
    out[Z_DIFF] = (e * d).sum(-1)
    idx = local_target.clamp(0, w - 1).unsqueeze(-1)  # [n, 1]
    out[Z_TARGET] = torch.where(owned, zs.gather(-1, idx).squeeze(-1), 0.0)
    out[U_TARGET] = torch.where(owned, us.gather(-1, idx).squeeze(-1), 0.0)
    if need_opt:
        e2 = e.mul_(e)  # [n, w], e is no longer needed
        out[Z_SUM2] = e2.sum(-1)
        out[Z_DIFF2] = (e2 * d).sum(-1)
    if k:
        local_topk(zs, us, k, out[-2 * k :], cols_out)


def local_topk(zs, us, k, out, cols_out=None, u_temperature=1.0):
    """The shard's k largest tempered `z` and their tempered `u` into `out [2k, n]`.

    zs: [n, w] tempered logits of the real columns. us: [n, w] teacher logits
    of the same columns, already tempered (PyTorch path) or raw with
    `u_temperature` (Triton path: only the k gathered values are converted and
    divided, not the whole chunk). Rows past w are -inf (z) and 0 (u).
    cols_out: optional [n, min(k, w)] long, the candidates' columns.
    Shared by the PyTorch path and the Triton path (which has no top-k kernel).
    """
    w = zs.shape[1]
    k_loc = min(k, w)
    out[k_loc:k].fill_(float("-inf"))
    out[k + k_loc :].zero_()
    if k_loc == 0:
        return
    vals, cols = zs.topk(k_loc, dim=-1)  # [n, k_loc]
    out[:k_loc] = vals.t()
    out[k : k + k_loc] = scaled_fp32(us.gather(-1, cols), u_temperature).t()  # [k_loc, n]
    if cols_out is not None:
        cols_out.copy_(cols)


@dataclass
class GlobalStats:
    """Per-token statistics over the whole real vocabulary, all `[N]` fp32."""

    lse_z: torch.Tensor  # log sum exp z
    lse_u: torch.Tensor  # log sum exp u
    kl: torch.Tensor  # K = sum_v p_v (log p_v - log q_v)
    logp: torch.Tensor  # log p(a)
    logq: torch.Tensor  # log q(a)
    s2: torch.Tensor | None = None  # sum_v p_v^2 (vopd_opt)
    p2_dev: torch.Tensor | None = None  # sum_v p_v^2 (r_v - K) (vopd_opt)
    # The log-normalisers split as max + log sum exp(x - max): lse_z rounds at
    # the logits' magnitude (an ulp of 2e-3 at 2e4), so log p = (z - z_max) -
    # z_logsum is exact where z - lse_z is not (the gradient's e_a - p cancels).
    z_max: torch.Tensor | None = None  # max_v z
    z_logsum: torch.Tensor | None = None  # log sum_v exp(z_v - z_max)
    u_max: torch.Tensor | None = None  # max_v u
    u_logsum: torch.Tensor | None = None  # log sum_v exp(u_v - u_max)


def combine_statistics(gathered: torch.Tensor, need_opt: bool) -> GlobalStats:
    """Combine per-rank statistics `[tp, R, N]` into global ones (online softmax)."""
    z_max, u_max = gathered[:, Z_MAX], gathered[:, U_MAX]  # [tp, N]
    gz = z_max.amax(0)  # [N]
    gu = u_max.amax(0)  # [N]
    has = gathered[:, Z_SUM] > 0  # [tp, N] shard holds real columns
    scale = torch.where(has, torch.exp(z_max - gz), 0.0)  # [tp, N]
    z_sum = (scale * gathered[:, Z_SUM]).sum(0)  # [N]
    u_sum = (torch.where(has, torch.exp(u_max - gu), 0.0) * gathered[:, U_SUM]).sum(0)
    # Re-base each shard's d = (z - max_z) - (u - max_u) onto the global maxima.
    shift = torch.where(has, (z_max - gz) - (u_max - gu), 0.0)  # [tp, N]
    z_diff = (scale * (gathered[:, Z_DIFF] + gathered[:, Z_SUM] * shift)).sum(0)
    log_z_sum, log_u_sum = z_sum.log(), u_sum.log()
    lse_z, lse_u = gz + log_z_sum, gu + log_u_sum
    mean_diff = z_diff / z_sum  # E_p[d]; K = E_p[d] - log Z_z + log Z_u
    kl = mean_diff - (log_z_sum - log_u_sum)
    z_a = gathered[:, Z_TARGET].sum(0)  # only the owner contributes
    u_a = gathered[:, U_TARGET].sum(0)
    # Subtract the maximum before the log-sum: z_a - lse_z would carry lse_z's rounding.
    out = GlobalStats(lse_z=lse_z, lse_u=lse_u, kl=kl, logp=(z_a - gz) - log_z_sum, logq=(u_a - gu) - log_u_sum,
                      z_max=gz, z_logsum=log_z_sum, u_max=gu, u_logsum=log_u_sum)
    if need_opt:
        scale2 = scale * scale
        sum2 = (scale2 * gathered[:, Z_SUM2]).sum(0)
        diff2 = (scale2 * (gathered[:, Z_DIFF2] + gathered[:, Z_SUM2] * shift)).sum(0)
        norm2 = z_sum * z_sum
        out.s2 = sum2 / norm2
        # r_v - K = d_v - E_p[d]: the log-normalisers cancel exactly, which
        # keeps logits of +-1e4 from swamping the fp32 result.
        out.p2_dev = diff2 / norm2 - out.s2 * mean_diff
    return out


def optimal_baseline_from_stats(kl, s2, p2_dev, eps):
    """b* = K - 2 sum_v p_v^2 (r_v - K) / (1 - s2), or K where 1 - s2 <= eps.

    Algebraically the DESIGN form ((1 + s2) K - 2 sum p^2 r) / (1 - s2),
    rewritten around K so that no term of the size of K cancels.
    """
    denom = 1.0 - s2
    safe = denom > eps
    return torch.where(safe, kl - 2.0 * p2_dev / torch.where(safe, denom, torch.ones_like(denom)), kl)


@dataclass
class TopkStats:
    """The student top-k set S of every token, from the gathered candidates."""

    kl: torch.Tensor  # [N] K^k
    lse_z: torch.Tensor  # [N] log sum_{S} exp z
    lse_u: torch.Tensor  # [N] log sum_{S} exp u
    member: torch.Tensor  # [N, tp * k] bool, candidate is in S
    # lse_z = z_max + z_logsum (and for u): log p~ = (z - z_max) - z_logsum
    # keeps its precision at any logit magnitude (see GlobalStats).
    z_max: torch.Tensor | None = None  # [N] max_{S} z
    z_logsum: torch.Tensor | None = None  # [N] log sum_{S} exp(z - z_max)
    u_max: torch.Tensor | None = None  # [N] max_{S} u
    u_logsum: torch.Tensor | None = None  # [N] log sum_{S} exp(u - u_max)


def _log_softmax_parts(x: torch.Tensor):
    """(x - max, max, log sum exp(x - max)) over the last dim; max 0 where a row is all -inf."""
    top = x.amax(-1)  # [N]
    top = torch.where(torch.isinf(top) & (top < 0), 0.0, top)
    shifted = x - top[:, None]  # [N, k]
    return shifted, top, shifted.logsumexp(-1)


def combine_topk(gathered: torch.Tensor, k: int, k_eff: int) -> TopkStats:
    """Global top-k from each rank's k candidates `[tp, R, N]` (last 2k rows)."""
    tp, _, n = gathered.shape
    cand_z = gathered[:, -2 * k : -k].permute(2, 0, 1).reshape(n, tp * k)  # [N, tp*k]
    cand_u = gathered[:, -k:].permute(2, 0, 1).reshape(n, tp * k)  # [N, tp*k]
    sel_z, pos = cand_z.topk(k_eff, dim=-1)  # [N, k_eff]
    sel_u = cand_u.gather(-1, pos)  # [N, k_eff]
    # Renormalise inside S relative to S's maxima: `sel - logsumexp(sel)` loses
    # the small log-probs at large logits (37 % of vopd_topk's gradient at 2e4).
    zs, z_max, z_logsum = _log_softmax_parts(sel_z)
    us, u_max, u_logsum = _log_softmax_parts(sel_u)
    logp_s = zs - z_logsum[:, None]
    logq_s = us - u_logsum[:, None]
    kl = (logp_s.exp() * (logp_s - logq_s)).sum(-1)
    member = torch.zeros_like(cand_z, dtype=torch.bool).scatter_(-1, pos, True)
    return TopkStats(kl=kl, lse_z=z_max + z_logsum, lse_u=u_max + u_logsum, member=member,
                     z_max=z_max, z_logsum=z_logsum, u_max=u_max, u_logsum=u_logsum)


def softmax_minus_onehot(zs, lse_z, coef, local_target, owned, z_max=None):
    """coef * (e_a - p) for one chunk: the sampled-mode gradient wrt tempered logits.

    zs: [n, w] fp32 tempered logits; lse_z, coef: [n]; returns [n, w] fp32.
    z_max: optional [n]; when given, `lse_z` is log sum exp(z - z_max) (GlobalStats'
    z_logsum) and p = exp((z - z_max) - lse_z), exact at any logit magnitude.
    """
    logp = zs - lse_z[:, None] if z_max is None else (zs - z_max[:, None]).sub_(lse_z[:, None])  # [n, w]
    grad = logp.exp_().mul_(-coef[:, None])  # [n, w] = -coef * p
    if grad.shape[1]:
        idx = local_target.clamp(0, grad.shape[1] - 1).unsqueeze(-1)
        grad.scatter_add_(-1, idx, torch.where(owned, coef, 0.0).unsqueeze(-1))
    return grad


def full_kl_gradient(zs, us, stats_rows, coef, maxima=None):
    """coef * p * (log p - log q - K) for one chunk of the real columns.

    stats_rows: (lse_z, lse_u, kl), each [n]; returns [n, w] fp32.
    maxima: optional (z_max, u_max), each [n]; when given, lse_z and lse_u are
    relative to them (GlobalStats' z_logsum, u_logsum), exact at any magnitude.
    """
    lse_z, lse_u, kl = stats_rows
    if maxima is None:
        logp = zs - lse_z[:, None]  # [n, w]
        r = logp - (us - lse_u[:, None])  # [n, w]
    else:
        logp = (zs - maxima[0][:, None]).sub_(lse_z[:, None])  # [n, w]
        r = (us - maxima[1][:, None]).sub_(lse_u[:, None])  # [n, w] log q for now
        torch.sub(logp, r, out=r)  # [n, w] log p - log q
    return logp.exp_().mul_(r.sub_(kl[:, None])).mul_(coef[:, None])
