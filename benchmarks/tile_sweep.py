"""Time the fused loss kernels under several launch shapes and print the winner.

Why: the kernels' tile sizes (`backend.DEFAULT_GPU_TILES`: BLOCK_N rows and
BLOCK_V columns per program, and the warps per program) were chosen without a
GPU. The loss is bound by memory traffic, so the shape that keeps the most
bytes in flight wins, and that depends on the chip. Each kernel family is timed
alone on the benchmark's shape (N = 8192, V = 128256, bf16 on a GPU):

* `stats`: the forward statistics pass, reads `z` and `u` once;
* `grad`: the sampled-mode gradient (reads `z`, writes `dz`) and the `full_kl`
  gradient (reads `z`, `u`, writes the gradient), which share one setting; the
  winner is the shape with the least time over both.

Every candidate's output is compared with the default shape's (a launch shape
may change the fp32 summation order, nothing else); a candidate that differs
is reported and cannot win. The winner is printed with the
`VOPD_TRITON_TILES=...` value that applies it to any run, and the whole `vopd`
loss (forward + backward) is timed with the default and the winning shapes.
A winner counts as clear when it saves at least `--clear` (5 %) of the
default's time; then it is worth committing as the default.

Time is the median of `triton.testing.do_bench` (CUDA events, L2 flushed
between runs) on a GPU; on CPU (`TRITON_INTERPRET=1`, tiny shapes) a host
clock, and the figures mean nothing: the run checks the code path.

    python benchmarks/tile_sweep.py --csv tiles.csv
    TRITON_INTERPRET=1 python benchmarks/tile_sweep.py --tokens 16 --vocab 1271 --csv /tmp/tiles.csv
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from bench_loss import known_peak_gbs
from vopd_megatron.loss import LossConfig, vocab_parallel_opd_loss
from vopd_megatron.loss.backend import DEFAULT_GPU_TILES, TILES_ENV, interpreter_on

#: Candidate (BLOCK_N, BLOCK_V, num_warps) per family; the default is always tried too.
GPU_CANDIDATES = {
    "stats": [(1, 1024, 4), (1, 2048, 8), (1, 4096, 16), (1, 8192, 16), (2, 4096, 16), (4, 2048, 16)],
    "grad": [(1, 4096, 8), (2, 2048, 8), (4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4)],
}
#: Interpreter shapes for the CPU rehearsal: small, so that it stays quick.
CPU_CANDIDATES = {"stats": [(1, 256, 1), (4, 128, 1)], "grad": [(4, 128, 1), (8, 256, 1)]}
KERNELS = {"stats": ["stats"], "grad": ["sampled_grad", "full_kl_grad"]}
#: Passes over [N, V] per kernel (reads + writes), for the bandwidth column.
PASSES = {"stats": 2, "sampled_grad": 2, "full_kl_grad": 3}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, help="N rows (default 8192 on GPU, 16 on CPU)")
    p.add_argument("--vocab", type=int, help="V columns (default 128256 on GPU, 1271 on CPU)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=3, help="CPU: timed runs per candidate (GPU: do_bench)")
    p.add_argument("--clear", type=float, default=0.05, help="time saved that makes a winner clear")
    p.add_argument("--peak-gbs", type=float, help="peak memory bandwidth (GB/s) for the %% column")
    p.add_argument("--csv", help="also write every row to this CSV file")
    return p.parse_args()


def make_inputs(n: int, vocab: int, dtype, device):
    """Logits with a realistic student-teacher gap, targets, statistics for the gradients."""
    from vopd_megatron.loss import stats as S
    from vopd_megatron.loss import triton_kernels as TK

    g = torch.Generator(device=device).manual_seed(0)
    z = (4.0 * torch.randn(n, vocab, device=device, generator=g)).to(dtype)  # [N, V]
    u = (z.float() + torch.randn(n, vocab, device=device, generator=g)).to(dtype)  # [N, V]
    target = torch.randint(0, vocab, (n,), device=device, generator=g)  # [N] int64
    out = torch.empty(S.BASE_ROWS, n, device=device)  # [7, N] fp32
    TK.shard_statistics(z, u, target, vocab, 1.0, False, out)
    st = S.combine_statistics(out[None], need_opt=False)  # lse_z, lse_u, kl: [N]
    coef = torch.randn(n, device=device, generator=g)  # [N] fp32
    return SimpleNamespace(z=z, u=u, target=target, st=st, coef=coef, n=n, vocab=vocab)


def run_kernel(kernel: str, x, blocks):
    """One launch of `kernel` with the given shape; returns its output."""
    from vopd_megatron.loss import stats as S
    from vopd_megatron.loss import triton_kernels as TK

    if kernel == "stats":
        out = torch.empty(S.BASE_ROWS, x.n, device=x.z.device)  # [7, N]
        TK.shard_statistics(x.z, x.u, x.target, x.vocab, 1.0, False, out, blocks=blocks)
        return out
    if kernel == "sampled_grad":
        return TK.sampled_gradient(x.z, x.st.lse_z, x.coef, x.target, x.vocab, 1.0, blocks=blocks)
    return TK.full_kl_gradient(x.z, x.u, x.st, x.coef, x.vocab, 1.0, blocks=blocks)


def median_ms(fn, device, repeats: int) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |out - ref| relative to max(|ref|, 1), over finite entries (NaN counts as infinite)."""
    diff = (out.float() - ref.float()).abs()
    diff = torch.where(torch.isfinite(ref.float()) | torch.isfinite(out.float()), diff, 0.0)
    scale = ref.float().abs().nan_to_num(posinf=0.0, neginf=0.0).amax().clamp_min(1.0)
    return float(diff.nan_to_num(nan=float("inf")).amax() / scale)


def sweep(x, candidates: dict, device, args, peak) -> list[dict]:
    rows = []
    for family, shapes in candidates.items():
        default = DEFAULT_GPU_TILES[family]
        for kernel in KERNELS[family]:
            ref = run_kernel(kernel, x, default)
            tol = 1e-4 if kernel == "stats" else 8e-3  # fp32 summation order; one bf16 step
            base_ms = None
            for shape in [default] + [s for s in shapes if s != default]:
                row = {"family": family, "kernel": kernel, "block_n": shape[0], "block_v": shape[1],
                       "num_warps": shape[2], "default": shape == default}
                try:
                    row["max_err"] = max_error(run_kernel(kernel, x, shape), ref)
                    row["ok"] = row["max_err"] <= tol
                    row["ms"] = median_ms(lambda s=shape: run_kernel(kernel, x, s), device, args.repeats)
                except Exception as exc:  # noqa: BLE001 - a shape that fails to compile loses, the sweep goes on
                    row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                if row.get("ms") is not None:
                    base_ms = row["ms"] if shape == default else base_ms
                    row["x_default"] = row["ms"] / base_ms if base_ms else None
                    gb = PASSES[kernel] * x.z.numel() * x.z.element_size() / 1e9
                    row["gb_s"] = gb / (row["ms"] / 1e3)
                    row["pct_peak"] = 100 * row["gb_s"] / peak if peak else None
                rows.append(row)
    return rows


def winners(rows: list[dict]) -> dict[str, tuple[tuple[int, int, int], float, float]]:
    """family -> (shape, its time, the default's time), times summed over the family's kernels."""
    out = {}
    for family, kernels in KERNELS.items():
        totals = {}
        for shape in {(r["block_n"], r["block_v"], r["num_warps"]) for r in rows if r["family"] == family}:
            mine = [r for r in rows if r["family"] == family and (r["block_n"], r["block_v"], r["num_warps"]) == shape]
            if len(mine) == len(kernels) and all(r.get("ok") and r.get("ms") is not None for r in mine):
                totals[shape] = sum(r["ms"] for r in mine)
        default = DEFAULT_GPU_TILES[family]
        if default in totals:
            best = min(totals, key=totals.get)
            out[family] = (best, totals[best], totals[default])
    return out


@contextmanager
def gpu_tiles(tiles: dict):
    """Run with these GPU launch shapes (triton_kernels.GPU_BLOCKS), restored afterwards.
    In the CPU interpreter the kernels use CPU_BLOCKS whatever this says."""
    from vopd_megatron.loss import triton_kernels as TK

    saved = dict(TK.GPU_BLOCKS)
    TK.GPU_BLOCKS.update(tiles)
    try:
        yield
    finally:
        TK.GPU_BLOCKS.clear()
        TK.GPU_BLOCKS.update(saved)


def loss_ms(x, tiles: dict, device, repeats: int) -> tuple[float, float]:
    """(median ms, loss value) of the vopd loss forward + backward under `tiles`."""
    mask = torch.ones(x.n, device=device)
    config = LossConfig(mode="vopd", backend="triton")

    def step():
        z = x.z.detach().requires_grad_()
        loss_sum, num_tokens, _ = vocab_parallel_opd_loss(z, x.u, x.target, mask, config)
        (loss_sum / num_tokens).backward()
        return float(loss_sum.detach())

    with gpu_tiles(tiles):
        return median_ms(step, device, repeats), step()


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def report(rows, win, e2e, args, peak, clear_win) -> None:
    cols = ["kernel", "BLOCK_N", "BLOCK_V", "warps", "time ms", "x default", "GB/s", "% of peak", "max err", "ok"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(" --- " for _ in cols) + "|")
    for r in rows:
        name = r["kernel"] + (" (default)" if r["default"] else "")
        print(f"| {name} | {r['block_n']} | {r['block_v']} | {r['num_warps']} | {fmt(r.get('ms'), '.3f')} | "
              f"{fmt(r.get('x_default'), '.2f')} | {fmt(r.get('gb_s'), '.4g')} | {fmt(r.get('pct_peak'), '.0f')} | "
              f"{fmt(r.get('max_err'), '.1e')} | {'yes' if r.get('ok') else 'NO ' + r.get('error', '')} |")
    print()
    for family, (shape, ms, base) in win.items():
        verdict = "clear win: commit it as the default" if clear_win[family] else "not a clear win: keep the default"
        print(f"winner {family}: {'x'.join(map(str, shape))} ({ms:.3f} ms vs default {base:.3f} ms, "
              f"{ms / base:.2f}x; {verdict})")
    value = ",".join(f"{f}={'x'.join(map(str, s))}" for f, (s, _, _) in win.items())
    print(f"{TILES_ENV}={value}")
    if e2e:
        (d_ms, d_loss), (w_ms, w_loss) = e2e
        print(f"vopd loss fwd+bwd: default tiles {d_ms:.3f} ms, winners {w_ms:.3f} ms ({w_ms / d_ms:.2f}x); "
              f"loss {d_loss:.6g} vs {w_loss:.6g}")


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if not gpu and not interpreter_on():
        raise SystemExit("error: without a GPU the kernels need TRITON_INTERPRET=1 (set before starting Python)")
    n, vocab = args.tokens or (8192 if gpu else 16), args.vocab or (128256 if gpu else 1271)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    peak = args.peak_gbs or known_peak_gbs(device)
    x = make_inputs(n, vocab, dtype, device)
    where = torch.cuda.get_device_name() if gpu else "CPU (Triton interpreter: timings mean nothing)"
    print(f"tile sweep: N={n} V={vocab} {args.dtype} on {where}; median ms "
          f"({'do_bench' if gpu else f'{args.repeats} runs'}); defaults {DEFAULT_GPU_TILES}\n")
    rows = sweep(x, GPU_CANDIDATES if gpu else CPU_CANDIDATES, device, args, peak)
    win = winners(rows)
    clear_win = {f: ms <= (1 - args.clear) * base for f, (_, ms, base) in win.items()}
    for r in rows:
        shape = (r["block_n"], r["block_v"], r["num_warps"])
        r["winner"] = r["family"] in win and win[r["family"]][0] == shape
        r["clear_win"] = r["winner"] and clear_win[r["family"]]
    e2e = None
    if len(win) == len(KERNELS):
        e2e = (loss_ms(x, DEFAULT_GPU_TILES, device, args.repeats),
               loss_ms(x, {f: s for f, (s, _, _) in win.items()}, device, args.repeats))
    report(rows, win, e2e, args, peak, clear_win)
    if args.csv:
        fields = ["family", "kernel", "block_n", "block_v", "num_warps", "default", "ms", "x_default", "gb_s",
                  "pct_peak", "max_err", "ok", "winner", "clear_win", "error"]
        meta = {"tokens": n, "vocab": vocab, "dtype": args.dtype, "device": where}
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(meta) + fields, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({**meta, **r})
    if len(win) < len(KERNELS):
        raise SystemExit("error: the default launch shape failed for " + ", ".join(set(KERNELS) - set(win)))


if __name__ == "__main__":
    main()
