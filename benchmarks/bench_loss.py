"""Time and memory of every OPD / vOPD loss mode next to Megatron-Core's cross entropy.

Why these rows: a distillation step pays the loss once per microbatch on the
last pipeline stage, over `[N, V/tp]` logits of *two* models. The question a
Megatron user asks is "what does switching from pre-training CE to (v)OPD cost
me?", so every mode of `vocab_parallel_opd_loss` is measured on the same inputs
as

* `megatron_ce`: `tensor_parallel.vocab_parallel_cross_entropy`, the loss the
  user already runs (the ratio columns are relative to it);
* `megatron_ce_fused`: `fusions.fused_cross_entropy`, its torch.compile'd
  variant (compiled during warm-up; a failure is reported, not raised);
* `te_parallel_ce`: Transformer Engine's Triton `parallel_cross_entropy`, when
  TE imports (GPU only);
* `unfused_full_kl`: the full-vocabulary reverse KL written the usual way
  (`log_softmax` of both models, `F.kl_div(..., log_target=True)`), which is
  what `full_kl` replaces (TP = 1 only: it needs the whole vocabulary).

Each row is forward + backward to the student logits (the gradient is kept
alive until the step ends, as it would be in training). Time is the median
over `--repeats` rounds after `--warmup` untimed runs, each round running
every row once: CUDA events on a GPU, `time.perf_counter` on CPU. Peak extra
memory is the allocator's high-water mark during one step minus what was
allocated before it (inputs excluded, the gradient included):
`torch.cuda.max_memory_allocated` on a GPU; on CPU, the running sum of the
allocation / free events that `torch.profiler(profile_memory=True)` records
from PyTorch's CPU allocator.

CPU numbers are a smoke test, not a forecast for the GPU: PyTorch's CPU
allocator hands large blocks back to the OS, so every fresh `[N, V]`
temporary pays page faults that the CUDA caching allocator never does, and
losses that make more temporaries look slower than they would on a GPU
(`MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184`
in the environment keeps them mapped and removes most of that).

On a GPU (or on CPU with `--peak-gbs`) the table adds the bandwidth against
the physical floor of DESIGN §3 (derivation in docs/performance.md): the
distillation rows must read `z` and `u` in forward and read `z` and write `dz`
in backward (4 passes over `[N, V/tp]`: 8 bytes per element in bf16), the CE
rows 3 passes (6 bytes); `floor GB/s` is those bytes over the measured time,
`x floor` the measured time over the time those bytes take at `--peak-gbs`.
Per-token `[N]` tensors and the `[tp, R, N]` statistics are left out of the
floor (R * 4 bytes per token against V/tp * 8).

The loss modes run with `--backends` (default `auto`: the fused Triton kernels
on a GPU, the PyTorch path on CPU); `--backends auto,torch` adds PyTorch-path
rows for comparison. On CPU, `TRITON_INTERPRET=1 ... --backends triton` runs
the kernels' code path in Triton's interpreter (tiny shapes only: the figures
mean nothing, the run checks that the GPU code path works end to end).

Megatron's CE subtracts the max from fp32 logits in place, so its rows get a
fresh clone of the student logits per run, made outside the timed region.

`--fused-output` measures something else: the output layers *and* the loss,
from both models' hidden states `[N, H]` and output-weight shards `[V/tp, H]`
(`--hidden`, `--teacher-hidden`), gradients wrt the student's hidden states
and weight. Per mode, `logits path` forms both `[N, V/tp]` logit shards with
one GEMM each and runs vocab_parallel_opd_loss (the teacher's logits are
dropped after the forward, the student's kept by the loss, as in a training
step; bf16 logits, not the fp32 copies Float16Module hands the loss in
training, so its memory is the smaller of the two); `fused output` runs
fused_output_opd_loss (docs/loss.md); where the Triton backend runs,
`--fused-gemm torch,triton` adds a `fused output (tl.dot GEMMs)` row next
to the default (torch GEMM tiles with Triton epilogues, backend.FUSED_GEMMS).
Peak extra memory includes the
returned gradients; the `- dW` column leaves out the weight gradient
`[V/tp, H_s]`, which both paths produce and which training accumulates into
Megatron's gradient buffer.

    python benchmarks/bench_loss.py                      # CPU: small shape, ~1 min
    python benchmarks/bench_loss.py --csv out.csv        # also write CSV
    python benchmarks/bench_loss.py --backends auto,torch --csv loss_h100.csv   # GPU: N=8192, V=128256, bf16
    torchrun --nproc-per-node 2 benchmarks/bench_loss.py # TP = 2 (optional)
    python benchmarks/bench_loss.py --fused-output --tokens 2048 --vocab 32000 --hidden 128 \
        --modes vopd,full_kl --backends torch --repeats 3   # CPU side by side
    python benchmarks/bench_loss.py --fused-output --vocab 151936 --modes vopd,full_kl,vopd_topk \
        --backends auto,torch --fused-gemm torch,triton --repeats 20 --warmup 3 --csv fused_v152k.csv
        # GPU: N=8192, H=4096, bf16
"""
from __future__ import annotations

import argparse
import csv
import functools
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vopd_megatron.errors import entry_point
from vopd_megatron.loss import LOSS_MODES, TOPK_MODES, LossConfig, vocab_parallel_opd_loss
from vopd_megatron.loss.backend import FUSED_GEMMS, fused_gemm, interpreter_on, use_triton
from vopd_megatron.model.builder import te_available
from vopd_megatron.runtime.startup import start_process_group
from vopd_megatron.testing.memory import cpu_peak_bytes

#: Peak HBM bandwidth in GB/s by device-name substring, for the "% of peak" column.
PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}
MIB = 1 << 20


@dataclass
class Inputs:
    """One rank's shard of a batch of tokens, shared by every row."""

    z: torch.Tensor  # [N, V/tp] student logits
    u: torch.Tensor  # [N, V/tp] teacher logits
    targets: torch.Tensor  # [N] sampled token ids (global vocabulary)
    mask: torch.Tensor  # [N] 1 on completion tokens
    vocab_size: int
    group: dist.ProcessGroup | None  # tensor-parallel group; None at TP = 1


@dataclass
class Row:
    """One benchmarked loss: `prepare()` builds the untimed per-run input,
    `step(x)` runs forward + backward and returns the gradient."""

    name: str
    prepare: Callable[[], torch.Tensor]
    step: Callable[[torch.Tensor], torch.Tensor]
    passes: int  # passes over [N, V/tp] in the bandwidth floor


# --- setup ------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, help="N tokens (default 8192 on GPU, 1024 on CPU)")
    p.add_argument("--vocab", type=int, help="global vocabulary V (default 128256 on GPU, 32000 on CPU)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--repeats", type=int, help="timed runs per row (default 50 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed runs per row (default 5 on GPU, 1 on CPU)")
    p.add_argument("--backends", default="auto",
                   help="comma-separated LossConfig.backend values for the loss-mode rows (auto, torch, triton)")
    p.add_argument("--modes", default=",".join(LOSS_MODES), help="comma-separated loss modes")
    p.add_argument("--top-k", type=int, default=64, help="k of vopd_topk and topk_kl")
    p.add_argument("--peak-gbs", type=float, help="peak memory bandwidth (GB/s) for the %% column")
    p.add_argument("--no-cpu-compat", action="store_true",
                   help="on CPU, skip vopd_megatron.megatron.cpu_compat.enable()")
    p.add_argument("--csv", help="also write the table to this CSV file")
    p.add_argument("--fused-output", action="store_true",
                   help="instead: rows of the output layers + loss from hidden states, the logits path "
                        "(GEMMs to [N, V/tp] logits, then the loss) next to the fused output loss")
    p.add_argument("--hidden", type=int, help="--fused-output: student hidden size (default 4096 on GPU, 256 on CPU)")
    p.add_argument("--teacher-hidden", type=int, help="--fused-output: teacher hidden size (default: --hidden)")
    p.add_argument("--fused-gemm", default="torch",
                   help="--fused-output: comma-separated tile GEMMs of the Triton backend's fused rows "
                        f"({', '.join(FUSED_GEMMS)}; default torch)")
    args = p.parse_args()
    try:
        args.fused_gemm = [fused_gemm(g) for g in args.fused_gemm.split(",") if g]
    except ValueError as exc:
        p.error(f"--fused-gemm: {exc}")
    return args


def init_distributed(device: torch.device) -> dist.ProcessGroup:
    """The TP group: WORLD under torchrun, else a 1-process group (Megatron's CE needs one)."""
    start_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.group.WORLD


def make_inputs(n: int, vocab: int, dtype: torch.dtype, device, group) -> Inputs:
    """Random logits with a realistic student-teacher gap; each rank draws its own shard."""
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if vocab % tp:
        raise SystemExit(f"error: --vocab {vocab} must be divisible by the TP size {tp}")
    gen = torch.Generator(device=device).manual_seed(1234 + rank)
    z = 4.0 * torch.randn(n, vocab // tp, device=device, generator=gen)  # [N, V/tp] fp32
    u = z + torch.randn(n, vocab // tp, device=device, generator=gen)  # [N, V/tp] fp32
    shared = torch.Generator(device=device).manual_seed(0)  # same targets on every rank
    targets = torch.randint(0, vocab, (n,), device=device, generator=shared)  # [N]
    mask = (torch.arange(n, device=device) % 8 != 0).float()  # [N] 1/8 prompt tokens
    return Inputs(z.to(dtype), u.to(dtype), targets, mask, vocab, group if tp > 1 else None)


# --- the rows -----------------------------------------------------------------------


def student_leaf(inp: Inputs) -> Callable[[], torch.Tensor]:
    return lambda: inp.z.detach().requires_grad_()


def opd_row(inp: Inputs, mode: str, top_k: int, backend: str = "auto") -> Row:
    config = LossConfig(mode=mode, top_k=top_k if mode in TOPK_MODES else None, backend=backend)

    def step(z):
        loss_sum, num_tokens, _ = vocab_parallel_opd_loss(
            z, inp.u, inp.targets, inp.mask, config, vocab_size=inp.vocab_size, group=inp.group)
        return torch.autograd.grad(loss_sum / num_tokens, z)[0]  # [N, V/tp]

    name = f"{mode} (k={top_k})" if mode in TOPK_MODES else mode
    if backend != "auto":
        name += f" [{backend}]"
    return Row(name, student_leaf(inp), step, passes=4)


def megatron_ce_row(inp: Inputs, tp_group, fused: bool) -> Row:
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def step(z):
        if fused:
            loss = fused_vocab_parallel_cross_entropy(z, inp.targets, tp_group)  # [N]
        else:
            loss = vocab_parallel_cross_entropy(z, inp.targets, tp_group=tp_group)  # [N]
        return torch.autograd.grad((loss * inp.mask).sum() / inp.mask.sum(), z)[0]

    def fresh_clone():  # CE writes into fp32 logits
        return inp.z.detach().clone().requires_grad_()

    return Row("megatron_ce_fused" if fused else "megatron_ce", fresh_clone, step, passes=3)


def te_ce_row(inp: Inputs, tp_group) -> Row:
    """Transformer Engine's parallel cross entropy (`(B, SQ, V/tp)` input)."""
    from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy

    def step(z):
        loss = parallel_cross_entropy(z.view(1, *z.shape), inp.targets.view(1, -1), 0.0, False,
                                      tp_group).view(-1)  # [N]
        return torch.autograd.grad((loss * inp.mask).sum() / inp.mask.sum(), z)[0]

    def fresh_clone():  # older TE versions keep the gradient in the input's storage
        return inp.z.detach().clone().requires_grad_()

    return Row("te_parallel_ce", fresh_clone, step, passes=3)


def unfused_kl_row(inp: Inputs) -> Row:
    def step(z):
        logp = F.log_softmax(z.float(), dim=-1)  # [N, V] fp32
        logq = F.log_softmax(inp.u.float(), dim=-1)  # [N, V] fp32
        kl = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)  # [N] KL(p || q)
        return torch.autograd.grad((kl * inp.mask).sum() / inp.mask.sum(), z)[0]

    return Row("unfused_full_kl", student_leaf(inp), step, passes=4)


def build_rows(inp: Inputs, tp_group, modes, top_k, backends=("auto",)) -> list[Row]:
    rows = [megatron_ce_row(inp, tp_group, fused=False), megatron_ce_row(inp, tp_group, fused=True)]
    if inp.z.is_cuda and te_available():
        rows.append(te_ce_row(inp, tp_group))
    if inp.group is None:
        rows.append(unfused_kl_row(inp))
    return rows + [opd_row(inp, mode, top_k, backend) for backend in backends for mode in modes]


# --- output layers + loss from hidden states (--fused-output) ------------------------------


@dataclass
class LayerInputs:
    """One rank's final hidden states and output-layer shards of both models."""

    hs: torch.Tensor  # [N, H_s] student hidden states
    ws: torch.Tensor  # [V/tp, H_s] student output-layer shard
    ht: torch.Tensor  # [N, H_t] teacher hidden states
    wt: torch.Tensor  # [V/tp, H_t] teacher output-layer shard
    targets: torch.Tensor  # [N]
    mask: torch.Tensor  # [N]
    vocab_size: int
    group: dist.ProcessGroup | None


def make_layer_inputs(n, vocab, hidden, teacher_hidden, dtype, device, group) -> LayerInputs:
    """Random hidden states and weights whose logits have std about 4, as make_inputs'."""
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if vocab % tp:
        raise SystemExit(f"--vocab {vocab} must be divisible by the TP size {tp}")
    gen = torch.Generator(device=device).manual_seed(99)  # hidden states: the same on every rank
    hs = torch.randn(n, hidden, device=device, generator=gen)  # [N, H_s]
    ht = torch.randn(n, teacher_hidden, device=device, generator=gen)  # [N, H_t]
    gen.manual_seed(4321 + rank)  # each rank its own vocabulary rows
    ws = torch.randn(vocab // tp, hidden, device=device, generator=gen) * (4.0 / hidden**0.5)
    wt = torch.randn(vocab // tp, teacher_hidden, device=device, generator=gen) * (4.0 / teacher_hidden**0.5)
    targets = torch.randint(0, vocab, (n,), device=device, generator=gen.manual_seed(0))  # [N], same everywhere
    mask = (torch.arange(n, device=device) % 8 != 0).float()  # [N] 1/8 prompt tokens
    return LayerInputs(hs.to(dtype), ws.to(dtype), ht.to(dtype), wt.to(dtype), targets, mask, vocab,
                       group if tp > 1 else None)


def layer_rows(inp: LayerInputs, modes, top_k, backends, gemms=("torch",)) -> list[Row]:
    """Per mode and backend: `<mode>: logits path` (the output layers' GEMMs to
    `[N, V/tp]` logits, then vocab_parallel_opd_loss) and `<mode>: fused output`
    (fused_output_opd_loss), one per tile GEMM in `gemms` where the Triton backend
    runs (`... (tl.dot GEMMs)` for "triton"). All return the gradients wrt h_s
    (TP-reduced) and W_s."""
    from vopd_megatron.loss.fused_output import fused_output_opd_loss

    def leaves():
        return inp.hs.detach().requires_grad_(), inp.ws.detach().requires_grad_()

    def finish(loss_sum, num_tokens, hs, ws, reduce):
        dh, dw = torch.autograd.grad(loss_sum / num_tokens, (hs, ws))
        if reduce and inp.group is not None:  # Megatron's TP copy of the hidden states, in backward
            dist.all_reduce(dh, group=inp.group)
        return dh, dw

    rows = []
    for backend in backends:
        for mode in modes:
            config = LossConfig(mode=mode, top_k=top_k if mode in TOPK_MODES else None, backend=backend)
            kw = dict(vocab_size=inp.vocab_size, group=inp.group)

            def logits_path(x, config=config, kw=kw):
                hs, ws = x
                z = hs @ ws.t()  # [N, V/tp] student logits
                with torch.no_grad():
                    u = inp.ht @ inp.wt.t()  # [N, V/tp] teacher logits
                loss_sum, num_tokens, _ = vocab_parallel_opd_loss(z, u, inp.targets, inp.mask, config, **kw)
                del z, u  # the loss keeps what its backward needs
                return finish(loss_sum, num_tokens, hs, ws, reduce=True)

            def fused(x, config=config, kw=kw, gemm="torch"):
                hs, ws = x
                loss_sum, num_tokens, _ = fused_output_opd_loss(hs, ws, inp.ht, inp.wt, inp.targets, inp.mask,
                                                                config, gemm=gemm, **kw)
                return finish(loss_sum, num_tokens, hs, ws, reduce=False)  # reduced inside

            name = f"{mode} (k={top_k})" if mode in TOPK_MODES else mode
            name += f" [{backend}]" if backend != "auto" else ""
            rows.append(Row(f"{name}: logits path", leaves, logits_path, passes=4))
            try:
                kernels = use_triton(backend, inp.hs)
            except ValueError:
                kernels = True  # its rows say why they cannot run
            for gemm in gemms if kernels else gemms[:1]:
                suffix = " (tl.dot GEMMs)" if gemm == "triton" else ""
                rows.append(Row(f"{name}: fused output{suffix}", leaves, functools.partial(fused, gemm=gemm),
                                passes=4))
    return rows


def print_layer_table(results, header: str, inp: LayerInputs) -> None:
    """Each fused row next to its logits-path row: time, peak extra memory, and
    peak extra memory without the weight gradient `dW [V/tp, H_s]`, which both
    return and which training accumulates into Megatron's gradient buffer."""
    dw_mib = inp.ws.numel() * inp.ws.element_size() / MIB
    by_name = {r["name"]: r for r in results}
    print(header + f"H_s={inp.hs.shape[1]} H_t={inp.ht.shape[1]}; dW = {dw_mib:.1f} MiB; "
          f"one [N, V/tp] logit shard = {inp.hs.shape[0] * inp.ws.shape[0] * inp.hs.element_size() / MIB:.1f} MiB\n")
    cols = ["name", "time ms", "x logits time", "peak extra MiB", "x logits mem", "peak extra - dW MiB",
            "x logits mem (- dW)"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(" --- " for _ in cols) + "|")
    for r in results:
        base = by_name[r["name"].partition(": ")[0] + ": logits path"]
        r["mb_no_dw"] = None if r["error"] else r["mb"] - dw_mib
        if r["error"] or base["error"]:
            r.update(x_logits_time="-", x_logits_mem="-", x_logits_mem_no_dw="-")
        else:
            r["x_logits_time"] = ratio(r["ms"], base["ms"])
            r["x_logits_mem"] = ratio(r["mb"], base["mb"], floor=1e-3)
            r["x_logits_mem_no_dw"] = ratio(r["mb_no_dw"], base["mb"] - dw_mib, floor=1e-3)
        if r["error"]:
            cells = [r["name"], f"n/a ({r['error']})"] + [""] * (len(cols) - 2)
        else:
            cells = [r["name"], f"{r['ms']:.2f}", r["x_logits_time"], f"{r['mb']:.1f}", r["x_logits_mem"],
                     f"{r['mb_no_dw']:.1f}", r["x_logits_mem_no_dw"]]
        print("| " + " | ".join(cells) + " |")


# --- measurement -------------------------------------------------------------------


def warm_up(row: Row, runs: int) -> str | None:
    """Untimed runs (at least one: it compiles the fused CE); the failure reason, if any."""
    try:
        for _ in range(max(1, runs)):
            row.step(row.prepare())
    except Exception as exc:  # noqa: BLE001 - one broken row must not hide the others
        return short_reason(exc)
    return None


def time_once(row: Row, device) -> float:
    """Milliseconds of one forward + backward; the input is prepared outside the timed region."""
    x = row.prepare()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        row.step(x)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    row.step(x)
    return (time.perf_counter() - t0) * 1e3


def median_times(rows: list[Row], repeats: int, device) -> dict[str, float]:
    """Median ms per row. Rounds interleave the rows, so a noisy neighbour (a
    shared CPU, GPU clocks) slows every row alike instead of one row at random."""
    times = {row.name: [] for row in rows}
    for _ in range(repeats):
        for row in rows:
            times[row.name].append(time_once(row, device))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_extra_bytes(row: Row, device) -> int:
    """Allocator high-water mark of one step, above what was allocated before it."""
    x = row.prepare()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        row.step(x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return cpu_peak_bytes(lambda: row.step(x))


def short_reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:90]}"


def measure(rows: list[Row], args, device) -> list[dict]:
    """{'name', 'ms', 'mb', 'passes', 'error'} per row; a failing row gets 'error'."""
    errors = {row.name: warm_up(row, args.warmup) for row in rows}
    live = [row for row in rows if errors[row.name] is None]
    ms = median_times(live, args.repeats, device)
    results = []
    for row in rows:
        r = {"name": row.name, "ms": ms.get(row.name), "mb": None, "passes": row.passes, "error": errors[row.name]}
        if r["error"] is None:
            try:
                r["mb"] = peak_extra_bytes(row, device) / MIB
            except Exception as exc:  # noqa: BLE001
                r["error"] = f"memory: {short_reason(exc)}"
        results.append(r)
    return results


# --- report -------------------------------------------------------------------------


def ratio(x, ref, floor=1e-3):
    return "-" if x is None or ref is None or ref < floor else f"{x / ref:.2f}"


def floor_bytes(passes: int, inp: Inputs) -> int:
    """Bytes a row must move at least: `passes` reads or writes of one `[N, V/tp]` shard."""
    return passes * inp.z.numel() * inp.z.element_size()


def known_peak_gbs(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((gbs for key, gbs in PEAK_GBS.items() if key in name), None)


def add_derived(results, inp: Inputs, peak_gbs) -> None:
    """Ratios to Megatron's CE (plain and fused) and, given a peak bandwidth,
    the floor bandwidth and the time relative to the floor time."""
    ce = next(r for r in results if r["name"] == "megatron_ce")
    fused = next((r for r in results if r["name"] == "megatron_ce_fused" and r["ms"]), None)
    for r in results:
        r["x_ce_time"] = ratio(r["ms"], ce["ms"])
        r["x_fused_time"] = ratio(r["ms"], fused["ms"]) if fused else "-"
        r["x_ce_mem"] = ratio(r["mb"], ce["mb"], floor=1.0)
        r["x_fused_mem"] = ratio(r["mb"], fused["mb"], floor=1.0) if fused else "-"
        if peak_gbs and r["ms"]:
            need = floor_bytes(r["passes"], inp)
            gbs = need / (r["ms"] * 1e-3) / 1e9
            r["floor_gbs"] = f"{gbs:.3g}"
            r["pct_peak"] = f"{100 * gbs / peak_gbs:.0f}%"
            r["x_floor"] = f"{r['ms'] / (need / (peak_gbs * 1e9) * 1e3):.2f}"


def print_table(results, header: str, with_floor: bool) -> None:
    cols = ["name", "time ms", "x CE time", "x fused CE time", "peak extra MiB", "x CE mem", "x fused CE mem"]
    if with_floor:
        cols += ["floor GB/s", "% of peak", "x floor"]
    print(header)
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(" --- " for _ in cols) + "|")
    for r in results:
        if r["error"]:
            cells = [r["name"], f"n/a ({r['error']})"] + [""] * (len(cols) - 2)
        else:
            cells = [r["name"], f"{r['ms']:.2f}", r["x_ce_time"], r["x_fused_time"], f"{r['mb']:.1f}",
                     r["x_ce_mem"], r["x_fused_mem"]]
            if with_floor:
                cells += [r.get("floor_gbs", "-"), r.get("pct_peak", "-"), r.get("x_floor", "-")]
        print("| " + " | ".join(cells) + " |")


CSV_FIELDS = ["name", "ms", "mb", "passes", "x_ce_time", "x_fused_time", "x_ce_mem", "x_fused_mem",
              "floor_gbs", "pct_peak", "x_floor", "error"]
LAYER_CSV_FIELDS = ["name", "ms", "mb", "mb_no_dw", "x_logits_time", "x_logits_mem", "x_logits_mem_no_dw", "error"]


def write_csv(path, results, meta: dict, fields=CSV_FIELDS) -> None:
    fields = list(meta) + fields
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({**meta, **r})


def header_line(args, width: int, device, tp, compat, peak=None) -> str:
    from importlib.metadata import version

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    memory = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "CPU allocator events from torch.profiler(profile_memory=True)")
    return (f"N={args.tokens} V={args.vocab} (V/tp={width}, tp={tp}) {args.dtype} on {where}; "
            f"median of {args.repeats} after {args.warmup} warm-up; fwd+bwd; "
            f"peak extra memory: {memory}; torch {torch.__version__}, "
            f"megatron-core {version('megatron-core')}; cpu_compat: {compat}; loss backends: {args.backends}"
            + (f"; peak bandwidth {peak:.0f} GB/s" if peak else "")
            + ("; TRITON_INTERPRET=1" if interpreter_on() else "") + "\n")


@entry_point
def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    args.tokens = args.tokens or (8192 if gpu else 1024)
    args.vocab = args.vocab or (128256 if gpu else 32000)
    args.repeats = args.repeats or (50 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    modes = [m for m in args.modes.split(",") if m]
    compat = "n/a (GPU)" if gpu else "off (--no-cpu-compat)"
    if not gpu and not args.no_cpu_compat:
        from vopd_megatron.megatron import cpu_compat
        compat = f"enabled={cpu_compat.enable()}"
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tp_group = init_distributed(device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    backends = [b for b in args.backends.split(",") if b]
    if args.fused_output:
        return main_fused_output(args, device, tp_group, dtype, modes, backends, compat)
    inp = make_inputs(args.tokens, args.vocab, dtype, device, tp_group)

    results = measure(build_rows(inp, tp_group, modes, args.top_k, backends), args, device)
    peak = args.peak_gbs or known_peak_gbs(device)
    add_derived(results, inp, peak)
    tp = dist.get_world_size(tp_group)
    if dist.get_rank() == 0:
        print_table(results, header_line(args, inp.z.shape[-1], device, tp, compat, peak), peak is not None)
        if args.csv:
            meta = {"tokens": args.tokens, "vocab": args.vocab, "tp": tp, "dtype": args.dtype,
                    "device": torch.cuda.get_device_name() if gpu else "cpu", "top_k": args.top_k,
                    "peak_gbs": peak}
            write_csv(args.csv, results, meta)
    dist.destroy_process_group()


def main_fused_output(args, device, tp_group, dtype, modes, backends, compat):
    """--fused-output: the output layers + loss table (and CSV)."""
    gpu = device.type == "cuda"
    args.hidden = args.hidden or (4096 if gpu else 256)
    args.teacher_hidden = args.teacher_hidden or args.hidden
    inp = make_layer_inputs(args.tokens, args.vocab, args.hidden, args.teacher_hidden, dtype, device, tp_group)
    results = measure(layer_rows(inp, modes, args.top_k, backends, args.fused_gemm), args, device)
    tp = dist.get_world_size(tp_group)
    if dist.get_rank() == 0:
        print_layer_table(results, header_line(args, inp.ws.shape[0], device, tp, compat), inp)
        if args.csv:
            meta = {"tokens": args.tokens, "vocab": args.vocab, "tp": tp, "dtype": args.dtype,
                    "hidden": args.hidden, "teacher_hidden": args.teacher_hidden,
                    "device": torch.cuda.get_device_name() if gpu else "cpu", "top_k": args.top_k}
            write_csv(args.csv, results, meta, LAYER_CSV_FIELDS)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
