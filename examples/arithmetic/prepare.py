"""Prepare the arithmetic testbed once: data, a trained teacher, a warmed-up student.

    python examples/arithmetic/prepare.py [--out runs/arithmetic]

1. `task.py` writes the tokenizer and the disjoint splits (data/).
2. `vopd-sft --which teacher`: the 4-layer teacher, supervised on the worked
   solutions (two stages, see TEACHER_STAGE1 / TEACHER).
3. `vopd-sft`: the 2-layer student, a brief supervised warm-up (few steps), so
   that its own samples look like solutions but are often wrong.
4. `accuracy.py` on both (held-out, vopd-train's evaluation: avg@4 sampled at T=1 as
   distillation samples, and greedy).

Each step is cached: a checkpoint directory is reused when the settings that
made it (recorded in `<dir>/prepare.json`) are unchanged. Seeds are fixed, so
a rerun from scratch gives the same checkpoints up to floating-point
reduction order.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vopd_megatron.errors import entry_point

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG = HERE / "config.yaml"
DATA = HERE / "data"

#: Supervised recipes (fixed before any distillation run was looked at). The teacher
#: trains in two stages: 400 iterations along a 1000-iteration cosine schedule, then
#: 150 more from those weights with a fresh optimizer and a short cosine decay.
TEACHER_STAGE1 = dict(iters=400, decay_iters=1000, batch=64, lr=2e-3, min_lr=1e-4, warmup=30, seed=1234)
TEACHER = dict(iters=150, batch=64, lr=1e-3, min_lr=1e-4, warmup=0, seed=1235, load="teacher_stage1")
STUDENT = dict(iters=300, batch=64, lr=2e-3, min_lr=2e-3, warmup=10, seed=2)
#: How the accuracies before distillation are measured (accuracy.py = vopd-train's evaluation): one
#: sample per problem would be noisy (about +-2 points for the student), so avg@4 at T=1.
ACCURACY = dict(problems=200, samples=4, seed=0)


def _python() -> str:
    return os.environ.get("PYTHON", sys.executable)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def sft(which: str, recipe: dict, out: Path, log) -> None:
    stamp = out / "prepare.json"
    want = {"which": which, **recipe}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (out / "latest_checkpointed_iteration.txt").is_file():
        log(f"[prepare] {which}: cached in {out}")
        return
    log(f"[prepare] {which}: supervised training, {recipe['iters']} iterations -> {out}")
    t0 = time.perf_counter()
    cmd = [_python(), "-m", "vopd_megatron.training.sft", "--config", str(CONFIG), "--which", which,
           "--sft-data", str(DATA / "sft.jsonl"), "--train-iters", str(recipe["iters"]),
           "--global-batch-size", str(recipe["batch"]), "--micro-batch-size", str(recipe["batch"]),
           "--lr", str(recipe["lr"]), "--min-lr", str(recipe["min_lr"]), "--lr-warmup-iters", str(recipe["warmup"]),
           "--seed", str(recipe["seed"]), "--log-interval", "50", "--save", str(out),
           "--save-interval", str(recipe["iters"])]
    if "decay_iters" in recipe:
        cmd += ["--lr-decay-iters", str(recipe["decay_iters"])]
    if "load" in recipe:
        cmd += ["--load", str(out.parent / recipe["load"])]
    _run(cmd, log, prefix="[sft]")
    stamp.write_text(json.dumps(want))
    log(f"[prepare] {which}: done in {time.perf_counter() - t0:.0f} s")


def accuracy_command(which: str, ckpt: Path, greedy: bool) -> list[str]:
    """accuracy.py's arguments: vopd-train's evaluation, avg@ACCURACY["samples"] at T=1, or greedy."""
    cmd = ["--config", str(CONFIG), "--which", which, "--load", str(ckpt), "--rollout-max-new-tokens", "40",
           "--max-problems", str(ACCURACY["problems"]), "--seed", str(ACCURACY["seed"])]
    return cmd + (["--greedy"] if greedy else ["--samples", str(ACCURACY["samples"])])


def accuracy(which: str, ckpt: Path, greedy: bool, log) -> float:
    cmd = [_python(), str(HERE / "accuracy.py"), *accuracy_command(which, ckpt, greedy)]
    line = _run(cmd, log, prefix="accuracy")
    return float(line.split()[1])


def _run(cmd, log, prefix: str) -> str:
    """Run a command from the repository root; echo its lines starting with prefix as they
    come (its progress, every 30 s or so), and return the last of them. Other output (library
    warnings) is shown only if the command fails."""
    out, lines = [], []
    with subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        for ln in proc.stdout:
            ln = ln.rstrip("\n")
            out.append(ln)
            if ln.startswith(prefix):
                lines.append(ln)
                log("    " + ln)
    if proc.returncode != 0 or not lines:
        sys.stderr.write("\n".join(out[-60:]) + "\n")
        raise SystemExit(f"[prepare] failed: {' '.join(cmd)}")
    return lines[-1]


def _print(message: str) -> None:
    print(message, flush=True)  # flushed: in a log (a pipe) it appears as it happens


def prepare(out: Path, log=_print) -> dict:
    """Data + both checkpoints (cached) and their accuracies; returns the summary dict."""
    if not (DATA / "heldout.jsonl").is_file():
        subprocess.run([_python(), str(HERE / "task.py"), "--out", str(DATA)], check=True, env=_env())
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "prepare_summary.json"
    sft("teacher", TEACHER_STAGE1, out / "teacher_stage1", log)
    sft("teacher", TEACHER, out / "teacher", log)
    sft("student", STUDENT, out / "student", log)
    key = {"teacher_stage1": TEACHER_STAGE1, "teacher": TEACHER, "student": STUDENT, "accuracy": ACCURACY}
    if summary_path.is_file():
        cached = json.loads(summary_path.read_text())
        if cached.get("recipes") == key:
            log(f"[prepare] accuracies cached: {cached['accuracy']}")
            return cached
    acc = {}
    for which in ("teacher", "student"):
        for greedy in (False, True):
            acc[f"{which}_{'greedy' if greedy else 'T1'}"] = accuracy(which, out / which, greedy, log)
    summary = {"recipes": key, "accuracy": acc, "teacher": str(out / "teacher"), "student": str(out / "student")}
    summary_path.write_text(json.dumps(summary, indent=1))
    log(f"[prepare] held-out accuracy ({ACCURACY['problems']} problems; T=1: avg@{ACCURACY['samples']}): {acc}")
    return summary


@entry_point
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "arithmetic"))
    args = ap.parse_args(argv)
    try:  # an --out that cannot be created: one error line, before any work
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        ap.error(f"--out {args.out}: cannot create it ({exc.strerror or exc})")
    prepare(Path(args.out))


if __name__ == "__main__":
    main()
