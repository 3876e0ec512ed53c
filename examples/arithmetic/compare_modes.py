"""Distil the warmed-up student from the teacher with every loss mode, and write the report.

    python examples/arithmetic/compare_modes.py                 # full: 6 modes x 3 seeds -> docs/arithmetic_report.md
    python examples/arithmetic/compare_modes.py --short         # demo: opd vs vopd (+ vopd at TP2), 1 seed, 24 steps
                                                                #   -> runs/arithmetic/short/report.md

Every run is `vopd-train` (on-policy: the student samples its completions
each step) from the same warmed-up student (`--load ... --finetune`) and the
same teacher (`--teacher-load`), with the held-out evaluation (`--eval-*`:
reverse KL to the teacher on the student's samples, and accuracy, at
iteration 0, every --eval-every, and at the end) and the per-step
gradient-variance diagnostic (`variance/*`). Hyper-parameters are one table,
RECIPE, the same for every mode, fixed before any comparison was run. The
short demo (SHORT) is sized to show, in a few minutes, what distillation
does (held-out KL down, accuracy up); it also repeats the vopd run at TP2
(two gloo processes under torchrun). Progress: one display over all
iterations, each held-out evaluation as it is printed, and at the end each
run's held-out KL and accuracy at its first and last evaluation.

Also measured: the exact estimator variance of each mode's full gradient on a
fixed batch (repeated sampling, `vopd_megatron.training.grad_variance`), and
the time of the loss call for vopd vs vopd_topk (the baseline's cost), at the
runs' shapes and at an LLM-sized vocabulary. `report.py` turns the run
directories into the Markdown report with plots.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # vopd_megatron from this checkout

from prepare import CONFIG, DATA, prepare  # noqa: E402

MODES = ["opd", "vopd", "vopd_topk", "vopd_opt", "full_kl", "topk_kl"]

#: One recipe for every mode, chosen before comparing (docs/arithmetic_report.md repeats it).
#: SHORT, the quick-start demo, was sized afterwards (docs/arithmetic.md, "The short demo"): a
#: smaller LR than RECIPE's, which first raises the KL for several steps from a fresh Adam.
RECIPE = dict(
    train_iters=24, global_batch=64, lr=5e-4, top_k=4, temperature=1.0, max_new_tokens=40,
    eval_interval=8, eval_problems=100, eval_samples=1, seeds=[1, 2, 3],
    variance_resamples=8, variance_prompts=64,
)
SHORT = dict(RECIPE, train_iters=24, lr=2e-4, eval_interval=12, eval_problems=200, eval_samples=2, seeds=[1],
             variance_resamples=4, variance_prompts=32)


def train_command(mode: str, seed: int, recipe: dict, prep: dict, out: Path, tp: int = 1) -> list[str]:
    """The vopd-train command of one run; tp > 1: under torchrun, one gloo process per TP rank."""
    r = recipe
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp)] if tp > 1 else []
    cmd = [sys.executable, *launcher, "-m", "vopd_megatron.training.train", "--config", str(CONFIG.relative_to(ROOT)),
           "--tensor-model-parallel-size", str(tp), "--log-interval", "1",
           "--prompt-data", str((DATA / "prompts.jsonl").relative_to(ROOT)),
           "--teacher-load", prep["teacher"], "--load", prep["student"], "--finetune",
           "--vopd-loss", mode, "--vopd-temperature", str(r["temperature"]), "--seed", str(seed),
           "--train-iters", str(r["train_iters"]), "--global-batch-size", str(r["global_batch"]),
           "--micro-batch-size", str(r["global_batch"]), "--lr", str(r["lr"]), "--min-lr", str(r["lr"]),
           "--lr-decay-style", "constant", "--lr-warmup-iters", str(r.get("warmup", 0)),
           "--rollout-max-new-tokens", str(r["max_new_tokens"]),
           "--eval-data", str((DATA / "heldout.jsonl").relative_to(ROOT)), "--eval-every", str(r["eval_interval"]),
           "--eval-max-problems", str(r["eval_problems"]), "--eval-samples", str(r["eval_samples"]),
           "--tensorboard-dir", str(out / "tb")]
    if mode in ("vopd_topk", "topk_kl"):
        cmd += ["--vopd-top-k", str(r["top_k"])]
    return cmd


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def is_cached(cmd: list[str], out: Path) -> bool:
    done = out / "done.json"
    return done.is_file() and json.loads(done.read_text())["cmd"] == cmd[1:]


def run_one(cmd: list[str], out: Path, threads: int, on_line=None) -> dict:
    """One vopd-train run (cached when its metrics.jsonl is complete for this exact command).

    Its output goes to `out/log.txt`; `on_line(line)` also sees each line as it comes (progress)."""
    done = out / "done.json"
    if is_cached(cmd, out):
        return json.loads(done.read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log, subprocess.Popen(
            cmd, cwd=ROOT, env=_env(threads), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1) as proc:
        for line in proc.stdout:
            log.write(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({out / 'log.txt'}): {shlex.join(cmd)}")
    info = {"cmd": cmd[1:], "seconds": time.perf_counter() - t0}
    done.write_text(json.dumps(info))
    return info


def exact_variance(recipe: dict, prep: dict, out: Path) -> dict:
    """grad_variance on the warmed-up student: the variance of each mode's full gradient."""
    path = out / "exact_variance.json"
    cmd = [sys.executable, "-m", "vopd_megatron.training.grad_variance", "--config", str(CONFIG.relative_to(ROOT)),
           "--prompt-data", str((DATA / "prompts.jsonl").relative_to(ROOT)), "--teacher-load", prep["teacher"],
           "--load", prep["student"], "--vopd-top-k", str(recipe["top_k"]), "--micro-batch-size",
           str(recipe["variance_prompts"]), "--rollout-max-new-tokens", str(recipe["max_new_tokens"]),
           "--vopd-loss", "vopd_topk", "--resamples", str(recipe["variance_resamples"]),
           "--prompts", str(recipe["variance_prompts"]), "--modes", "opd,vopd,vopd_topk,vopd_opt,full_kl",
           "--out", str(path)]
    if not (path.is_file() and json.loads(path.read_text()).get("cmd") == cmd[1:]):
        subprocess.run(cmd, cwd=ROOT, env=_env(2), check=True, capture_output=True)
        data = json.loads(path.read_text())
        data["cmd"] = cmd[1:]
        path.write_text(json.dumps(data, indent=1))
    return json.loads(path.read_text())


def time_baselines(n_tokens: int, vocab: int, top_k: int, repeats: int = 20) -> dict:
    """Median seconds of one loss call (forward + backward) per mode, TP = 1, fp32, CPU.

    One intra-op thread: on a shared machine, a spinning thread pool turns
    millisecond calls into noise of 100 ms or more."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    from vopd_megatron.loss import LossConfig, vocab_parallel_opd_loss

    g = torch.Generator().manual_seed(0)
    z = torch.randn(n_tokens, vocab, generator=g) * 3
    u = z + torch.randn(n_tokens, vocab, generator=g)
    a = torch.randint(0, vocab, (n_tokens,), generator=g)
    mask = torch.ones(n_tokens)
    modes = ("opd", "vopd", "vopd_topk")
    times = {m: [] for m in modes}
    for i in range(repeats + 2):  # rounds run every mode once, so load drift hits all alike
        for mode in modes:
            cfg = LossConfig(mode=mode, top_k=top_k if mode == "vopd_topk" else None)
            leaf = z.clone().requires_grad_()
            t0 = time.perf_counter()
            loss_sum, _, _ = vocab_parallel_opd_loss(leaf, u, a, mask, cfg, vocab_size=vocab)
            loss_sum.backward()
            if i >= 2:  # warm-up rounds
                times[mode].append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return {m: statistics.median(t) for m, t in times.items()}


def run_dir(out: Path, mode: str, seed: int, tp: int) -> Path:
    return out / (f"{mode}_s{seed}" + (f"_tp{tp}" if tp > 1 else ""))


def run_all(jobs: list[tuple[str, int, int]], recipe: dict, prep: dict, out: Path, parallel: int) -> None:
    """Run (mode, seed, tp) jobs, `parallel` at a time, one thread per process; show their progress:
    one display over all iterations, and each held-out evaluation as it is printed."""
    from vopd_megatron.progress import Progress, echo

    cmds = {job: train_command(job[0], job[1], recipe, prep, run_dir(out, *job), tp=job[2]) for job in jobs}
    todo = [job for job in jobs if not is_cached(cmds[job], run_dir(out, *job))]
    print(f"[compare] {len(jobs)} runs ({', '.join(f'{m} s{s}' + (f' TP{tp}' if tp > 1 else '') for m, s, tp in jobs)}"
          f"; {len(jobs) - len(todo)} cached), {parallel} at a time", flush=True)
    progress = None  # started at the first iteration: the rate and ETA leave out start-up and the first evaluation
    lock = threading.Lock()

    def launch(job):
        mode, seed, tp = job
        name = f"{mode} s{seed}" + (f" TP{tp}" if tp > 1 else "")

        def on_line(line):
            nonlocal progress
            with lock:
                if line.startswith("[vopd] iter"):
                    if progress is None:  # the clock starts after this first iteration
                        progress = Progress(len(todo) * recipe["train_iters"], "[compare] training", initial=1,
                                            file=sys.stdout, enabled=True)
                    else:
                        progress.update(1)
                elif line.startswith("[vopd] eval @"):
                    echo(f"[compare] {name}: {line[len('[vopd] '):]}")

        info = run_one(cmds[job], run_dir(out, *job), threads=1 if parallel > 1 else 2, on_line=on_line)
        with lock:
            echo(f"[compare] {name}: {info['seconds']:.0f} s")
        return info

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(launch, jobs))
    if progress is not None:
        progress.close()


def held_out_summary(out: Path, jobs: list[tuple[str, int, int]]) -> list[str]:
    """One line per run: held-out reverse KL and accuracy at the first and the last evaluation."""
    from report import read_run

    lines = []
    for mode, seed, tp in jobs:
        _, ev = read_run(run_dir(out, mode, seed, tp))
        (i0, kl0), (i1, kl1) = ev["eval/reverse_kl"][0], ev["eval/reverse_kl"][-1]
        acc0, acc1 = ev["eval/avg@k"][0][1], ev["eval/avg@k"][-1][1]
        name = f"{mode} s{seed}" + (f" TP{tp}" if tp > 1 else "")
        lines.append(f"[compare] {name}: held-out reverse KL {kl0:.4f} -> {kl1:.4f}, accuracy {acc0:.1%} -> "
                     f"{acc1:.1%} (iteration {i0} -> {i1})")
    return lines


def tp2_section(out: Path, seed: int, samples: int) -> str:
    """Markdown: the vopd run at TP1 and at TP2 (same seed), held-out KL and accuracy at each evaluation."""
    from report import read_run

    rows = []
    for tp in (1, 2):
        _, ev = read_run(run_dir(out, "vopd", seed, tp))
        kl = ", ".join(f"{v:.4f}" for _, v in ev["eval/reverse_kl"])
        acc = ", ".join(f"{v:.1%}" for _, v in ev["eval/avg@k"])
        rows.append(f"| {tp} | {kl} | {acc} |")
    steps = ", ".join(str(it) for it, _ in ev["eval/reverse_kl"])
    return "\n".join([
        "", "## The same vopd run at TP2", "",
        "`vopd-train --tensor-model-parallel-size 2` under torchrun (two gloo processes), same seed and "
        "checkpoints. The vocabulary-parallel loss is exact, so the runs differ only by floating-point "
        "reduction order (which can flip a sampled token and so the later rollouts).", "",
        f"| TP | held-out reverse KL at iterations {steps} | accuracy (avg@{samples}) |", "| --- | --- | --- |", *rows, ""])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="the quick demo: opd vs vopd (and vopd at TP2), one seed, "
                                                            "24 steps")
    ap.add_argument("--modes", default=None, help="comma-separated subset (default: all six; --short: opd,vopd)")
    ap.add_argument("--jobs", type=int, default=3, help="runs in parallel (one thread each)")
    ap.add_argument("--out", default=None, help="run directory (default runs/arithmetic/{full,short})")
    ap.add_argument("--report", default=None, help="Markdown report (default docs/arithmetic_report.md; "
                                                   "--short: <out>/report.md)")
    args = ap.parse_args(argv)
    recipe = SHORT if args.short else RECIPE
    modes = [m for m in args.modes.split(",") if m] if args.modes else (["opd", "vopd"] if args.short else MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:  # before the teacher is trained, not after
        ap.error(f"--modes: unknown {unknown}; choose from {','.join(MODES)}" if unknown else "--modes names no mode")
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs} must be >= 1")
    out = Path(args.out or ROOT / "runs" / "arithmetic" / ("short" if args.short else "full"))
    report = Path(args.report) if args.report else (out / "report.md" if args.short else ROOT / "docs" / "arithmetic_report.md")
    t_start = time.perf_counter()
    prep = prepare(ROOT / "runs" / "arithmetic")

    jobs = [(m, s, 1) for s in recipe["seeds"] for m in modes]
    if args.short and "vopd" in modes:  # the same run at TP2: two gloo processes under torchrun
        jobs.append(("vopd", recipe["seeds"][0], 2))
    run_all(jobs, recipe, prep, out, args.jobs)
    print("[compare] exact estimator variance on a fixed batch", flush=True)
    variance = exact_variance(recipe, prep, out)
    print("[compare] timing the loss call (baseline cost)", flush=True)
    n_run = recipe["global_batch"] * 48
    timing = {"run_shape": {"tokens": n_run, "vocab": 23, **time_baselines(n_run, 23, recipe["top_k"])}}
    if not args.short:
        timing["llm_shape"] = {"tokens": 2048, "vocab": 32000,
                               **time_baselines(2048, 32000, recipe["top_k"], repeats=7)}
    from report import write_report

    command = shlex.join(["python", "examples/arithmetic/compare_modes.py", *(sys.argv[1:] if argv is None else argv)])
    write_report(report, out, modes, recipe, prep, variance, timing, command,
                 wall_seconds=time.perf_counter() - t_start, short=args.short)
    if any(tp > 1 for *_, tp in jobs):
        with report.open("a") as f:
            f.write(tp2_section(out, recipe["seeds"][0], recipe["eval_samples"]))
    for line in held_out_summary(out, jobs):
        print(line, flush=True)
    print(f"[compare] report: {report} ({time.perf_counter() - t_start:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()
