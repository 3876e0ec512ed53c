"""Triton kernels of the fused output-layer loss with `tl.dot` tiles (VOPD_FUSED_GEMM=triton).

Not the default Triton path: that one (fused_output.py) lets torch's GEMMs
write each fp32 tile and runs one of the logits path's kernels on it. These
kernels form the tiles themselves; the H200 measured them at 2.71x the
logits path (docs/performance.md), their 64 x 128 `tl.dot` blocks far below
cuBLAS. Kept so the benchmark can compare both (`--fused-gemm torch,triton`).

Why they exist: on the PyTorch path each logit tile is written by a GEMM as an fp32
`[n, w]` buffer and then read several times by the statistics steps. Here the
tile never leaves registers:

* `_fused_stats_kernel` -- one program per block of rows and vocabulary
  split walks its columns; per `BLOCK_V` columns it forms the student and teacher
  logit blocks with `tl.dot` over the hidden dimension (fp32 accumulation),
  tempers them, and folds them into the running statistics with
  `triton_kernels._online_update`, the same step the logits kernel uses; the
  target logits are picked out of the block that holds them. Each split
  writes the scalar rows of stats.py for its columns; fused_steps.combine_rows
  joins the splits (a few `[S, R, N]` ops), and the all-gather and the
  combine are shared. The splits exist for parallelism: one program per 64
  rows is only 128 programs at N = 8192. Programs of a split run in step over
  its columns, so a weight block loaded by one is mostly served from L2 to
  the others.
* `_fused_grad_kernel` -- over one vocabulary tile, 2-D blocks recompute the
  student logit block (and the teacher's for `full_kl`) and apply the mode's
  gradient epilogue (`_sampled_grad_values` / `_full_kl_grad_values`, shared
  with the logits kernels), writing the `[n, w]` gradient tile in the weights'
  dtype; the dgrad and wgrad GEMMs run on torch (fused_output.py).

Top-k candidates are not a kernel (as on the logits path): the top-k modes
run their forward on torch GEMM tiles (fused_output._local_pass), which give
`torch.topk` its input and the folding statistics kernel its tiles at once.
fp32 inputs use IEEE fp32 dot products (`input_precision="ieee"`, not TF32),
so fp32 results match the PyTorch path's. Like triton_kernels.py, the
kernels run compiled on CUDA and under `TRITON_INTERPRET=1` on CPU tensors.
Triton 3.7's interpreter computes `tl.dot` of bf16 operands wrongly (errors
of 1e10 on a 16 x 16 product of unit normals, checked), so under the
interpreter (`WIDEN`) both operands are widened to fp32 first: the same
product the compiled bf16 dot forms with fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fused_steps as F
from . import stats as S
from .triton_kernels import (
    _full_kl_grad_values, _online_update, _rows_contiguous, _sampled_grad_values, _store_statistics, _temper,
)


@triton.jit
def _logit_block(h_ptr, w_ptr, r64, c64, row_ok, col_ok, k_dim, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                 WIDEN: tl.constexpr):
    """[BN, BV] fp32 logits h[rows] @ w[cols]^T, accumulated over k_dim in BLOCK_K steps."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = ks < k_dim
        a = tl.load(h_ptr + r64[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + c64[None, :] * stride_w + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if WIDEN:  # the interpreter only: its bf16 / fp16 tl.dot is wrong (see the module docstring)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:  # fp32 operands: full fp32 products, not TF32
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _fused_stats_kernel(
    hs_ptr,  # [N, H_s] student hidden states, read-only
    ws_ptr,  # [P, H_s] student output-layer shard, read-only
    ht_ptr,  # [N, H_t] teacher hidden states, read-only
    wt_ptr,  # [P, H_t] teacher output-layer shard, read-only
    tgt_ptr,  # [N] int64 target column inside the shard, -1 where not owned
    out_ptr,  # [S, R, N] fp32 statistics of each vocabulary split, rows Z_MAX .. U_TARGET (.. Z_DIFF2) written
    n_rows, width, split_width, ks_dim, kt_dim, stride_hs, stride_ws, stride_ht, stride_wt, stride_out,
    stride_split, tau,
    TEMPERED: tl.constexpr, NEED_OPT: tl.constexpr, IEEE_S: tl.constexpr, IEEE_T: tl.constexpr,
    WIDEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < n_rows
    r64 = rows.to(tl.int64)
    m_z = tl.full([BLOCK_N], float("-inf"), tl.float32)
    m_u = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_z = tl.zeros([BLOCK_N], tl.float32)
    s_u = tl.zeros([BLOCK_N], tl.float32)
    dif = tl.zeros([BLOCK_N], tl.float32)
    s_2 = tl.zeros([BLOCK_N], tl.float32)
    dif2 = tl.zeros([BLOCK_N], tl.float32)
    z_a = tl.zeros([BLOCK_N], tl.float32)
    u_a = tl.zeros([BLOCK_N], tl.float32)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)  # [BN]
    first = tl.program_id(1) * split_width  # this program's vocabulary split: [first, stop)
    stop = tl.minimum(first + split_width, width)
    for start in range(first, stop, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # [BV]
        col_ok = cols < stop
        ok = row_ok[:, None] & col_ok[None, :]  # [BN, BV]
        c64 = cols.to(tl.int64)
        z = _logit_block(hs_ptr, ws_ptr, r64, c64, row_ok, col_ok, ks_dim, stride_hs, stride_ws,
                         BLOCK_N, BLOCK_V, BLOCK_K, IEEE_S, WIDEN)
        u = _logit_block(ht_ptr, wt_ptr, r64, c64, row_ok, col_ok, kt_dim, stride_ht, stride_wt,
                         BLOCK_N, BLOCK_V, BLOCK_K, IEEE_T, WIDEN)
        z = _temper(z, tau, TEMPERED)  # [BN, BV]; masked lanes are excluded by `ok`
        u = _temper(u, tau, TEMPERED)
        m_z, m_u, s_z, s_u, dif, s_2, dif2 = _online_update(z, u, ok, m_z, m_u, s_z, s_u, dif, s_2, dif2, NEED_OPT)
        hit = ok & (cols[None, :] == tgt[:, None])  # [BN, BV] the target column, in at most one block
        z_a += tl.sum(tl.where(hit, z, 0.0), axis=1)
        u_a += tl.sum(tl.where(hit, u, 0.0), axis=1)
    out_ptr += tl.program_id(1) * stride_split
    _store_statistics(out_ptr, rows, row_ok, stride_out, m_z, m_u, s_z, s_u, dif, z_a, u_a, s_2, dif2, NEED_OPT)


@triton.jit
def _fused_grad_kernel(
    hs_ptr,  # [n, H_s] student hidden states of the tile's rows, read-only
    ws_ptr,  # [w, H_s] student weight rows of the tile's columns, read-only
    ht_ptr,  # [n, H_t] teacher hidden states (full_kl only), read-only
    wt_ptr,  # [w, H_t] teacher weight rows (full_kl only), read-only
    g_ptr,  # [n, w] gradient tile, written
    max_z_ptr, lse_z_ptr,  # [n] fp32 global max of z / tau and log sum exp(z / tau - max)
    max_u_ptr, lse_u_ptr, kl_ptr,  # [n] fp32 the same of u / tau, and K (full_kl only)
    coef_ptr,  # [n] fp32 per-token coefficient (incoming gradient, mask, 1 / tau folded in)
    tgt_ptr,  # [n] int64 target column inside the tile (sampled modes); any other value: none
    n_rows, width, ks_dim, kt_dim, stride_hs, stride_ws, stride_ht, stride_wt, stride_g,
    tau,
    TEMPERED: tl.constexpr, FULL_KL: tl.constexpr, IEEE_S: tl.constexpr, IEEE_T: tl.constexpr,
    WIDEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # [BV]
    row_ok = rows < n_rows
    col_ok = cols < width
    real = row_ok[:, None] & col_ok[None, :]  # [BN, BV]
    r64 = rows.to(tl.int64)
    c64 = cols.to(tl.int64)
    z = _logit_block(hs_ptr, ws_ptr, r64, c64, row_ok, col_ok, ks_dim, stride_hs, stride_ws,
                     BLOCK_N, BLOCK_V, BLOCK_K, IEEE_S, WIDEN)
    z = _temper(z, tau, TEMPERED)  # [BN, BV] recomputed student logits
    max_z = tl.load(max_z_ptr + rows, mask=row_ok, other=0.0)
    lse_z = tl.load(lse_z_ptr + rows, mask=row_ok, other=0.0)
    c = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    if FULL_KL:
        u = _logit_block(ht_ptr, wt_ptr, r64, c64, row_ok, col_ok, kt_dim, stride_ht, stride_wt,
                         BLOCK_N, BLOCK_V, BLOCK_K, IEEE_T, WIDEN)
        u = _temper(u, tau, TEMPERED)  # [BN, BV] recomputed teacher logits
        max_u = tl.load(max_u_ptr + rows, mask=row_ok, other=0.0)
        lse_u = tl.load(lse_u_ptr + rows, mask=row_ok, other=0.0)
        kl = tl.load(kl_ptr + rows, mask=row_ok, other=0.0)
        g = _full_kl_grad_values(z, u, real, max_z, lse_z, max_u, lse_u, kl, c)
    else:
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        g = _sampled_grad_values(z, real, max_z, lse_z, c, cols[None, :] == tgt[:, None])
    tl.store(g_ptr + r64[:, None] * stride_g + c64[None, :], g.to(g_ptr.dtype.element_ty), mask=real)


# --- launch wrappers --------------------------------------------------------------------

#: (BLOCK_N, BLOCK_V, BLOCK_K) under the CPU interpreter (tests shrink or grow them).
CPU_BLOCKS = (16, 64, 32)
#: Vocabulary splits of the statistics kernel under the interpreter: 2, so the tests cover the split path.
CPU_SPLITS = 2
#: On a GPU: a 64 x 128 GEMM block, 64-deep K steps, 8 warps. Not tuned (no GPU was available).
GPU_BLOCKS = (64, 128, 64)


def _splits(t: torch.Tensor, row_blocks: int, col_blocks: int) -> int:
    """Vocabulary splits of the statistics kernel: enough programs for two per SM on a
    GPU (one program per row block alone leaves most SMs idle at N = 8192)."""
    if not t.is_cuda:
        return max(1, min(CPU_SPLITS, col_blocks))
    sms = torch.cuda.get_device_properties(t.device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, row_blocks), col_blocks))


def _blocks(t: torch.Tensor) -> tuple[int, int, int, int]:
    return (GPU_BLOCKS + (8,)) if t.is_cuda else (CPU_BLOCKS + (1,))


def _ieee(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32


def fused_statistics(hs, ws, ht, wt, local_target, width, temperature, need_opt, out) -> None:
    """Fill the scalar rows of `out [R, N]` from hidden states and weight shards in one kernel.

    hs [N, H_s], ws [P, H_s], ht [N, H_t], wt [P, H_t]: read-only; local_target:
    [N] int64 shard column of the target, -1 where not owned; width: real columns.
    """
    hs, ws, ht, wt = (_rows_contiguous(t) for t in (hs, ws, ht, wt))
    n = hs.shape[0]
    if n == 0:
        return
    assert out.dtype == torch.float32 and out.stride(1) == 1, "statistics rows must be contiguous fp32"
    bn, bv, bk, warps = _blocks(hs)
    row_blocks, col_blocks = triton.cdiv(n, bn), triton.cdiv(max(width, 1), bv)
    splits = _splits(hs, row_blocks, col_blocks)
    r0 = S.OPT_ROWS if need_opt else S.BASE_ROWS
    parts = out[None, :r0] if splits == 1 else torch.empty(splits, r0, n, dtype=out.dtype, device=out.device)
    _fused_stats_kernel[(row_blocks, splits)](
        hs, ws, ht, wt, local_target.contiguous(), parts, n, width, triton.cdiv(col_blocks, splits) * bv,
        hs.shape[1], ht.shape[1], hs.stride(0), ws.stride(0), ht.stride(0), wt.stride(0), parts.stride(1),
        parts.stride(0), float(temperature),
        TEMPERED=temperature != 1.0, NEED_OPT=need_opt, IEEE_S=_ieee(hs), IEEE_T=_ieee(ht),
        WIDEN=not hs.is_cuda, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps,
    )
    if splits > 1:  # the splits are disjoint column sets: fold them as tiles are folded
        F.combine_rows(parts, need_opt, out[:r0])


def _grad_tile(hs, ws, ht, wt, cols, rows, stats_rows, coef, tgt, temperature, full_kl, out=None):
    """Launch the gradient kernel on one tile; stats_rows: (z_max, z_logsum) or, for
    full_kl, (z_max, z_logsum, u_max, u_logsum, kl), each [N]. out: an `[n, w]` view
    with unit column stride to write into (else a new tensor)."""
    h, w = _rows_contiguous(hs[rows]), _rows_contiguous(ws[cols])
    n, width = h.shape[0], w.shape[0]
    g = torch.empty(n, width, dtype=hs.dtype, device=hs.device) if out is None else out  # [n, w]
    assert g.shape == (n, width) and g.stride(1) == 1, (tuple(g.shape), g.stride())
    if n == 0 or width == 0:
        return g
    h_t = _rows_contiguous(ht[rows]) if full_kl else h
    w_t = _rows_contiguous(wt[cols]) if full_kl else w
    bn, bv, bk, warps = _blocks(h)
    vec = [t[rows].float().contiguous() for t in stats_rows]  # [n] each
    vec += vec[:2] + vec[:1] if not full_kl else []  # unread stand-ins for u's rows and K
    _fused_grad_kernel[(triton.cdiv(n, bn), triton.cdiv(width, bv))](
        h, w, h_t, w_t, g, *vec, coef[rows].float().contiguous(),
        tgt, n, width, h.shape[1], h_t.shape[1], h.stride(0), w.stride(0), h_t.stride(0), w_t.stride(0),
        g.stride(0), float(temperature), TEMPERED=temperature != 1.0, FULL_KL=full_kl,
        IEEE_S=_ieee(h), IEEE_T=_ieee(h_t), WIDEN=not h.is_cuda, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps,
    )
    return g


def sampled_grad_tile(hs, ws, cols, rows, z_norm, coef, local_target, temperature, out=None) -> torch.Tensor:
    """`coef (e_a - p)` of one tile `[n, w]` in hs's dtype, the student tile recomputed.

    cols, rows: slices of the shard and the tokens; z_norm: (z_max, z_logsum), [N]
    fp32 each (p = exp((z - z_max) - z_logsum)); coef: [N] fp32 (carries the
    incoming gradient and 1 / tau; rows with 0 get 0); local_target: [N] shard
    column of the target, -1 where not owned; out: as `_grad_tile`.
    """
    tgt = F.tile_target(local_target[rows], cols)  # [n]
    return _grad_tile(hs, ws, None, None, cols, rows, z_norm, coef, tgt, temperature, False, out)


def full_kl_grad_tile(hs, ws, ht, wt, cols, rows, stats_rows, coef, temperature, out=None) -> torch.Tensor:
    """`coef p (log p - log q - K)` of one tile `[n, w]` in hs's dtype, both tiles recomputed.

    stats_rows: (z_max, z_logsum, u_max, u_logsum, kl), each [N] fp32, the log-sums
    relative to the maxima; coef: [N] = incoming gradient * mask / tau (rows with 0 get 0).
    """
    return _grad_tile(hs, ws, ht, wt, cols, rows, stats_rows, coef, coef, temperature, True, out)  # coef: no target
