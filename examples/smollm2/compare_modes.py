"""Distil the depth-pruned SmolLM2 (15 layers) from the original (30) with opd, vopd, vopd_opt and full_kl.

    python examples/smollm2/compare_modes.py            # -> docs/smollm2_report.md (+ docs/img/smollm2_*.png)
    python examples/smollm2/compare_modes.py --jobs 1 --out runs/smollm2/compare --report /tmp/report.md

Every run is `vopd-train` on CPU, on-policy (the student samples its completions every step, T=1),
from the same pruned student (`--load ... --finetune`) and teacher (`--teacher-load`), with the same
seed, steps and hyper-parameters (RECIPE, fixed before any comparison ran), the held-out evaluation at
iteration 0, every `eval_interval` and at the end, and the per-step gradient-variance diagnostic
(`variance/*`). Then the exact variance of each mode's full gradient on one fixed batch of prompts
(`vopd_megatron.training.grad_variance`, repeated sampling), and `report.py` writes the report.

Runs are cached (a run directory whose `done.json` records the same command is not run again). The
machine's load average is sampled during the whole invocation and goes into the report, with each
run's wall and CPU seconds: on a shared machine wall time alone says little.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from prepare import CONFIG, EVAL, _env, prepare, rel  # noqa: E402

MODES = ["opd", "vopd", "vopd_opt", "full_kl"]

#: One recipe for every mode, fixed before comparing (docs/smollm2_report.md repeats it). A first attempt
#: at lr 5e-5 collapsed within 4-5 steps in both modes it reached (opd, vopd): the student's samples
#: became near-deterministic (mean log-prob of its own tokens -1.3 and -0.02) while the KL rose again;
#: it was stopped there, before any mode finished, and the learning rate lowered for all modes.
RECIPE = dict(train_iters=16, global_batch=16, micro_batch=4, lr=1e-5, temperature=1.0, max_new_tokens=48,
              eval_interval=8, seed=1, variance_resamples=4, variance_prompts=16,
              variance_modes=["opd", "vopd", "vopd_opt", "full_kl"])


def train_command(mode: str, prep: dict, out: Path, r: dict = RECIPE) -> list[str]:
    data = Path(prep["data"])
    return [sys.executable, "-m", "vopd_megatron.training.train", "--config", rel(CONFIG),
            "--tokenizer-model", rel(prep["hf"]), "--prompt-data", rel(data / "prompts.jsonl"),
            "--teacher-load", rel(prep["teacher"]), "--load", rel(prep["student"]), "--finetune",
            "--vopd-loss", mode, "--vopd-temperature", str(r["temperature"]), "--seed", str(r["seed"]),
            "--train-iters", str(r["train_iters"]), "--global-batch-size", str(r["global_batch"]),
            "--micro-batch-size", str(r["micro_batch"]), "--lr", str(r["lr"]), "--min-lr", str(r["lr"]),
            "--lr-decay-style", "constant", "--rollout-max-new-tokens", str(r["max_new_tokens"]),
            "--eval-data", rel(data / "heldout.jsonl"), "--eval-every", str(r["eval_interval"]),
            "--eval-samples", str(EVAL["samples"]), "--eval-temperature", str(EVAL["temperature"]),
            "--eval-max-new-tokens", str(EVAL["max_new_tokens"]), "--tensorboard-dir", rel(out / "tb")]


def variance_command(prep: dict, out: Path, r: dict = RECIPE) -> list[str]:
    return [sys.executable, "-m", "vopd_megatron.training.grad_variance", "--config", rel(CONFIG),
            "--tokenizer-model", rel(prep["hf"]), "--prompt-data", rel(Path(prep["data"]) / "prompts.jsonl"),
            "--teacher-load", rel(prep["teacher"]), "--load", rel(prep["student"]), "--seed", str(r["seed"]),
            "--micro-batch-size", str(r["micro_batch"]), "--rollout-max-new-tokens", str(r["max_new_tokens"]),
            "--resamples", str(r["variance_resamples"]), "--prompts", str(r["variance_prompts"]),
            "--modes", ",".join(r["variance_modes"]), "--out", rel(out / "exact_variance.json")]


def run_cached(cmd: list[str], out: Path, threads: int) -> dict:
    """Run `cmd` (output to out/log.txt) unless out/done.json records the same command; returns
    {"cmd", "seconds" (wall), "cpu_seconds" (user + system of the process and its children)}."""
    done = out / "done.json"
    if done.is_file() and json.loads(done.read_text())["cmd"] == cmd[1:]:
        return json.loads(done.read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    # /usr/bin/time-like accounting without it: the child's rusage, read from a wrapper process.
    wrapped = [sys.executable, "-c", "import resource, subprocess, sys, json; "
               "rc = subprocess.call(sys.argv[2:]); u = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "open(sys.argv[1], 'w').write(json.dumps({'cpu': u.ru_utime + u.ru_stime, 'rss_kb': u.ru_maxrss})); "
               "sys.exit(rc)", str(out / "rusage.json"), *cmd]
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run(wrapped, cwd=ROOT, env=_env(threads), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({out / 'log.txt'}): {shlex.join(cmd)}")
    usage = json.loads((out / "rusage.json").read_text())
    info = {"cmd": cmd[1:], "seconds": time.perf_counter() - t0, "cpu_seconds": usage["cpu"],
            "peak_rss_gb": usage["rss_kb"] / 2**20}
    done.write_text(json.dumps(info))
    return info


class LoadSampler:
    """The 1-minute load average, every `every` seconds, in a daemon thread."""

    def __init__(self, every: float = 30.0):
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every,), daemon=True)
        self._thread.start()

    def _loop(self, every):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every)

    def stop(self) -> dict:
        self._stop.set()
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": sum(s) / len(s), "max": max(s), "min": min(s), "samples": len(s)}


def _load_report():
    spec = importlib.util.spec_from_file_location("smollm2_report", HERE / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each; 1: two threads)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "smollm2" / "compare"), help="run directory")
    ap.add_argument("--report", default=str(ROOT / "docs" / "smollm2_report.md"), help="Markdown report to write")
    args = ap.parse_args(argv)
    modes, out = args.modes.split(","), Path(args.out)
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"error: --modes: unknown {sorted(unknown)}; choose from {MODES}")
    load = LoadSampler()
    t_start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    prep = prepare(ROOT / "runs" / "smollm2")
    threads = 1 if args.jobs > 1 else 2
    print(f"[compare] {len(modes)} runs ({', '.join(modes)}), {args.jobs} at a time", flush=True)

    def launch(mode):
        info = run_cached(train_command(mode, prep, out / mode), out / mode, threads)
        print(f"[compare] {mode}: {info['seconds']:.0f} s wall, {info['cpu_seconds']:.0f} s CPU", flush=True)
        return info

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = dict(zip(modes, pool.map(launch, modes)))
    print("[compare] exact estimator variance on a fixed batch", flush=True)
    variance_info = run_cached(variance_command(prep, out / "variance"), out / "variance", threads=2)
    variance = json.loads((out / "variance" / "exact_variance.json").read_text())
    cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {"wall_seconds": time.perf_counter() - t_start,
              "cpu_seconds": (cpu_end.ru_utime + cpu_end.ru_stime) - (cpu_start.ru_utime + cpu_start.ru_stime),
              "load": load.stop(), "runs": runs, "variance": variance_info, "cores": os.cpu_count()}
    command = shlex.join(["python", "examples/smollm2/compare_modes.py", *(sys.argv[1:] if argv is None else argv)])
    _load_report().write_report(Path(args.report), out, modes, RECIPE, prep, variance, timing, command,
                                {m: train_command(m, prep, out / m) for m in modes},
                                variance_command(prep, out / "variance"))
    print(f"[compare] report: {args.report} ({timing['wall_seconds'] / 60:.1f} min, load average "
          f"{timing['load']['mean']:.1f} on {timing['cores']} cores)", flush=True)


if __name__ == "__main__":
    main()
