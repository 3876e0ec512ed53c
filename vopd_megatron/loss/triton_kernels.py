"""Fused Triton kernels of the vocab-parallel loss (DESIGN §3, docs/performance.md).

Why kernels at all: the PyTorch path (stats.py) is correct everywhere but
materialises several `[n, w]` fp32 temporaries per chunk and reads each shard
more than once. On a GPU the loss is bound by memory traffic, and the floor is
reading `z` and `u` once in forward and reading `z` / writing `dz` once in
backward. These kernels do exactly that for the sampled modes:

* `shard_statistics` -- one pass over a block of rows of both shards: online
  max / sum-exp of the tempered student and teacher logits, the KL
  accumulator `sum e (d)` re-based whenever a running maximum moves, the
  `vopd_opt` sums `sum e^2`, `sum e^2 d`, and the target logits. It fills the
  same `[R, N]` rows as `stats.local_statistics`, so the all-gather and the
  online-softmax combine (`stats.combine_statistics`) are shared with the
  PyTorch path and cannot drift from it.
* `sampled_gradient` -- `dz = c_t (e_a - p)` from the saved max and log-sum of z and
  per-token coefficient, one read of `z` and one write of `dz`; padded columns
  get exact zeros.
* `full_kl_gradient` -- `c_t p (log p - log q - K)`, written in forward (the
  teacher is needed, and keeping the gradient instead of the teacher shard is
  the memory property of docs/loss.md).

Not here: the top-k candidates of `vopd_topk` / `topk_kl` stay on
`torch.topk` (an extra read of `z` per call); a register-resident top-k for
k up to a few hundred over 10^5 columns is not a reasonable Triton kernel.

Everything accumulates in fp32. Logits are divided by `tau` with IEEE
rounding (`div_rn`, as the PyTorch path divides): a multiply by a rounded
`1 / tau` biases every tempered logit the same way, which at logits of 1e4
cost ten times the reference error of the PyTorch path in the tests. Columns at or
past the shard's real width are never loaded. The kernels run compiled on
CUDA, and on CPU tensors under `TRITON_INTERPRET=1` (the CI tests); the
environment variable must be set before this module is imported, since
`triton.jit` reads it when the kernels are defined.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import backend as B
from . import stats as S


@triton.jit
def _temper(x, tau, TEMPERED: tl.constexpr):
    """x / tau in fp32, correctly rounded; the identity at tau = 1."""
    if TEMPERED:
        x = tl.math.div_rn(x, tau)
    return x


@triton.jit
def _online_update(z, u, ok, m_z, m_u, s_z, s_u, dif, s_2, dif2, NEED_OPT: tl.constexpr):
    """Fold one tile of tempered logits into the running per-row statistics.

    z, u: [BN, BV] fp32 tempered logits; ok: [BN, BV] real lanes (others are
    ignored whatever they hold). The running state, all [BN] fp32: maxima
    m_z, m_u (-inf before any column), sum-exps s_z, s_u, the KL accumulator
    dif = sum e d and, with NEED_OPT, s_2 = sum e^2, dif2 = sum e^2 d, all
    relative to the running maxima. Returns the updated state in that order.
    Shared by the logits kernel below and the fused output-layer kernel
    (fused_output_triton.py), so the two cannot drift apart.
    """
    ninf = float("-inf")
    mz_new = tl.maximum(m_z, tl.max(tl.where(ok, z, ninf), axis=1))  # [BN]
    mu_new = tl.maximum(m_u, tl.max(tl.where(ok, u, ninf), axis=1))  # [BN]
    # Finite stand-ins keep masked lanes and empty rows free of inf - inf.
    mz = tl.where(mz_new > ninf, mz_new, 0.0)  # [BN]
    mu = tl.where(mu_new > ninf, mu_new, 0.0)  # [BN]
    alpha = tl.exp(m_z - mz)  # [BN] rescale of the old e; 0 while m_z = -inf
    beta = tl.exp(m_u - mu)  # [BN]
    # The old d's were relative to (m_z, m_u): re-base them onto the new maxima.
    seen = s_z > 0
    shift = (tl.where(seen, m_z, mz) - mz) - (tl.where(seen, m_u, mu) - mu)  # [BN], 0 before any column
    zc = tl.where(ok, z, mz[:, None]) - mz[:, None]  # [BN, BV] z - max_z, 0 on masked lanes
    uc = tl.where(ok, u, mu[:, None]) - mu[:, None]  # [BN, BV] u - max_u
    e = tl.where(ok, tl.exp(zc), 0.0)  # [BN, BV]
    d = zc - uc  # [BN, BV], 0 on masked lanes
    dif = alpha * (dif + s_z * shift) + tl.sum(e * d, axis=1)
    s_z = alpha * s_z + tl.sum(e, axis=1)
    s_u = beta * s_u + tl.sum(tl.where(ok, tl.exp(uc), 0.0), axis=1)
    if NEED_OPT:
        a2 = alpha * alpha
        e2 = e * e
        dif2 = a2 * (dif2 + s_2 * shift) + tl.sum(e2 * d, axis=1)
        s_2 = a2 * s_2 + tl.sum(e2, axis=1)
    return mz_new, mu_new, s_z, s_u, dif, s_2, dif2


@triton.jit
def _store_statistics(out_ptr, rows, row_ok, stride_out, m_z, m_u, s_z, s_u, dif, z_a, u_a, s_2, dif2,
                      NEED_OPT: tl.constexpr):
    """Write the scalar rows Z_MAX .. U_TARGET (.. Z_DIFF2) of stats.py for a block of rows."""
    base = out_ptr + rows
    tl.store(base + 0 * stride_out, m_z, mask=row_ok)  # Z_MAX
    tl.store(base + 1 * stride_out, m_u, mask=row_ok)  # U_MAX
    tl.store(base + 2 * stride_out, s_z, mask=row_ok)  # Z_SUM
    tl.store(base + 3 * stride_out, s_u, mask=row_ok)  # U_SUM
    tl.store(base + 4 * stride_out, dif, mask=row_ok)  # Z_DIFF
    tl.store(base + 5 * stride_out, z_a, mask=row_ok)  # Z_TARGET
    tl.store(base + 6 * stride_out, u_a, mask=row_ok)  # U_TARGET
    if NEED_OPT:
        tl.store(base + 7 * stride_out, s_2, mask=row_ok)  # Z_SUM2
        tl.store(base + 8 * stride_out, dif2, mask=row_ok)  # Z_DIFF2


@triton.jit
def _load_statistics(out_ptr, rows, row_ok, stride_out, NEED_OPT: tl.constexpr):
    """The scalar rows `_store_statistics` writes, read back as a running state:
    (m_z, m_u, s_z, s_u, dif, z_a, u_a, s_2, dif2), each [BN] fp32."""
    base = out_ptr + rows
    m_z = tl.load(base + 0 * stride_out, mask=row_ok, other=float("-inf"))
    m_u = tl.load(base + 1 * stride_out, mask=row_ok, other=float("-inf"))
    s_z = tl.load(base + 2 * stride_out, mask=row_ok, other=0.0)
    s_u = tl.load(base + 3 * stride_out, mask=row_ok, other=0.0)
    dif = tl.load(base + 4 * stride_out, mask=row_ok, other=0.0)
    z_a = tl.load(base + 5 * stride_out, mask=row_ok, other=0.0)
    u_a = tl.load(base + 6 * stride_out, mask=row_ok, other=0.0)
    s_2 = tl.zeros_like(s_z)
    dif2 = tl.zeros_like(s_z)
    if NEED_OPT:
        s_2 = tl.load(base + 7 * stride_out, mask=row_ok, other=0.0)
        dif2 = tl.load(base + 8 * stride_out, mask=row_ok, other=0.0)
    return m_z, m_u, s_z, s_u, dif, z_a, u_a, s_2, dif2


@triton.jit
def _stats_kernel(
    z_ptr,  # [N, P] student logits (any float dtype), read-only
    u_ptr,  # [N, P] teacher logits, read-only
    tgt_ptr,  # [N] int64 target column inside the shard, -1 where not owned
    out_ptr,  # [R, N] fp32 statistics, rows Z_MAX .. U_TARGET (.. Z_DIFF2) written
    n_rows, width, stride_z, stride_u, stride_out,
    tau,
    TEMPERED: tl.constexpr, NEED_OPT: tl.constexpr, FOLD: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < n_rows
    r64 = rows.to(tl.int64)
    ninf = float("-inf")
    m_z = tl.full([BLOCK_N], ninf, tl.float32)
    m_u = tl.full([BLOCK_N], ninf, tl.float32)
    s_z = tl.zeros([BLOCK_N], tl.float32)  # sum exp(z - m_z)
    s_u = tl.zeros([BLOCK_N], tl.float32)  # sum exp(u - m_u)
    dif = tl.zeros([BLOCK_N], tl.float32)  # sum exp(z - m_z) ((z - m_z) - (u - m_u))
    s_2 = tl.zeros([BLOCK_N], tl.float32)  # sum exp(z - m_z)^2
    dif2 = tl.zeros([BLOCK_N], tl.float32)  # sum exp(z - m_z)^2 ((z - m_z) - (u - m_u))
    z_a0 = tl.zeros([BLOCK_N], tl.float32)
    u_a0 = tl.zeros([BLOCK_N], tl.float32)
    if FOLD:  # continue from the rows of the columns seen before (an earlier tile of the fused output loss)
        m_z, m_u, s_z, s_u, dif, z_a0, u_a0, s_2, dif2 = _load_statistics(out_ptr, rows, row_ok, stride_out, NEED_OPT)
    for start in range(0, width, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # [BV]
        ok = row_ok[:, None] & (cols < width)[None, :]  # [BN, BV]
        z = tl.load(z_ptr + r64[:, None] * stride_z + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + r64[:, None] * stride_u + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        z = _temper(z, tau, TEMPERED)  # [BN, BV]; masked lanes hold 0 and are excluded below
        u = _temper(u, tau, TEMPERED)  # [BN, BV]
        m_z, m_u, s_z, s_u, dif, s_2, dif2 = _online_update(z, u, ok, m_z, m_u, s_z, s_u, dif, s_2, dif2, NEED_OPT)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)  # [BN]
    owned = row_ok & (tgt >= 0) & (tgt < width)
    t_col = tl.where(owned, tgt, 0)
    z_a = tl.load(z_ptr + r64 * stride_z + t_col, mask=owned, other=0.0).to(tl.float32)
    u_a = tl.load(u_ptr + r64 * stride_u + t_col, mask=owned, other=0.0).to(tl.float32)
    z_a = _temper(z_a, tau, TEMPERED)
    u_a = _temper(u_a, tau, TEMPERED)
    _store_statistics(out_ptr, rows, row_ok, stride_out, m_z, m_u, s_z, s_u, dif,
                      z_a0 + tl.where(owned, z_a, 0.0), u_a0 + tl.where(owned, u_a, 0.0), s_2, dif2, NEED_OPT)


@triton.jit
def _sampled_grad_values(zt, real, zmax, lse, c, is_target):
    """c_t (e_a - p) on real lanes of live rows, exact 0 elsewhere: the sampled-mode logit gradient.

    zt: [BN, BV] fp32 tempered logits; real: [BN, BV] lanes of real columns;
    zmax, lse, c: [BN] global max of zt, log sum exp(zt - zmax) and coefficient;
    is_target: [BN, BV] bool. p = exp((zt - zmax) - lse) is exact at any logit
    magnitude, where zt - (zmax + lse) is not. A row with c = 0 (a masked
    token) gets 0 even where its logits are not finite.
    Shared with the fused output-layer kernel (fused_output_triton.py).
    """
    p = tl.exp(tl.where(real, (zt - zmax[:, None]) - lse[:, None], float("-inf")))  # [BN, BV], 0 on padding
    return tl.where(real & (c[:, None] != 0), c[:, None] * (is_target.to(tl.float32) - p), 0.0)


@triton.jit
def _full_kl_grad_values(zt, ut, real, max_z, lse_z, max_u, lse_u, kl, c):
    """c_t p (log p - log q - K) on real lanes of live rows, exact 0 elsewhere: the full_kl logit gradient.

    zt, ut: [BN, BV] fp32 tempered logits; max_z, lse_z, max_u, lse_u, kl, c: [BN],
    each lse relative to its max (log p = (zt - max_z) - lse_z, exact at any
    magnitude). Masked lanes take log p = log q = 0, so no inf reaches the
    arithmetic; a row with c = 0 (a masked token) gets 0 whatever its logits.
    """
    logp = tl.where(real, (zt - max_z[:, None]) - lse_z[:, None], 0.0)  # [BN, BV]
    r = logp - tl.where(real, (ut - max_u[:, None]) - lse_u[:, None], 0.0)  # [BN, BV] log p - log q
    return tl.where(real & (c[:, None] != 0), c[:, None] * tl.exp(logp) * (r - kl[:, None]), 0.0)


@triton.jit
def _sampled_grad_kernel(
    z_ptr,  # [N, P] student logits, read-only
    dz_ptr,  # [N, P] gradient, written (padded columns get 0)
    max_ptr,  # [N] fp32 global max of z / tau (or zeros: lse then absolute)
    lse_ptr,  # [N] fp32 log sum exp(z / tau - max)
    coef_ptr,  # [N] fp32 c_t = g_t coef_t / tau
    tgt_ptr,  # [N] int64 target column inside the shard, -1 where not owned
    n_rows, width, part, stride_z, stride_dz,
    tau,
    TEMPERED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # [BV]
    row_ok = rows < n_rows
    r64 = rows.to(tl.int64)
    real = row_ok[:, None] & (cols < width)[None, :]  # [BN, BV]
    z = tl.load(z_ptr + r64[:, None] * stride_z + cols[None, :], mask=real, other=0.0).to(tl.float32)
    zmax = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    c = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    # tgt < width, so the target is never a padded column.
    g = _sampled_grad_values(_temper(z, tau, TEMPERED), real, zmax, lse, c, cols[None, :] == tgt[:, None])
    out = row_ok[:, None] & (cols < part)[None, :]
    tl.store(dz_ptr + r64[:, None] * stride_dz + cols[None, :], g.to(dz_ptr.dtype.element_ty), mask=out)


@triton.jit
def _full_kl_grad_kernel(
    z_ptr,  # [N, P] student logits, read-only
    u_ptr,  # [N, P] teacher logits, read-only
    g_ptr,  # [N, P] gradient, written (padded columns get 0)
    max_z_ptr, lse_z_ptr, max_u_ptr, lse_u_ptr, kl_ptr,  # [N] fp32 global statistics, lse relative to max
    coef_ptr,  # [N] fp32 mask / tau
    n_rows, width, part, stride_z, stride_u, stride_g,
    tau,
    TEMPERED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # [BV]
    row_ok = rows < n_rows
    r64 = rows.to(tl.int64)
    real = row_ok[:, None] & (cols < width)[None, :]  # [BN, BV]
    z = tl.load(z_ptr + r64[:, None] * stride_z + cols[None, :], mask=real, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r64[:, None] * stride_u + cols[None, :], mask=real, other=0.0).to(tl.float32)
    max_z = tl.load(max_z_ptr + rows, mask=row_ok, other=0.0)
    lse_z = tl.load(lse_z_ptr + rows, mask=row_ok, other=0.0)
    max_u = tl.load(max_u_ptr + rows, mask=row_ok, other=0.0)
    lse_u = tl.load(lse_u_ptr + rows, mask=row_ok, other=0.0)
    kl = tl.load(kl_ptr + rows, mask=row_ok, other=0.0)
    c = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    g = _full_kl_grad_values(_temper(z, tau, TEMPERED), _temper(u, tau, TEMPERED), real, max_z, lse_z, max_u, lse_u,
                             kl, c)
    out = row_ok[:, None] & (cols < part)[None, :]
    tl.store(g_ptr + r64[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=out)


# --- launch wrappers --------------------------------------------------------------------


#: (BLOCK_N, BLOCK_V) under the CPU interpreter, where every program costs
#: Python overhead; tests shrink it to force many row blocks and column tiles.
CPU_BLOCKS = (16, 1024)

#: Launch shapes on a GPU, (BLOCK_N, BLOCK_V, num_warps) per kernel family:
#: "stats" is the row-reduction pass (one row per program, the row loops over
#: its shard in wide column tiles), "grad" the two element-wise gradient kernels
#: (2-D tiles). backend.DEFAULT_GPU_TILES unless VOPD_TRITON_TILES overrides
#: them (read when this module is imported); benchmarks/tile_sweep.py times
#: alternatives.
GPU_BLOCKS = B.env_tiles()


def _blocks(t: torch.Tensor, reduce: bool, blocks: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps): `blocks` if given (the tile sweep), else
    GPU_BLOCKS["stats" | "grad"] on a GPU and CPU_BLOCKS in the interpreter."""
    if blocks is not None:
        return tuple(blocks)
    if not t.is_cuda:
        return CPU_BLOCKS + (1,)
    return GPU_BLOCKS["stats" if reduce else "grad"]


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels index `row * stride + col`: columns must be unit-stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


def shard_statistics(z, u, local_target, width, temperature, need_opt, out, blocks=None, fold=False) -> None:
    """Fill the scalar rows of `out [R, N]` (as stats.local_statistics does) in one fused pass.

    z, u: [N, P] shards (read-only); local_target: [N] int64, -1 where this
    shard does not own the target; width: real columns of the shard.
    The top-k rows, if any, are left to `stats.local_topk`. blocks: launch
    shape (BLOCK_N, BLOCK_V, num_warps) instead of the defaults (`_blocks`).
    fold: `out` already holds the rows of other columns (fused_steps.empty_statistics
    before the first): these columns are folded into them, as fused_steps.fold_statistics
    would, in the same pass (the fused output loss's vocabulary tiles).
    """
    z, u = _rows_contiguous(z), _rows_contiguous(u)
    n = z.shape[0]
    if n == 0:
        return
    assert out.dtype == torch.float32 and out.stride(1) == 1, "statistics rows must be contiguous fp32"
    bn, bv, warps = _blocks(z, reduce=True, blocks=blocks)
    bv = min(bv, max(16, triton.next_power_of_2(max(width, 1))))
    _stats_kernel[(triton.cdiv(n, bn),)](
        z, u, local_target, out, n, width, z.stride(0), u.stride(0), out.stride(0), float(temperature),
        TEMPERED=temperature != 1.0, NEED_OPT=need_opt, FOLD=fold, BLOCK_N=bn, BLOCK_V=bv, num_warps=warps,
    )


def _gradient_tiles(z: torch.Tensor, blocks=None):
    """Launch grid and tile sizes of the element-wise gradient kernels over a
    non-empty [N, P] shard: 2-D tiles, the vocab tile no wider than the shard."""
    n, part = z.shape
    bn, bv, warps = _blocks(z, reduce=False, blocks=blocks)
    bv = min(bv, max(16, triton.next_power_of_2(part)))
    return (triton.cdiv(n, bn), triton.cdiv(part, bv)), bn, bv, warps


def sampled_gradient(z, lse_z, coef, local_target, width, temperature, z_max=None, blocks=None,
                     out_dtype=None, out=None) -> torch.Tensor:
    """dz [N, P] in z's dtype (or out_dtype): coef_t (e_a - p) on real columns, 0 on padding
    and on rows with coef_t = 0.

    coef: [N] fp32, already multiplied by the incoming gradient and 1 / tau.
    z_max: optional [N]; when given, lse_z is log sum exp(z / tau - z_max)
    (GlobalStats' z_logsum), which keeps p exact at any logit magnitude.
    out_dtype: the fused output loss reads fp32 logit tiles and wants the
    gradient in the weights' dtype, rounded once in the kernel. out: write into
    this `[N, P]` view instead (unit column stride; the fused loss's gradient buffer).
    """
    z = _rows_contiguous(z)
    n, part = z.shape
    dz = _gradient_out(out, z, out_dtype)  # [N, P]
    if n == 0 or part == 0:
        return dz.zero_()
    grid, bn, bv, warps = _gradient_tiles(z, blocks)
    _sampled_grad_kernel[grid](
        z, dz, (torch.zeros_like(lse_z) if z_max is None else z_max).float().contiguous(),
        lse_z.float().contiguous(), coef.float().contiguous(), local_target, n, width, part,
        z.stride(0), dz.stride(0), float(temperature), TEMPERED=temperature != 1.0, BLOCK_N=bn, BLOCK_V=bv, num_warps=warps,
    )
    return dz


def full_kl_gradient(z, u, st: S.GlobalStats, coef, width, temperature, blocks=None) -> torch.Tensor:
    """coef_t p (log p - log q - K) [N, P] in z's dtype; 0 on padded columns.

    coef: [N] fp32 = mask / tau. Reads z and u once, writes the gradient once.
    Uses st's max-relative normalisers when it has them (combine_statistics' do).
    """
    return full_kl_gradient_rows(z, u, _normalisers(st), st.kl, coef, width, temperature, blocks)


def full_kl_gradient_rows(z, u, normalisers, kl, coef, width, temperature, blocks=None,
                          out_dtype=None, out=None) -> torch.Tensor:
    """`full_kl_gradient` from explicit `[N]` rows: normalisers = (max_z, lse_z,
    max_u, lse_u), each lse relative to its max; kl = K. The gradient is in z's
    dtype, or out_dtype (the fused output loss: fp32 tiles in, the weights' dtype
    out), or written into `out` as in sampled_gradient."""
    z, u = _rows_contiguous(z), _rows_contiguous(u)
    n, part = z.shape
    g = _gradient_out(out, z, out_dtype)  # [N, P]
    if n == 0 or part == 0:
        return g.zero_()
    grid, bn, bv, warps = _gradient_tiles(z, blocks)
    _full_kl_grad_kernel[grid](
        z, u, g, *(t.float().contiguous() for t in normalisers), kl.float().contiguous(), coef.float().contiguous(),
        n, width, part, z.stride(0), u.stride(0), g.stride(0), float(temperature),
        TEMPERED=temperature != 1.0, BLOCK_N=bn, BLOCK_V=bv, num_warps=warps,
    )
    return g


def _gradient_out(out, z, out_dtype):
    """The gradient kernels' output: `out` when given (checked: z's shape, unit
    column stride: the kernels index `row * stride + col`), else a new tensor."""
    if out is None:
        return torch.empty(z.shape, dtype=out_dtype or z.dtype, device=z.device)
    assert out.shape == z.shape and out.stride(1) == 1, (tuple(out.shape), out.stride())
    return out


def _normalisers(st: S.GlobalStats):
    """(max_z, lse_z, max_u, lse_u), each [N] fp32 contiguous, lse relative to max
    (zeros for max when st carries only the absolute log-normalisers)."""
    if st.z_max is None:
        zero = torch.zeros_like(st.lse_z)
        return zero, st.lse_z.contiguous(), zero, st.lse_u.contiguous()
    return tuple(t.float().contiguous() for t in (st.z_max, st.z_logsum, st.u_max, st.u_logsum))
