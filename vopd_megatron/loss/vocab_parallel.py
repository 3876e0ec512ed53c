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
Everything after the all-gather (combine, finiteness check, baselines,
per-token losses and coefficients, the top-k gradient) is per_token.py's,
shared with the fused output-layer loss (fused_output.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import per_token as P
from . import stats as S
from .backend import use_triton
from .config import LossConfig
from .per_token import NonFiniteLogitsError, masked  # noqa: F401 (re-exported: their home before per_token.py)

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
        terms = P.mode_terms(cfg, gathered, local, mask, behavior, old, rank=rank, k=k, width=width,
                             local_target=local_target, owned=owned)

        ctx.cfg, ctx.width, ctx.part, ctx.chunk_elements = cfg, width, part, chunk_elements
        ctx.z_dtype, ctx.consumed, ctx.fused, ctx.zero_masked = z.dtype, False, fused, terms.zero_masked
        if cfg.sampled:
            ctx.save_for_backward(z, *terms.saved)
        elif cfg.mode == "full_kl":
            if fused:
                grad = TK.full_kl_gradient(z, u, terms.st, terms.mask / tau, width, tau)  # [N, V/tp] z.dtype
            else:
                grad = _full_kl_gradient(z, u, terms.st, terms.mask, tau, width, chunk_elements,
                                         terms.zero_masked)  # [N, V/tp] z.dtype
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(*terms.saved, cols)
        ctx.mark_non_differentiable(*[t for t in terms.outputs[1:] if t is not None])
        return terms.outputs

    @staticmethod
    def backward(ctx, grad_loss, *_):
        cfg = ctx.cfg
        if cfg.sampled:
            z, z_max, z_logsum, coef, local_target, owned = ctx.saved_tensors
            c = P.sampled_row_coef(grad_loss, coef, cfg.temperature)  # [N]
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
                dz[rows, : ctx.width] = P.zero_dead_rows_(g, coef[rows], ctx.zero_masked)
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
            *saved, cols = ctx.saved_tensors
            dz = torch.zeros(cols.shape[0], ctx.part, dtype=ctx.z_dtype, device=cols.device)
            if cols.shape[1]:
                g = P.topk_kl_candidate_grad(tuple(saved), grad_loss, cfg.temperature)  # [N, k_loc]
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
        grad[rows, :width] = P.zero_dead_rows_(g, coef[rows], zero_masked)
    return grad
