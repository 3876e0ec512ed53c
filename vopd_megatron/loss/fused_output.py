"""The vocab-parallel OPD / vOPD loss fused with both models' output layers (issue 15).

The logits path (vocab_parallel.py) needs each model's `[N, V/tp]` logit
shard in memory: at N = 8192 and V = 151936 that is 2.5 GB per model in bf16
(5 GB in the fp32 that Float16Module hands to the loss), plus the student's
logit gradient. Every statistic of the loss is a per-row reduction over the
vocabulary, so the shards never need to exist: this Function takes the final
hidden states and output-layer weights of both models on the last pipeline
stage -- `h_s [N, H_s]`, `W_s [V/tp, H_s]`, `h_t [N, H_t]`, `W_t [V/tp, H_t]`
(a column-parallel rank's weight shard is exactly its vocabulary slice) --
and streams vocabulary tiles (fused_steps.tiles):

* forward: per tile, `z = h_s W_s[cols]^T / tau` and `u = h_t W_t[cols]^T / tau`
  (fp32 GEMM results), the tile's statistics rows (stats.local_statistics),
  folded into the running `[R, N]` rows (fused_steps.fold_statistics); the
  top-k modes fold the tile's candidates as well. Then exactly what the
  logits path does: one all-gather of `[tp, R, N]` and per_token.mode_terms,
  the logits path's own code (combine, finiteness check, baselines,
  per-token losses and coefficients, saved rows), so values, metrics,
  precision and masking are the same;
* backward: the student tiles are recomputed (one more GEMM per tile), the
  logit gradient `g [n, w]` of the mode is formed (stats.softmax_minus_onehot,
  stats.full_kl_gradient -- which also recomputes the teacher tile -- or
  per_token.topk_kl_candidate_grad scattered into the tile), rounded to the
  weights' dtype as the logits path's gradient is, into a buffer holding a
  group of consecutive tiles (fused_steps.grad_group); then two GEMMs per
  group accumulate `dh_s += g W_s[cols]` (a GEMM adding into the fp32
  accumulator) and `dW_s[cols] = g^T h_s`.
  The teacher gets no gradient. Rows of masked tokens are exactly 0 in `g`;
  when one of them may hold a non-finite hidden state (the finiteness check
  saw one, or `check_inputs` is off) the wgrad reads a copy of `h_s` with
  those rows zeroed, since `0 * NaN` in `g^T h_s` is NaN.

Saved for backward: references to the four inputs (no copies: they are
activations and parameters that exist anyway) and `[N]` / `[N, k]` tensors.
Never alive: more than one tile's `[n, w]` fp32 buffers (about five of them,
`TILE_ELEMENTS` each) and the backward's gradient group (two tiles' bytes). The weight gradient is one full `[V/tp, H_s]` tensor,
returned through autograd so Megatron's DDP hooks accumulate it into the
gradient buffer as they do for the output layer's own backward.

Backends: "torch" runs the tiles as above. "triton" keeps the torch GEMMs
(cuBLAS on a GPU) for the logit tiles and replaces the PyTorch steps on
them with one kernel per tile, the logits path's own (triton_kernels.py):
the statistics kernel folding the tile into the running rows, the gradient
kernels writing `g` in the weights' dtype. With gemm="triton"
(VOPD_FUSED_GEMM, backend.FUSED_GEMMS) the tiles are formed with `tl.dot`
inside the kernels of fused_output_triton.py instead and never written.
The top-k modes always use the torch GEMM tiles in forward (`torch.topk` needs them).
"auto" picks Triton for CUDA tensors.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import fused_steps as F
from . import per_token as P
from . import stats as S
from .api import validate_inputs
from .backend import fused_gemm, use_triton
from .config import LossConfig
from .terms import TokenTerms, reduce_token_terms
from .vocab_parallel import all_gather_stats, group_rank_size


def _local_pass(hs, ws, ht, wt, local_target, owned, cfg, width, k, plan, fused, with_cols, gemm):
    """This shard's `[R, N]` statistics (and `[N, k]` candidate columns for topk_kl).

    On the Triton backend the scalar rows come from torch GEMM tiles folded by
    one kernel each (gemm "torch", and the top-k modes whatever gemm says), or
    from one kernel that forms the tiles with `tl.dot` and never writes them
    (gemm "triton"). Top-k candidates come from `torch.topk` on each tile
    (there is no top-k kernel), folded with the running ones.
    """
    n = hs.shape[0]
    need_opt, tau = cfg.mode == "vopd_opt", cfg.temperature
    rows_r = S.stat_rows(need_opt, k)
    local = F.empty_statistics(rows_r, n, k, S.stat_dtype(hs.dtype), hs.device)  # [R, N]
    target = torch.where(owned, local_target, -1)  # [N] shard column of the target, -1 where not owned
    if fused and gemm == "triton" and not k:
        from . import fused_output_triton as TF

        TF.fused_statistics(hs, ws, ht, wt, target, width, tau, need_opt, local)
        return local, None
    if fused:
        from . import triton_kernels as TK
    cols = torch.full((n, k), -1, dtype=torch.long, device=hs.device) if with_cols else None
    tile = torch.empty_like(local)  # [R, n] per tile, reused
    tile_cols = torch.empty(n, k, dtype=torch.long, device=hs.device) if with_cols else None
    for c, rows, _, _ in F.tiles(n, width, *plan):
        chunk = rows.stop - rows.start
        t, tc = tile[:, :chunk], None if tile_cols is None else tile_cols[:chunk]
        if fused:  # one kernel folds both tiles into the running rows (it tempers them itself)
            zs = F.mm_f32(hs[rows], ws[c].t())  # [n, w] fp32, untempered
            us = F.mm_f32(ht[rows], wt[c].t())  # [n, w]
            TK.shard_statistics(zs, us, F.tile_target(target[rows], c), zs.shape[1], tau, need_opt, local[:, rows],
                                fold=True)
            if k:
                F.tile_topk(zs, us, k, tau, t[-2 * k :], tc)
        else:
            zs = F.logit_tile(hs[rows], ws[c], tau)  # [n, w] fp32
            us = F.logit_tile(ht[rows], wt[c], tau)  # [n, w] fp32
            lt = local_target[rows] - c.start  # [n] target column inside the tile
            F.tile_statistics(zs, us, lt, owned[rows] & (lt >= 0) & (lt < zs.shape[1]), need_opt, k, t, tc)
            F.fold_statistics(local[:, rows], t, need_opt)
        if k:
            if tc is not None:
                tc.add_(torch.where(tc >= 0, c.start, 0))  # tile columns -> shard columns
            F.fold_topk(local[-2 * k :, rows], t[-2 * k :], k, None if cols is None else cols[rows], tc)
        del zs, us
    return local, cols


class FusedOutputOPDLoss(torch.autograd.Function):
    """Per-token OPD-family losses from both models' hidden states and output-layer shards.

    forward(h_s [N, H_s], W_s [P, H_s], h_t [N, H_t], W_t [P, H_t], targets [N],
            mask [N], behavior [N] | None, old [N] | None, config, vocab_size,
            group, plan = (tile_elements, tile_width | None), reduce_hidden_grad,
            gemm = "torch" | "triton" (backend.FUSED_GEMMS))
    returns the same 9 per-token tensors as VocabParallelOPDLoss; only
    token_loss is differentiable, wrt h_s and W_s.
    """

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, targets, mask, behavior, old, cfg: LossConfig, vocab_size, group, plan,
                reduce_hidden_grad, gemm):
        part = ws.shape[0]
        rank, size = group_rank_size(group)
        start = rank * part
        width = S.shard_width(vocab_size, start, part)
        k = min(cfg.top_k, vocab_size) if cfg.needs_topk else 0
        local_target = targets - start  # [N]
        owned = (local_target >= 0) & (local_target < width)  # [N]
        fused = use_triton(cfg.backend, hs)
        local, cols = _local_pass(hs, ws, ht, wt, local_target, owned, cfg, width, k, plan, fused,
                                  with_cols=cfg.mode == "topk_kl", gemm=gemm)
        gathered = all_gather_stats(local, group, size)  # [tp, R, N]: the one collective
        # From here on the logits path's own code: the same per-token math, saved rows and checks.
        terms = P.mode_terms(cfg, gathered, local, mask, behavior, old, rank=rank, k=k, width=width,
                             local_target=local_target, owned=owned)

        ctx.cfg, ctx.width, ctx.plan, ctx.fused, ctx.zero_masked = cfg, width, plan, fused, terms.zero_masked
        ctx.gemm = gemm
        ctx.group = group if reduce_hidden_grad and size > 1 else None
        inputs = (hs, ws, ht, wt) if cfg.mode == "full_kl" else (hs, ws)  # references: tiles are recomputed
        extra = (cols[:, : min(k, width)].contiguous(),) if cfg.mode == "topk_kl" else ()  # [N, k_loc] shard columns
        ctx.save_for_backward(*inputs, *terms.saved, *extra)
        ctx.mark_non_differentiable(*[t for t in terms.outputs[1:] if t is not None])
        return terms.outputs

    @staticmethod
    def backward(ctx, grad_loss, *_):
        cfg, saved = ctx.cfg, ctx.saved_tensors
        hs, ws = saved[0], saved[1]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 12
        if not (need_h or need_w):
            return (None, None) + none
        grad_tile, row_coef = _grad_tile_fn(cfg, saved, grad_loss, ctx.fused, ctx.zero_masked, ctx.gemm)
        n, hidden = hs.shape
        acc_dtype = S.stat_dtype(hs.dtype)
        dh = torch.zeros(n, hidden, dtype=acc_dtype, device=hs.device) if need_h else None  # [N, H_s]
        dw = torch.zeros_like(ws) if need_w else None  # [P, H_s]; padded rows stay 0
        # The gradient rows of masked tokens are 0, but their hidden states may not be
        # finite (0 * NaN in g^T h): the wgrad reads h with those rows zeroed.
        hs_w = hs.masked_fill((row_coef == 0)[:, None], 0.0) if need_w and ctx.zero_masked else hs  # [N, H_s]
        # Groups of vocabulary tiles (fused_steps.grad_group): each tile's gradient is
        # written into one buffer, then one dgrad and one wgrad GEMM take the group.
        buf = dw_acc = None
        for c, rows, first, last, subs in F.grad_tiles(n, ctx.width, *ctx.plan, F.grad_group(hs.dtype)):
            size = (rows.stop - rows.start) * (c.stop - c.start)
            buf = hs.new_empty(size) if buf is None else buf  # the first group is the largest
            g = buf[:size].view(rows.stop - rows.start, -1)  # [n, W]
            for sub in subs:  # [n, w] each, rounded to the weights' dtype like the logits path's dz
                grad_tile(sub, rows, g[:, sub.start - c.start : sub.stop - c.start])
            if need_h:
                F.add_mm_(dh[rows], g, ws[c])  # [n, H_s] += [n, W] @ [W, H_s]
            if need_w:
                if first and last:  # one row chunk: straight into the weight gradient
                    F.mm_into(dw[c], g.t(), hs_w[rows])  # [W, H_s]
                else:
                    part = F.mm_f32(g.t(), hs_w[rows])  # [W, H_s]
                    dw_acc = part if first else dw_acc.add_(part)
                    if last:
                        dw[c] = dw_acc
            del g
        if dh is not None and ctx.group is not None:  # every rank's columns contribute to dh
            dist.all_reduce(dh, group=ctx.group)
        return (None if dh is None else dh.to(hs.dtype), dw) + none


def _grad_tile_fn(cfg, saved, grad_loss, fused, zero_masked, gemm):
    """(`grad_tile(cols, rows, out)`: writes d loss / d raw student logits of one
    tile into `out [n, w]` (the weights' dtype, unit column stride); `[N]` row
    coefficients, 0 on masked tokens, whose rows the tiles zero)."""
    tau = cfg.temperature
    hs, ws = saved[0], saved[1]
    if fused:  # Triton is imported only when its kernels run
        from . import fused_output_triton as TF
        from . import triton_kernels as TK
    if cfg.sampled:
        _, _, z_max, z_logsum, coef, local_target, owned = saved
        c = P.sampled_row_coef(grad_loss, coef, tau)  # [N]
        if fused:
            tgt = torch.where(owned, local_target, -1)  # [N]
            if gemm == "triton":
                def sampled_dot(cols, rows, out):
                    TF.sampled_grad_tile(hs, ws, cols, rows, (z_max, z_logsum), c, tgt, tau, out=out)

                return sampled_dot, c

            def sampled_kernel(cols, rows, out):
                zs = F.mm_f32(hs[rows], ws[cols].t())  # [n, w] fp32 recomputed, untempered
                TK.sampled_gradient(zs, z_logsum[rows], c[rows], F.tile_target(tgt[rows], cols), zs.shape[1], tau,
                                    z_max=z_max[rows], out=out)

            return sampled_kernel, c

        def sampled(cols, rows, out):
            zs = F.logit_tile(hs[rows], ws[cols], tau)  # [n, w] recomputed
            lt = local_target[rows] - cols.start
            in_tile = owned[rows] & (lt >= 0) & (lt < zs.shape[1])
            g = S.softmax_minus_onehot(zs, z_logsum[rows], c[rows], lt, in_tile, z_max=z_max[rows])  # [n, w]
            out.copy_(P.zero_dead_rows_(g, c[rows], zero_masked))

        return sampled, c
    if cfg.mode == "full_kl":
        _, _, ht, wt, z_max, z_logsum, u_max, u_logsum, kl, mask = saved
        c = P.kl_row_coef(grad_loss, mask, tau)  # [N]
        if fused and gemm == "triton":
            stats_rows = (z_max, z_logsum, u_max, u_logsum, kl)

            def full_kl_dot(cols, rows, out):
                TF.full_kl_grad_tile(hs, ws, ht, wt, cols, rows, stats_rows, c, tau, out=out)

            return full_kl_dot, c
        if fused:
            def full_kl_kernel(cols, rows, out):
                zs = F.mm_f32(hs[rows], ws[cols].t())  # [n, w] fp32 recomputed, untempered
                us = F.mm_f32(ht[rows], wt[cols].t())  # [n, w]
                norm = (z_max[rows], z_logsum[rows], u_max[rows], u_logsum[rows])
                TK.full_kl_gradient_rows(zs, us, norm, kl[rows], c[rows], zs.shape[1], tau, out=out)

            return full_kl_kernel, c

        def full_kl(cols, rows, out):
            zs = F.logit_tile(hs[rows], ws[cols], tau)  # [n, w] recomputed
            us = F.logit_tile(ht[rows], wt[cols], tau)  # [n, w] recomputed
            g = S.full_kl_gradient(zs, us, (z_logsum[rows], u_logsum[rows], kl[rows]), c[rows],
                                   maxima=(z_max[rows], u_max[rows]))  # [n, w]
            out.copy_(P.zero_dead_rows_(g, c[rows], zero_masked))

        return full_kl, c
    topk_saved, cols_k = saved[2:-1], saved[-1]
    g = P.topk_kl_candidate_grad(topk_saved, grad_loss, tau)  # [N, k_loc], nothing to recompute
    c = P.kl_row_coef(grad_loss, topk_saved[-1], tau)  # [N]

    def topk(cols, rows, out):
        out.copy_(F.topk_grad_tile(cols_k[rows], g[rows], cols.start, cols.stop - cols.start))

    return topk, c


def _validate(hs, ws, ht, wt, targets, loss_mask, config, vocab_size, tp, behavior, old):
    """The logits path's checks (api.validate_inputs, on zero-stride stand-ins of
    the logit shards: no memory) plus the output-layer shapes."""
    for who, h, w in (("student", hs, ws), ("teacher", ht, wt)):
        if h.dim() < 1 or w.dim() != 2 or h.shape[-1] != w.shape[1]:
            raise ValueError(f"{who} hidden states {tuple(h.shape)} and output weight {tuple(w.shape)} do not "
                             "match: expected [..., H] and [V/tp, H]")
        if h.dtype != w.dtype:
            raise ValueError(f"{who} hidden states ({h.dtype}) and output weight ({w.dtype}) differ in dtype")
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(f"student and teacher output weights hold {ws.shape[0]} and {wt.shape[0]} vocabulary rows: "
                         "the same padded vocabulary shard is required")
    if tuple(hs.shape[:-1]) != tuple(ht.shape[:-1]):
        raise ValueError(f"student and teacher hidden states cover different tokens: {tuple(hs.shape[:-1])} vs "
                         f"{tuple(ht.shape[:-1])}")

    def stand_in(h):
        return torch.zeros((), dtype=h.dtype, device=h.device).expand(*h.shape[:-1], ws.shape[0])

    validate_inputs(stand_in(hs), stand_in(ht), targets, loss_mask, config, vocab_size, tp, behavior, old)


def fused_output_token_terms(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    config: LossConfig,
    *,
    vocab_size: int | None = None,
    group=None,
    behavior_logprobs: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    tile_elements: int = F.TILE_ELEMENTS,
    tile_width: int | None = None,
    reduce_hidden_grad: bool = True,
    gemm: str | None = None,
) -> TokenTerms:
    """Per-token terms from this rank's output-layer shards, without logit shards.

    student_hidden: [..., H_s] final hidden states (after the final norm), the
        ones the output layer would see; student_weight: [V/tp, H_s] this rank's
        output-layer (or tied embedding) shard. Both receive gradients.
    teacher_hidden: [..., H_t]; teacher_weight: [V/tp, H_t]; detached.
    targets, loss_mask, vocab_size, group, behavior/old log-probs: as
        vocab_parallel_token_terms. tile_elements / tile_width: the tile budget
        (fused_steps.tiles); the defaults suit a GPU.
    reduce_hidden_grad: all-reduce the gradient of `student_hidden` over `group`
        (each rank's vocabulary slice contributes to it). Megatron's adapter
        passes False: there the hidden states go through Megatron's own
        copy-to-TP / sequence-parallel gather, whose backward reduces, exactly
        as for ColumnParallelLinear.
    gemm: who forms the logit tiles on the Triton backend (backend.fused_gemm:
        "torch" GEMMs with Triton epilogues, or "triton" `tl.dot` kernels);
        None reads VOPD_FUSED_GEMM, default "torch".
    """
    _, tp = group_rank_size(group)
    gemm = fused_gemm(gemm)
    part = student_weight.shape[0]
    vocab_size = part * tp if vocab_size is None else int(vocab_size)
    _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, loss_mask, config,
              vocab_size, tp, behavior_logprobs, old_logprobs)
    lead = targets.shape
    dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32

    def flat(t):
        return None if t is None else t.reshape(-1).to(dtype)

    outs = FusedOutputOPDLoss.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach(),
        targets.reshape(-1).long(), (loss_mask.reshape(-1) != 0).to(dtype), flat(behavior_logprobs),
        flat(old_logprobs), config, vocab_size, group, (int(tile_elements), tile_width), reduce_hidden_grad, gemm,
    )
    token_loss, mask, logp, logq, kl, baseline, topk_kl, weight, clipped = (
        None if t is None else t.view(lead) for t in outs
    )
    return TokenTerms(token_loss=token_loss, mask=mask, logp=logp, logq=logq, kl=kl,
                      baseline=baseline, topk_kl=topk_kl, rollout_weight=weight, ppo_clipped=clipped,
                      behavior_logprob=None if behavior_logprobs is None else behavior_logprobs.detach())


def fused_output_opd_loss(*args, **kwargs):
    """Megatron's `(loss_sum, num_tokens, metrics)` from output-layer shards
    (arguments of `fused_output_token_terms`); identical on every TP rank."""
    return reduce_token_terms(fused_output_token_terms(*args, **kwargs))
