"""Math steps of the fused output-layer loss: logit tiles from hidden states, folded statistics.

The fused loss (fused_output.py) never holds a `[N, V/tp]` logit shard. It
walks the shard in vocabulary tiles of `w` columns (and, when `N * w` would
exceed the tile budget, in row chunks), forms each tile's logits with one
GEMM `h [n, H] @ W[cols]^T`, and reduces the tile at once. Everything here is
pure tensor math with no process group, like stats.py, whose steps it reuses:

* `tiles` -- the walk: vocabulary tiles outermost, so a tile's slice of the
  weight gradient `dW[cols] = g^T h` is complete when its row chunks are done;
* `logit_tile` -- `(h @ W[cols]^T) / tau` with fp32 accumulation and an fp32
  result (never rounded to bf16 as the logits path's output layer does);
* `fold_statistics` -- merges the `[R, n]` statistics rows of a new tile into
  the running ones: the same online-softmax re-basing that
  `stats.combine_statistics` applies across ranks, applied across tiles, so
  after the last tile the rank holds exactly the rows `stats.local_statistics`
  would have produced from the whole shard (and the one all-gather, the
  combine and every per-token formula downstream are unchanged);
* `fold_topk` -- a streaming top-k: the running k candidates and the tile's k
  (from `stats.local_topk`) compete, k survive;
* `topk_grad_tile` -- the `topk_kl` gradient is non-zero only at the saved
  candidates; scattered into a dense tile it goes through the same GEMMs.
"""
from __future__ import annotations

import functools

import torch

from . import stats as S

#: Elements of one fp32 logit tile `[n, w]`: 2^23 (32 MiB). About five such
#: buffers are alive at once (z, u and the statistics temporaries).
TILE_ELEMENTS = 1 << 23
#: Narrowest vocabulary tile chosen automatically (GEMM efficiency), columns.
MIN_TILE_WIDTH = 256
#: The backward's gradient buffer, in fp32 tiles' bytes: the gradient `g` of
#: several consecutive vocabulary tiles (4 in bf16, 2 in fp32) is written into it
#: before the dgrad and wgrad GEMMs run once on the whole group. The dgrad GEMM
#: adds into the fp32 `dh [N, H]`, reading and writing all of it each time, so
#: fewer, deeper GEMMs cut that traffic (about 33 GB over 125 tiles at N = 8192,
#: H = 4096, V = 128256, a quarter of it with groups of 4).
GRAD_BUFFER_TILES = 2


def tile_columns(n: int, width: int, tile_elements: int = TILE_ELEMENTS, width_override: int | None = None) -> int:
    """Columns per vocabulary tile: `width_override`, else as many rows as possible
    (all `n` when `n * MIN_TILE_WIDTH <= tile_elements`), never wider than the shard."""
    return width_override or min(width, max(MIN_TILE_WIDTH, tile_elements // max(n, 1)))


def grad_group(dtype: torch.dtype) -> int:
    """Vocabulary tiles per backward GEMM group for gradients of `dtype` (GRAD_BUFFER_TILES)."""
    return max(1, GRAD_BUFFER_TILES * 4 // torch.empty((), dtype=dtype).element_size())


def grad_tiles(n: int, width: int, tile_elements: int, width_override: int | None, group: int):
    """`tiles` of `group` vocabulary tiles at once, with the same row chunks: yields
    `(cols, rows, first, last, subs)`, `subs` the tile-wide column slices of `cols`."""
    w = tile_columns(n, width, tile_elements, width_override)
    for cols, rows, first, last in tiles(n, width, tile_elements * group, w * group):
        subs = [slice(c0, min(cols.stop, c0 + w)) for c0 in range(cols.start, cols.stop, w)]
        yield cols, rows, first, last, subs


def tiles(n: int, width: int, tile_elements: int = TILE_ELEMENTS, tile_width: int | None = None):
    """Yield `(cols, rows, first, last)` slices covering `[n, width]`, vocabulary tiles outermost.

    tile_width: columns per tile (None: as many rows as possible, all `n` when
    `n * MIN_TILE_WIDTH <= tile_elements`); rows per chunk fill `tile_elements`.
    first / last: this is the first / last row chunk of its vocabulary tile.
    """
    if n == 0 or width == 0:
        return
    w = tile_columns(n, width, tile_elements, tile_width)
    step = max(1, tile_elements // w)
    for c0 in range(0, width, w):
        cols = slice(c0, min(width, c0 + w))
        for r0 in range(0, n, step):
            yield cols, slice(r0, min(n, r0 + step)), r0 == 0, r0 + step >= n


@functools.cache
def _cuda_mm_out_dtype() -> bool:
    """torch.mm(bf16, bf16, out_dtype=fp32) exists on this build's CUDA (torch >= 2.8)."""
    a = torch.zeros(16, 16, dtype=torch.bfloat16, device="cuda")
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a [n, k] @ b [k, m]` accumulated in fp32 with an fp32 result (fp64 stays fp64).

    bf16 / fp16 operands stay in their dtype on CUDA (tensor-core GEMM, fp32
    output); on CPU they are upcast, which computes the same product.
    """
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b.to(a.dtype))
    if a.is_cuda and _cuda_mm_out_dtype():
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`out = a @ b`, accumulated in fp32 (fp64 for fp64) and rounded once to out's dtype.

    bf16 / fp16 on CUDA: one GEMM writing out directly (as the output layer's own
    wgrad does); on CPU through an fp32 product.
    """
    if a.dtype == out.dtype and (a.is_cuda or a.dtype in (torch.float32, torch.float64)):
        torch.mm(a, b.to(a.dtype), out=out)
    else:
        out.copy_(mm_f32(a, b))


@functools.cache
def _cuda_addmm_out_dtype() -> bool:
    """torch.addmm(C fp32, A bf16, B bf16, out_dtype=fp32, out=C) adds A @ B into C correctly on this build's CUDA."""
    c = torch.ones(16, 16, device="cuda")
    a = torch.ones(16, 16, dtype=torch.bfloat16, device="cuda")
    try:
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.all(c == 17))


def add_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`acc [n, m] += a [n, k] @ b [k, m]` in place, accumulated in acc's fp32 / fp64.

    The backward's hidden-state gradient sums one product per vocabulary tile:
    a GEMM that adds into its output reads and writes `acc` once per tile, where
    `acc += mm(a, b)` also writes and re-reads an `[n, m]` temporary (at N = 8192,
    H = 4096 and 125 tiles, about 16 GB of extra traffic). bf16 / fp16 operands on
    CUDA stay in their dtype (tensor cores, fp32 accumulation into acc); on CPU
    they are upcast, which computes the same sum.
    """
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b.to(acc.dtype))
    if a.is_cuda:  # tensor-core GEMM; through an fp32 product where this torch cannot add into acc
        if _cuda_addmm_out_dtype():
            return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        return acc.add_(mm_f32(a, b))
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def logit_tile(h: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """Tempered logits `(h @ w^T) / tau` of one tile, fp32 (fp64 for fp64). h: [n, H]; w: [c, H] -> [n, c]."""
    out = mm_f32(h, w.t())  # [n, c]
    return out.div_(temperature) if temperature != 1.0 else out


def empty_statistics(rows: int, n: int, k: int, dtype, device) -> torch.Tensor:
    """`[rows, n]` statistics of no column at all: maxima -inf, sums 0, top-k z -inf, top-k u 0."""
    out = torch.zeros(rows, n, dtype=dtype, device=device)
    out[S.Z_MAX] = out[S.U_MAX] = float("-inf")
    if k:
        out[rows - 2 * k : rows - k] = float("-inf")
    return out


def fold_statistics(acc: torch.Tensor, tile: torch.Tensor, need_opt: bool) -> None:
    """Merge the scalar rows of `tile [R, n]` (further columns) into `acc [R, n]`, in place.

    Both are relative to their own maxima (stats.py's rows); the result is
    relative to the joint maxima, as if one pass had seen both column sets.
    An empty side (Z_SUM = 0, maxima -inf) contributes nothing.
    """
    r0 = S.OPT_ROWS if need_opt else S.BASE_ROWS
    combine_rows(torch.stack([acc[:r0], tile[:r0]]), need_opt, acc)


def combine_rows(parts: torch.Tensor, need_opt: bool, out: torch.Tensor) -> None:
    """Scalar rows of disjoint column sets `parts [T, R0, n]` -> the rows of their union, into `out [R0, n]`.

    `stats.combine_statistics` re-bases per-rank rows the same way but goes on
    to the per-token results; this stops at the rows, so the union can be
    folded again or all-gathered. `out` may alias `parts`' source rows.
    """
    z_max, u_max = parts[:, S.Z_MAX], parts[:, S.U_MAX]  # [T, n]
    gz, gu = z_max.amax(0), u_max.amax(0)  # [n]
    has = parts[:, S.Z_SUM] > 0  # [T, n]
    a = torch.where(has, torch.exp(z_max - gz), 0.0)  # [T, n] rescale of each part's e
    b = torch.where(has, torch.exp(u_max - gu), 0.0)
    shift = torch.where(has, (z_max - gz) - (u_max - gu), 0.0)  # re-bases each part's d
    out[S.Z_MAX], out[S.U_MAX] = gz, gu
    out[S.Z_SUM] = (a * parts[:, S.Z_SUM]).sum(0)
    out[S.U_SUM] = (b * parts[:, S.U_SUM]).sum(0)
    out[S.Z_DIFF] = (a * (parts[:, S.Z_DIFF] + parts[:, S.Z_SUM] * shift)).sum(0)
    out[S.Z_TARGET] = parts[:, S.Z_TARGET].sum(0)  # only the owning part contributes
    out[S.U_TARGET] = parts[:, S.U_TARGET].sum(0)
    if need_opt:
        a2 = a * a
        out[S.Z_SUM2] = (a2 * parts[:, S.Z_SUM2]).sum(0)
        out[S.Z_DIFF2] = (a2 * (parts[:, S.Z_DIFF2] + parts[:, S.Z_SUM2] * shift)).sum(0)


def fold_topk(acc_top: torch.Tensor, tile_top: torch.Tensor, k: int,
              acc_cols: torch.Tensor | None = None, tile_cols: torch.Tensor | None = None) -> None:
    """Keep the k largest of the running and the tile's candidates, in place.

    acc_top, tile_top: [2k, n] (k z-values, then their u-values; stats.local_topk's
    layout, -inf / 0 where a side has fewer than k). acc_cols, tile_cols:
    optional [n, k] long shard columns of the candidates (-1 for padding).
    The result stays sorted by z, real candidates first.
    """
    cand_z = torch.cat([acc_top[:k], tile_top[:k]])  # [2k, n]
    cand_u = torch.cat([acc_top[k:], tile_top[k:]])  # [2k, n]
    vals, pos = cand_z.topk(k, dim=0)  # [k, n]
    acc_top[:k] = vals
    acc_top[k:] = cand_u.gather(0, pos)
    if acc_cols is not None:
        acc_cols.copy_(torch.cat([acc_cols, tile_cols], 1).gather(1, pos.t()))


def tile_statistics(zs, us, local_target, owned, need_opt, k, out, cols_out=None) -> None:
    """`stats.local_statistics` of one tile into `out [R, n]`; `local_target` is
    relative to the tile and `owned` says the target column lies in it.
    cols_out: optional [n, k] long, receives tile columns (-1 past the tile's width)."""
    w = zs.shape[1]
    if cols_out is not None:
        cols_out[:, min(k, w):] = -1
    S.local_statistics(zs, us, local_target, owned, need_opt, k, out,
                       None if cols_out is None else cols_out[:, : min(k, w)])


def tile_target(target: torch.Tensor, cols: slice) -> torch.Tensor:
    """`[n]` target column inside the vocabulary tile `cols`, from shard columns
    (-1 where not owned); the kernels ignore values outside `[0, tile width)`."""
    return torch.where(target >= 0, target - cols.start, -1).contiguous()


def tile_topk(zs, us, k, temperature, out, cols_out=None) -> None:
    """`stats.local_topk` of untempered fp32 tiles into `out [2k, n]`: the candidates
    are chosen on `zs` (dividing by tau > 0 keeps the order) and only the chosen
    values are tempered, each exactly as dividing the whole tile would.
    cols_out: optional [n, k] long, receives tile columns (-1 past the tile's width)."""
    k_loc = min(k, zs.shape[1])
    if cols_out is not None:
        cols_out[:, k_loc:] = -1
    S.local_topk(zs, us, k, out, None if cols_out is None else cols_out[:, :k_loc], u_temperature=temperature)
    if temperature != 1.0:
        out[:k_loc].div_(temperature)


def topk_grad_tile(cols: torch.Tensor, grad: torch.Tensor, c0: int, width: int) -> torch.Tensor:
    """Dense `[n, width]` tile of the sparse top-k gradient: `grad [n, k]` at shard
    columns `cols [n, k]`, kept where `c0 <= col < c0 + width`, zero elsewhere."""
    inside = (cols >= c0) & (cols < c0 + width)  # [n, k]
    out = grad.new_zeros(grad.shape[0], width)  # [n, width]
    # scatter_add of zeros at column 0 for outside candidates leaves the tile unchanged.
    return out.scatter_add_(1, torch.where(inside, cols - c0, 0), torch.where(inside, grad, 0.0))
