"""Turn each acceptance stage's raw output into a one-line result, a Markdown
section and CSV rows, and the whole run into summary.md / summary.csv.

Run by scripts/acceptance/stage.sh and scripts/gpu_acceptance.sh; each
subcommand exits non-zero when its stage's figures show a failure (a test that
failed, a loss row that errored, a resume that did not continue the run), so a
stage passes only on output that is complete and sane.

    report.py pytest JUNIT.xml --note N --md M --min-passed K
    report.py bench  CSV... --csv-out C --note N
    report.py fused  CSV --note N
    report.py train  METRICS1.jsonl METRICS2.jsonl --first-iters K --dry-run LOG --csv-out C --note N --md M
    report.py tiles  CSV --note N
    report.py teacher CSV --note N
    report.py summary WORK OUT [--print]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

LOSS_MODES = ("opd", "vopd", "vopd_topk", "vopd_opt", "full_kl", "topk_kl")
STAGE_FIELDS = ["stage", "status", "seconds", "limit_s", "result"]


def write(path: Path | None, text: str) -> None:
    if path:
        path.write_text(text if text.endswith("\n") else text + "\n")


def fail(note: Path | None, message: str) -> int:
    write(note, message)
    print(f"error: {message}")
    return 1


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# --- stages ---------------------------------------------------------------------------


def pytest_result(args) -> int:
    """Counts from pytest's JUnit XML; fails on any failure or error, or too few passes."""
    if not Path(args.junit).exists():
        return fail(args.note, f"pytest wrote no report ({args.junit})")
    suite = ET.parse(args.junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    passed = total - failed - errors - skipped
    bad = [f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}" for case in suite.iter("testcase")
           if case.find("failure") is not None or case.find("error") is not None]
    text = f"{passed} passed, {failed + errors} failed, {skipped} skipped"
    write(args.md, f"{text}\n" + "".join(f"- failed: `{b}`\n" for b in bad))
    if failed or errors or passed < args.min_passed:
        return fail(args.note, text + (f" (expected at least {args.min_passed} to pass)" if passed < args.min_passed
                                       else "; " + ", ".join(bad[:5])))
    write(args.note, text)
    return 0


def bench_result(args) -> int:
    """Merge bench_loss CSVs; the headline is `vopd` against Megatron's fused CE and the floor."""
    rows, fields = [], []
    missing = [p for p in args.csvs if not Path(p).exists()]
    for path in args.csvs:
        if path in missing:
            continue
        part = read_csv(path)
        rows += part
        if part and not fields:
            fields = list(part[0])
    if not rows:
        return fail(args.note, "bench_loss wrote no rows")
    missing = [f"no results in {Path(p).name}" for p in missing]
    with open(args.csv_out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    ours = [r for r in rows if r["name"].split(" ")[0] in LOSS_MODES]
    broken = [f"V={r['vocab']} {r['name']}: {r['error']}" for r in rows if r["error"] or num(r["ms"]) is None]
    parts = []
    for vocab in dict.fromkeys(r["vocab"] for r in rows):
        # The headline row: vopd with the default backend ("vopd"), else with the one benchmarked.
        v = min((r for r in ours if r["vocab"] == vocab and r["name"].split(" ")[0] == "vopd"),
                key=lambda r: len(r["name"]), default=None)
        if v and num(v["ms"]) is not None:
            parts.append(f"V={vocab}: vopd {float(v['ms']):.2f} ms, {v['x_fused_time']}x fused CE time, "
                         f"{v['x_fused_mem']}x its memory, {v.get('x_floor') or '-'}x floor")
    text = "; ".join(parts + missing) + (f"; rows that failed: {'; '.join(broken)}" if broken else "")
    ours_broken = [r for r in ours if r["error"] or num(r["ms"]) is None]
    if ours_broken or missing or not parts:
        return fail(args.note, text or "no vopd row")
    write(args.note, text)
    return 0


def fused_result(args) -> int:
    """bench_loss --fused-output rows: each mode's fused output loss against its logits path."""
    rows = read_csv(args.csv) if Path(args.csv).exists() else []
    if not rows:
        return fail(args.note, "bench_loss --fused-output wrote no rows")
    broken = [f"{r['name']}: {r['error']}" for r in rows if r["error"] or num(r["ms"]) is None]
    fused = [r for r in rows if ": fused output" in r["name"]]
    parts = [f"{r['name'].replace(': fused output', '')} {r['x_logits_time']}x time, {r['x_logits_mem']}x memory"
             for r in fused if num(r["ms"]) is not None]
    text = "fused vs logits path: " + "; ".join(parts) + (f"; rows that failed: {'; '.join(broken)}" if broken else "")
    if broken or not parts:
        return fail(args.note, text)
    write(args.note, text)
    return 0


TRAIN_COLUMNS = [("train tok/s", "train_tok_s", ".0f"), ("tok/s with rollout", "e2e_tok_s", ".0f"),
                 ("step s", "step_s", ".3f"), ("rollout s", "rollout_s", ".3f"), ("teacher s", "teacher_s", ".3f"),
                 ("student s", "student_s", ".3f"), ("loss s", "loss_s", ".3f"),
                 ("bwd+opt s", "backward_opt_s", ".3f"), ("peak GiB", "peak_gb", ".2f"), ("KL", "kl", ".4f")]


def train_rows(paths: list[str]) -> list[dict]:
    rows = []
    for run, path in enumerate(paths, 1):
        for line in Path(path).read_text().splitlines():
            m = json.loads(line)
            if "loss" not in m:  # an evaluation line
                continue
            step, rollout = m["time/step_s"], m["time/rollout_s"]
            tokens = m["tokens_per_s"] * step
            rows.append({
                "run": run, "iteration": m["iteration"], "tokens": round(tokens), "train_tok_s": m["tokens_per_s"],
                "e2e_tok_s": tokens / (step + rollout), "step_s": step, "rollout_s": rollout,
                "teacher_s": m["time/teacher_forward_s"], "student_s": m["time/student_forward_s"],
                "loss_s": m.get("time/loss_forward_s"), "backward_opt_s": m["time/backward_and_optimizer_s"],
                "peak_gb": m["memory/peak_gb"], "kl": m["kl"], "loss": m["loss"], "grad_norm": m["grad_norm"],
            })
    return rows


def params(count: str) -> str:
    """'464,020,480' -> '0.46B'; small models in millions."""
    n = int(count.replace(",", ""))
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def train_result(args) -> int:
    """Per-iteration figures of the two launches; checks that the second resumed the first."""
    missing = [p for p in args.metrics if not Path(p).exists()]
    if missing:
        return fail(args.note, f"no metrics from the run(s): {', '.join(missing)}")
    rows = train_rows(args.metrics)
    with open(args.csv_out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["run"])
        writer.writeheader()
        writer.writerows(rows)
    first = [r["iteration"] for r in rows if r["run"] == 1]
    second = [r["iteration"] for r in rows if r["run"] == 2]
    problems = []
    if first != list(range(1, args.first_iters + 1)):
        problems.append(f"first launch logged iterations {first}, expected 1..{args.first_iters}")
    if not second or second[0] != args.first_iters + 1:
        problems.append(f"second launch logged iterations {second}: it did not resume at {args.first_iters + 1}")
    if any(num(r["kl"]) is None or num(r["loss"]) is None for r in rows):
        problems.append("non-finite KL or loss")
    # Steady state: leave out the first iteration of each launch (warm-up, compilation).
    steady = [r for r in rows if r["iteration"] not in (1, args.first_iters + 1)] or rows
    med = {key: statistics.median(r[key] for r in steady if r[key] is not None) for _, key, _ in TRAIN_COLUMNS}
    plan = Path(args.dry_run).read_text() if args.dry_run and Path(args.dry_run).exists() else ""
    sizes = re.search(r"student ([\d,]+) params.*teacher ([\d,]+)", plan)
    planned = re.search(r"needs ([\d.]+) GiB", plan)
    student, teacher = (params(sizes.group(i)) if sizes else "?" for i in (1, 2))
    text = (f"{student} student / {teacher} teacher: "
            f"{med['train_tok_s']:.0f} tok/s training, {med['e2e_tok_s']:.0f} with rollout; step {med['step_s']:.3f} s "
            f"= teacher {med['teacher_s']:.3f} + student {med['student_s']:.3f} + loss {med['loss_s']:.3f} + "
            f"bwd/opt {med['backward_opt_s']:.3f}; rollout {med['rollout_s']:.3f} s; peak {med['peak_gb']:.2f} GiB "
            f"(plan {planned.group(1) if planned else '?'}); resumed at {args.first_iters + 1}")
    head = "| run | iteration | " + " | ".join(c for c, _, _ in TRAIN_COLUMNS) + " |\n"
    head += "|" + " --- |" * (len(TRAIN_COLUMNS) + 2) + "\n"
    body = "".join(f"| {r['run']} | {r['iteration']} | "
                   + " | ".join("-" if r[k] is None else format(r[k], spec) for _, k, spec in TRAIN_COLUMNS) + " |\n"
                   for r in rows)
    write(args.md, f"{text}\n\nMedians over iterations {sorted(r['iteration'] for r in steady)}.\n\n{head}{body}\n"
          f"`vopd-train --dry-run` plan:\n\n```\n{plan.strip()}\n```")
    if problems:
        return fail(args.note, "; ".join(problems) + f" ({text})")
    write(args.note, text)
    return 0


def tiles_result(args) -> int:
    rows = read_csv(args.csv)
    parts, problems = [], []
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        if any(r["default"] == "True" and r["ok"] != "True" for r in mine):
            problems.append(f"the default {family} shape failed or disagreed")
        win = [r for r in mine if r["winner"] == "True"]
        if win:
            w = win[0]
            shape = f"{w['block_n']}x{w['block_v']}x{w['num_warps']}"
            x = sum(float(r["ms"]) for r in win) / sum(float(r["ms"]) for r in mine if r["default"] == "True")
            parts.append(f"{family} {shape} ({x:.2f}x default{', clear win' if w['clear_win'] == 'True' else ''})")
    text = "winners: " + ", ".join(parts)
    if problems or len(parts) < 2:
        return fail(args.note, "; ".join(problems) or "no winner")
    write(args.note, text)
    return 0


def teacher_result(args) -> int:
    rows = {r["variant"]: r for r in read_csv(args.csv)}
    fp8 = rows.get("fp8")
    if not fp8 or num(fp8["ms"]) is None:
        return fail(args.note, f"fp8 teacher did not run: {fp8['error'] if fp8 else 'no row'}")
    write(args.note, f"fp8 {float(fp8['ms']):.2f} ms, {fp8['speedup_vs_bf16']}x bf16; "
                     f"KL(q_bf16 || q_fp8) mean {float(fp8['kl_mean']):.2e}, top-1 agree {float(fp8['top1_agree']):.4f}")
    return 0


# --- the whole run ------------------------------------------------------------------------


def summary(args) -> int:
    """summary.csv and summary.md from WORK/stages.tsv, WORK/notes and WORK/md."""
    work, out = Path(args.work), Path(args.out)
    stages = []
    if (work / "stages.tsv").exists():
        for line in (work / "stages.tsv").read_text().splitlines():
            name, status, seconds, limit = line.split("\t")
            note = work / "notes" / f"{name}.txt"
            result = note.read_text().strip() if note.exists() else ""
            stages.append(dict(stage=name, status=status, seconds=seconds, limit_s=limit, result=result))
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=STAGE_FIELDS)
        writer.writeheader()
        writer.writerows(stages)
    table = "| stage | status | seconds | limit s | result |\n| --- | --- | --- | --- | --- |\n" + "".join(
        f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['limit_s']} | {s['result']} |\n" for s in stages)
    header = (work / "header.md").read_text() if (work / "header.md").exists() else ""
    sections = "".join(f"\n## {s['stage']}\n\n{(work / 'md' / (s['stage'] + '.md')).read_text().strip()}\n"
                       for s in stages if (work / "md" / f"{s['stage']}.md").exists())
    write(out / "summary.md", f"{header}\n{table}{sections}")
    if args.print:
        print(table, end="")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("pytest", "bench", "fused", "train", "tiles", "teacher"):
        s = sub.add_parser(name)
        s.add_argument("--note", type=Path)
        s.add_argument("--md", type=Path)
    sub.choices["pytest"].add_argument("junit")
    sub.choices["pytest"].add_argument("--min-passed", type=int, default=1)
    sub.choices["bench"].add_argument("csvs", nargs="+")
    sub.choices["bench"].add_argument("--csv-out", required=True)
    sub.choices["fused"].add_argument("csv")
    sub.choices["train"].add_argument("metrics", nargs=2)
    sub.choices["train"].add_argument("--first-iters", type=int, required=True)
    sub.choices["train"].add_argument("--dry-run")
    sub.choices["train"].add_argument("--csv-out", required=True)
    sub.choices["tiles"].add_argument("csv")
    sub.choices["teacher"].add_argument("csv")
    s = sub.add_parser("summary")
    s.add_argument("work")
    s.add_argument("out")
    s.add_argument("--print", action="store_true")
    args = p.parse_args(argv)
    run = {"pytest": pytest_result, "bench": bench_result, "fused": fused_result, "train": train_result, "tiles": tiles_result,
           "teacher": teacher_result, "summary": summary}[args.what]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
