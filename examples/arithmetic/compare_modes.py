"""Distil the warmed-up student from the teacher with every loss mode, and write the report.

    python examples/arithmetic/compare_modes.py                 # full: 6 modes x 3 seeds -> docs/arithmetic_report.md
    python examples/arithmetic/compare_modes.py --short         # demo: opd vs vopd, 1 seed, 8 steps -> runs/arithmetic/short/report.md

Every run is `vopd-train` (on-policy: the student samples its completions
each step) from the same warmed-up student (`--load ... --finetune`) and the
same teacher (`--teacher-load`), with the held-out evaluation (`--eval-*`:
reverse KL to the teacher on the student's samples, and accuracy, at
iteration 0, every --eval-every, and at the end) and the per-step
gradient-variance diagnostic (`variance/*`). Hyper-parameters are one table,
RECIPE, the same for every mode, fixed before any comparison was run.

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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from prepare import CONFIG, DATA, prepare  # noqa: E402

MODES = ["opd", "vopd", "vopd_topk", "vopd_opt", "full_kl", "topk_kl"]

#: One recipe for every mode, chosen before comparing (docs/arithmetic_report.md repeats it).
RECIPE = dict(
    train_iters=24, global_batch=64, lr=5e-4, top_k=4, temperature=1.0, max_new_tokens=40,
    eval_interval=8, eval_problems=100, eval_samples=1, seeds=[1, 2, 3],
    variance_resamples=8, variance_prompts=64,
)
SHORT = dict(RECIPE, train_iters=8, eval_interval=4, eval_problems=64, seeds=[1],
             variance_resamples=4, variance_prompts=32)


def train_command(mode: str, seed: int, recipe: dict, prep: dict, out: Path) -> list[str]:
    r = recipe
    cmd = [sys.executable, "-m", "vopd_megatron.training.train", "--config", str(CONFIG.relative_to(ROOT)),
           "--prompt-data", str((DATA / "prompts.jsonl").relative_to(ROOT)),
           "--teacher-load", prep["teacher"], "--load", prep["student"], "--finetune",
           "--vopd-loss", mode, "--vopd-temperature", str(r["temperature"]), "--seed", str(seed),
           "--train-iters", str(r["train_iters"]), "--global-batch-size", str(r["global_batch"]),
           "--micro-batch-size", str(r["global_batch"]), "--lr", str(r["lr"]), "--min-lr", str(r["lr"]),
           "--lr-decay-style", "constant", "--rollout-max-new-tokens", str(r["max_new_tokens"]),
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


def run_one(cmd: list[str], out: Path, threads: int) -> dict:
    """One vopd-train run (cached when its metrics.jsonl is complete for this exact command)."""
    done = out / "done.json"
    if done.is_file() and json.loads(done.read_text())["cmd"] == cmd[1:]:
        return json.loads(done.read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(threads), stdout=log, stderr=subprocess.STDOUT)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="the quick demo: opd vs vopd, one seed, 8 steps")
    ap.add_argument("--modes", default=None, help="comma-separated subset (default: all six; --short: opd,vopd)")
    ap.add_argument("--jobs", type=int, default=3, help="runs in parallel (one thread each)")
    ap.add_argument("--out", default=None, help="run directory (default runs/arithmetic/{full,short})")
    ap.add_argument("--report", default=None, help="Markdown report (default docs/arithmetic_report.md; "
                                                   "--short: <out>/report.md)")
    args = ap.parse_args(argv)
    recipe = SHORT if args.short else RECIPE
    modes = args.modes.split(",") if args.modes else (["opd", "vopd"] if args.short else MODES)
    out = Path(args.out or ROOT / "runs" / "arithmetic" / ("short" if args.short else "full"))
    report = Path(args.report) if args.report else (out / "report.md" if args.short else ROOT / "docs" / "arithmetic_report.md")
    t_start = time.perf_counter()
    prep = prepare(ROOT / "runs" / "arithmetic")

    jobs = [(m, s) for s in recipe["seeds"] for m in modes]
    print(f"[compare] {len(jobs)} runs ({', '.join(modes)} x seeds {recipe['seeds']}), {args.jobs} at a time",
          flush=True)

    def launch(job):
        mode, seed = job
        info = run_one(train_command(mode, seed, recipe, prep, out / f"{mode}_s{seed}"), out / f"{mode}_s{seed}",
                       threads=1 if args.jobs > 1 else 2)
        print(f"[compare] {mode} seed {seed}: {info['seconds']:.0f} s", flush=True)
        return info

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(launch, jobs))
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
    print(f"[compare] report: {report} ({time.perf_counter() - t_start:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()
