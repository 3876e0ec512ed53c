"""The vocab-parallel OPD / vOPD loss as one autograd.Function (DESIGN §3).

Each tensor-parallel rank passes its `[..., V/tp]` shard of the student and
teacher logits. The forward makes one pass over the shard per token chunk
(stats.local_statistics), one all-gather of the `[tp, R, N]` statistics, and
combines them into per-token losses. Nothing is written into the inputs.

Why one all-gather rather than Megatron's all-reduce pair: every statistic is
relative to its shard's maxima, so the ranks need each other's maxima *and*
sums to combine them; gathering `R` fp32 rows per token (R = 7, 9 for
vopd_opt, + 2k for the top-k modes, whose candidates ride along) costs one
latency instead of two, and the top-k selection needs the gathered candidates
anyway. At tp = 1 the collective is skipped; the code path is the same.

What is kept for backward, beyond `[N]`-sized per-token tensors:

* sampled modes: a reference to the student shard itself (no copy); the
  backward recomputes p from it and the saved max and log-sum of z, writing
  `dz = g * coef * (e_a - p) / tau` chunk by chunk;
* full_kl: the backward needs the teacher too, so the forward writes the
  gradient `p (log p - log q - K) / tau` once, in the student's dtype, and keeps
  that instead of either input (the same bytes as the student shard);
* topk_kl: only the `[N, k]` candidates of this shard.

No `[N, V/tp]` fp32 buffer outlives a chunk, and the teacher shard is never
referenced after the forward.

The passes over the shards run either as PyTorch chunks (stats.py) or as the
fused Triton kernels of triton_kernels.py (`LossConfig.backend`; "auto" picks
Triton for CUDA tensors). Both fill the same statistics rows and use the same
combine, per-token formulas and saved tensors, so the memory properties
above hold for both; the kernels need no fp32 chunk temporaries at all.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import UserError
from . import stats as S
from .backend import use_triton
from .config import LossConfig

#: Rows per chunk are chosen so one fp32 temporary holds about this many elements.
CHUNK_ELEMENTS = 1 << 24


def group_rank_size(group) -> tuple[int, int]:
    """(rank, size) in the tensor-parallel group; (0, 1) without one."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_stats(local: torch.Tensor, group, size: int) -> torch.Tensor:
    """`[R, N]` per rank -> `[tp, R, N]` on every rank: the one collective of a call."""
    if size == 1:
        return local.unsqueeze(0)
    out = local.new_empty((size * local.shape[0],) + tuple(local.shape[1:]))  # [tp*R, N]
    _all_gather_single(out, local.contiguous(), group=group)
    return out.view((size,) + tuple(local.shape))


# torch >= 2.13 names it all_gather_single and deprecates the older name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _row_chunks(n: int, width: int, chunk_elements: int):
    step = max(1, chunk_elements // max(1, width))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _sampled_coefficients(cfg, st, baseline, mask, behavior, old):
    """Per-token loss value and its derivative wrt log p(a), for sampled modes.

    Mirrors reference.reference_token_terms with the derivative written out.
    Returns (token_loss, coef, weight, clipped, mask), all [N] fp32.
    """
    cost = st.logp - st.logq - baseline  # r_t - b_t
    weight, clipped = _rollout_weight(cfg, st.logp, behavior, old), None
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


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values * mask, exactly 0 where the mask is 0 (a non-finite masked token
    must not turn the sum into NaN, as `values * 0` would)."""
    return torch.where(mask != 0, values * mask, 0.0)


def _rollout_weight(cfg, logp, behavior, old):
    """Truncated IS weight min(p/mu, C), or the keep flag (ratio <= C); None if off."""
    if cfg.rollout_correction is None:
        return None
    proximal = logp if old is None else old
    ratio_mu = torch.exp(proximal - behavior)
    if cfg.rollout_correction == "truncate":
        return ratio_mu.clamp(max=cfg.rollout_correction_cap)
    return (ratio_mu <= cfg.rollout_correction_cap).to(ratio_mu.dtype)


class VocabParallelOPDLoss(torch.autograd.Function):
    """Per-token OPD-family losses from vocab-parallel shards.

    forward(student [N, V/tp], teacher [N, V/tp], targets [N], mask [N] fp32,
            behavior [N] | None, old [N] | None, config, vocab_size, group,
            chunk_elements)
    returns (token_loss [N], mask [N], logp [N], logq [N], kl [N],
             baseline [N], topk_kl [N] | None, weight [N] | None,
             clipped [N] | None); only token_loss is differentiable.
    """

    @staticmethod
    def forward(ctx, z, u, targets, mask, behavior, old, cfg: LossConfig, vocab_size, group, chunk_elements):
        n, part = z.shape
        rank, size = group_rank_size(group)
        start = rank * part
        width = S.shard_width(vocab_size, start, part)
        tau = cfg.temperature
        need_opt = cfg.mode == "vopd_opt"
        k = min(cfg.top_k, vocab_size) if cfg.needs_topk else 0
        local_target = targets - start  # [N]
        owned = (local_target >= 0) & (local_target < width)  # [N]

        local = torch.empty(S.stat_rows(need_opt, k), n, dtype=S.stat_dtype(z.dtype), device=z.device)  # [R, N]
        k_loc = min(k, width)
        cols = torch.empty(n, k_loc, dtype=torch.long, device=z.device) if cfg.mode == "topk_kl" else None
        fused = use_triton(cfg.backend, z)
        if fused:
            from . import triton_kernels as TK

            owned_col = torch.where(owned, local_target, -1)  # [N] -1: target on another rank
            TK.shard_statistics(z, u, owned_col, width, tau, need_opt, local)
            if k:  # no Triton top-k: one more read of z (and a gather of u) per chunk
                for rows in _row_chunks(n, width, chunk_elements):
                    S.local_topk(S.scaled_fp32(z[rows, :width], tau), u[rows, :width], k,
                                 local[-2 * k :, rows], None if cols is None else cols[rows], u_temperature=tau)
        else:
            for rows in _row_chunks(n, width, chunk_elements):
                S.local_statistics(
                    S.scaled_fp32(z[rows, :width], tau), S.scaled_fp32(u[rows, :width], tau),
                    local_target[rows], owned[rows], need_opt, k, local[:, rows],
                    None if cols is None else cols[rows],
                )
        gathered = all_gather_stats(local, group, size)  # [tp, R, N]
        st = S.combine_statistics(gathered, need_opt)
        topk = S.combine_topk(gathered, k, k) if k else None
        # Rows whose gradient must be zeroed explicitly: masked tokens with
        # non-finite logits (0 * NaN is NaN). Unknown without the check: all masked rows.
        zero_masked = _check_finite(st, mask) if cfg.check_inputs else True
        baseline = {
            "opd": torch.zeros_like(st.kl),
            "vopd_topk": topk.kl if topk is not None else None,
            "vopd_opt": S.optimal_baseline_from_stats(st.kl, st.s2, st.p2_dev, cfg.baseline_eps(st.kl.dtype))
            if need_opt else None,
        }.get(cfg.mode, st.kl)

        ctx.cfg, ctx.width, ctx.part, ctx.chunk_elements = cfg, width, part, chunk_elements
        ctx.z_dtype, ctx.consumed, ctx.fused, ctx.zero_masked = z.dtype, False, fused, zero_masked
        weight = clipped = None
        if cfg.sampled:
            token_loss, coef, weight, clipped, mask = _sampled_coefficients(cfg, st, baseline, mask, behavior, old)
            ctx.save_for_backward(z, st.z_max, st.z_logsum, coef, local_target, owned)
        else:
            if cfg.rollout_correction is not None:
                weight = _rollout_weight(cfg, st.logp, behavior, old)
                if cfg.rollout_correction == "mask":
                    mask = mask * weight
            if cfg.mode == "full_kl":
                token_loss = masked(st.kl, mask)
                if fused:
                    grad = TK.full_kl_gradient(z, u, st, mask / tau, width, tau)  # [N, V/tp] z.dtype
                else:
                    grad = _full_kl_gradient(z, u, st, mask, tau, width, chunk_elements, zero_masked)  # [N, V/tp]
                ctx.save_for_backward(grad)
            else:
                token_loss = masked(topk.kl, mask)
                member = topk.member[:, rank * k : rank * k + k_loc]  # [N, k_loc] this shard's picks
                cand = local[-2 * k :].t()  # [N, 2k] this shard's candidate z and u
                ctx.save_for_backward(cand[:, :k_loc].contiguous(), cand[:, k : k + k_loc].contiguous(),
                                      member, cols, topk.z_max, topk.z_logsum, topk.u_max, topk.u_logsum,
                                      topk.kl, mask)
        aux = (mask, st.logp, st.logq, st.kl, baseline,
               None if topk is None else topk.kl, weight, clipped)
        ctx.mark_non_differentiable(*[t for t in aux if t is not None])
        return (token_loss,) + aux

    @staticmethod
    def backward(ctx, grad_loss, *_):
        cfg = ctx.cfg
        if cfg.sampled:
            z, z_max, z_logsum, coef, local_target, owned = ctx.saved_tensors
            c = grad_loss.to(coef.dtype) * coef / cfg.temperature  # [N]
            if ctx.fused:
                from . import triton_kernels as TK

                owned_col = torch.where(owned, local_target, -1)  # [N]
                dz = TK.sampled_gradient(z, z_logsum, c, owned_col, ctx.width, cfg.temperature, z_max=z_max)
                return (dz,) + (None,) * 9
            dz = torch.empty_like(z)  # [N, V/tp]
            dz[:, ctx.width:].zero_()
            for rows in _row_chunks(z.shape[0], ctx.width, ctx.chunk_elements):
                zs = S.scaled_fp32(z[rows, : ctx.width], cfg.temperature)
                g = S.softmax_minus_onehot(zs, z_logsum[rows], c[rows], local_target[rows], owned[rows],
                                           z_max=z_max[rows])  # [n, w]
                if ctx.zero_masked:
                    g.masked_fill_((coef[rows] == 0)[:, None], 0.0)
                dz[rows, : ctx.width] = g
        elif cfg.mode == "full_kl":
            # Scaled in place, as Megatron's cross entropy does with its saved
            # softmax: no second [N, V/tp] buffer. The graph is therefore
            # single-use (retain_graph with a second backward is refused).
            if ctx.consumed:
                raise RuntimeError("full_kl backward ran twice; its saved gradient is scaled in place")
            ctx.consumed = True
            (grad,) = ctx.saved_tensors
            # In at least fp32 (fp64 stays fp64), rounded once to the gradient's dtype.
            dz = grad.mul_(grad_loss.to(torch.promote_types(grad.dtype, torch.float32))[:, None])
        else:
            cz, cu, member, cols, z_max, z_logsum, u_max, u_logsum, kl_s, mask = ctx.saved_tensors
            dz = torch.zeros(cz.shape[0], ctx.part, dtype=ctx.z_dtype, device=cz.device)
            if cols.shape[1]:
                logp = (cz - z_max[:, None]) - z_logsum[:, None]  # [N, k_loc] log p~
                r = logp - ((cu - u_max[:, None]) - u_logsum[:, None])  # log p~ - log q~
                c = (grad_loss.to(mask.dtype) * mask / cfg.temperature)[:, None]
                g = torch.where((c != 0) & member, logp.exp() * (r - kl_s[:, None]) * c, 0.0)  # [N, k_loc]
                dz.scatter_(1, cols, g.to(dz.dtype))
        return (dz,) + (None,) * 9


def _full_kl_gradient(z, u, st, mask, tau, width, chunk_elements, zero_masked=True):
    """mask * p (log p - log q - K) / tau for every column, in z's dtype."""
    grad = torch.zeros_like(z)  # [N, V/tp]
    coef = mask / tau
    for rows in _row_chunks(z.shape[0], width, chunk_elements):
        zs = S.scaled_fp32(z[rows, :width], tau)
        us = S.scaled_fp32(u[rows, :width], tau)
        g = S.full_kl_gradient(zs, us, (st.z_logsum[rows], st.u_logsum[rows], st.kl[rows]), coef[rows],
                               maxima=(st.z_max[rows], st.u_max[rows]))  # [n, w]
        if zero_masked:
            g.masked_fill_((coef[rows] == 0)[:, None], 0.0)
        grad[rows, :width] = g
    return grad


def _check_finite(st, mask) -> bool:
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
    row_bad = student | teacher
    flags = torch.stack([(student & live).any(), (teacher & live).any(), (row_bad & ~live).any()]).tolist()
    for name, bad, hint in (("student", student, "a diverged student (check the learning rate and the last "
                                                  "checkpoint)"),
                            ("teacher", teacher, "check the teacher checkpoint and its vocabulary padding")):
        if flags[0 if name == "student" else 1]:
            rows = (bad & live).nonzero().flatten()
            raise NonFiniteLogitsError(
                f"non-finite {name} logits on real vocabulary columns (token rows {rows[:5].tolist()}"
                f"{'...' if rows.numel() > 5 else ''}); {hint}", model=name, token_rows=rows.tolist())
    return bool(flags[2])


def _check_teacher_finite(st, mask=None) -> bool:
    """The former name of `_check_finite` (which now names the student too); all rows live without a mask."""
    return _check_finite(st, torch.ones_like(st.kl) if mask is None else mask)


class NonFiniteLogitsError(UserError, ValueError):
    """Student or teacher logits that are NaN or infinite on a live token (a
    diverged student, a broken teacher checkpoint): a fault of the run's
    inputs, reported as one line by the entry points.

    model: "student" or "teacher"; token_rows: flat indices into the loss
    call's leading dims (e.g. b * s + t for [b, s] targets)."""

    def __init__(self, message: str, *, model: str, token_rows: list[int]):
        super().__init__(message)
        self.model, self.token_rows = model, token_rows
