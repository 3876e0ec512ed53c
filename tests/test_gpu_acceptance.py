"""The GPU acceptance run (scripts/gpu_acceptance.sh) rehearsed on CPU, and the
step timer whose split it reports.

The rehearsal spawns the script with --cpu-smoke: every stage at tiny size on
CPU/gloo, the Triton kernels in the interpreter. It asserts that each stage
passed (or, for the FP8 teacher without Transformer Engine, was skipped with
the reason) and that every output file exists, parses and holds the rows a
GPU run will fill, so the script cannot rot between device leases. Process
behaviour (time boxes, the budget, exit status) is the point, hence
subprocesses.
"""
import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from vopd_megatron.loss import LOSS_MODES
from vopd_megatron.timing import SectionTimer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_acceptance.sh"
STAGES = ["install", "env", "gpu_tests", "bench_loss", "bench_fused", "train", "tiles", "teacher_fp8"]
OUT_FILES = {"summary.md", "summary.csv", "env.txt", "bench_loss.csv", "bench_loss.md", "train.csv", "tiles.csv",
             "logs.tar.gz"}


def run_script(tmp_path, *args, timeout=1500):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def numbers(rows, key) -> list[float]:
    return [float(r[key]) for r in rows]


# --- the step timer ---------------------------------------------------------------------


def test_section_timer_accumulates_and_resets():
    timer = SectionTimer()
    for _ in range(2):
        with timer.section("a"):
            time.sleep(0.02)
    with timer.section("b"):
        pass
    seconds = timer.seconds()
    assert set(seconds) == {"a", "b"} and seconds["a"] >= 0.04 and seconds["b"] < seconds["a"]
    timer.reset()
    assert timer.seconds() == {}


@pytest.mark.gpu
def test_section_timer_measures_device_time_not_launch_time(gpu_device):
    # On a GPU the section queues a kernel that spins for a known time: a host
    # clock around the launch sees microseconds, the timer must see the spin.
    # (Rehearsal on CPU: the host clock around a sleep.)
    timer = SectionTimer()
    if gpu_device == "cpu":
        with timer.section("work"):
            time.sleep(0.05)
        assert timer.seconds()["work"] >= 0.05
        return
    cycles = int(1e8)  # about 50 ms at 2 GHz
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    spin = start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    with timer.section("work"):
        torch.cuda._sleep(cycles)
    host = time.perf_counter() - t0
    measured = timer.seconds()["work"]
    assert host < 0.5 * spin < measured < 2 * spin, (host, spin, measured)


# --- the script ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("acceptance")
    proc = run_script(tmp)
    return tmp / "out", proc


def test_rehearsal_passes_every_stage(rehearsal):
    out, proc = rehearsal
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    stages = read_rows(out / "summary.csv")
    assert [s["stage"] for s in stages] == STAGES
    te = False
    try:
        import transformer_engine  # noqa: F401
        te = torch.cuda.is_available()
    except ImportError:
        pass
    for s in stages:
        if s["stage"] == "teacher_fp8" and not te:
            assert s["status"] == "skipped" and "Transformer Engine" in s["result"], s
        else:
            assert s["status"] == "pass", s
        assert 0 <= int(s["seconds"]) <= int(s["limit_s"]) + 10
    # The table the device reply shows last, and the Markdown summary.
    assert "| train | pass |" in proc.stdout
    summary = (out / "summary.md").read_text()
    assert "| stage | status |" in summary and "## bench_loss" in summary and "## train" in summary


def test_rehearsal_output_files(rehearsal):
    out, _ = rehearsal
    # The device tool brings back at most 8 files, none in sub-folders deeper than 2.
    assert {p.name for p in out.iterdir()} == OUT_FILES
    assert all(p.is_file() for p in out.iterdir())
    env = (out / "env.txt").read_text()
    assert "torch " in env and "megatron-core 0.19" in env
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./logs/train.log", "./logs/gpu_tests.xml", "./tb1/metrics.jsonl", "./tb2/metrics.jsonl"} <= names


def test_rehearsal_gpu_tests_ran_the_kernel_cases(rehearsal):
    out, _ = rehearsal
    gpu_tests = next(s for s in read_rows(out / "summary.csv") if s["stage"] == "gpu_tests")
    passed = int(gpu_tests["result"].split(" passed")[0])
    assert passed >= 2 * len(LOSS_MODES) + 1  # every mode x {fp32, bf16} at V = 1271, and the timer


def test_rehearsal_bench_loss_rows(rehearsal):
    out, _ = rehearsal
    rows = read_rows(out / "bench_loss.csv")
    assert {r["vocab"] for r in rows} == {"1271", "1519"}
    for vocab in ("1271", "1519"):
        mine = {r["name"]: r for r in rows if r["vocab"] == vocab}
        expected = {"megatron_ce", "megatron_ce_fused", "unfused_full_kl"}
        expected |= {f"{m} (k=64) [triton]" if m in ("vopd_topk", "topk_kl") else f"{m} [triton]" for m in LOSS_MODES}
        assert expected <= mine.keys(), expected - mine.keys()
        for r in mine.values():
            assert not r["error"] and float(r["ms"]) > 0 and float(r["mb"]) >= 0, r
            assert float(r["x_floor"]) > 0 and r["pct_peak"].endswith("%"), r  # --peak-gbs given
    # Two vocabularies, then bench_fused's table under its own heading.
    text = (out / "bench_loss.md").read_text()
    assert text.count("| name | time ms |") == 3 and text.index("### --fused-output") > text.rindex("| megatron_ce")


def test_rehearsal_bench_fused_rows(rehearsal):
    out, _ = rehearsal
    with tarfile.open(out / "logs.tar.gz") as tar:
        rows = list(csv.DictReader(io.TextIOWrapper(tar.extractfile("./bench_fused.csv"))))
    names = {r["name"] for r in rows}
    for mode in ("vopd [triton]", "full_kl [triton]", "vopd_topk (k=64) [triton]"):
        expected = {f"{mode}: logits path", f"{mode}: fused output", f"{mode}: fused output (tl.dot GEMMs)"}
        assert expected <= names, names
    assert all(not r["error"] and float(r["ms"]) > 0 for r in rows), rows
    summary = {s["stage"]: s for s in read_rows(out / "summary.csv")}
    assert summary["bench_fused"]["result"].count("x time") == 6


def test_rehearsal_train_saved_resumed_and_split_the_step(rehearsal):
    out, _ = rehearsal
    rows = read_rows(out / "train.csv")
    assert [(r["run"], r["iteration"]) for r in rows] == [("1", "1"), ("1", "2"), ("2", "3")]
    for r in rows:
        parts = [float(r[k]) for k in ("teacher_s", "student_s", "loss_s", "backward_opt_s")]
        assert all(p > 0 for p in parts) and sum(parts) == pytest.approx(float(r["step_s"]), rel=1e-6), r
        assert float(r["rollout_s"]) > 0 and float(r["peak_gb"]) > 0 and float(r["tokens"]) > 0
        assert float(r["e2e_tok_s"]) < float(r["train_tok_s"])  # the rollout costs time too
    summary = {s["stage"]: s for s in read_rows(out / "summary.csv")}
    assert "resumed at 3" in summary["train"]["result"]


def test_rehearsal_tile_sweep(rehearsal):
    out, _ = rehearsal
    rows = read_rows(out / "tiles.csv")
    assert {r["kernel"] for r in rows} == {"stats", "sampled_grad", "full_kl_grad"}
    assert all(r["ok"] == "True" and float(r["ms"]) > 0 for r in rows)  # every shape agrees with the default
    for family in ("stats", "grad"):
        winners = {(r["block_n"], r["block_v"], r["num_warps"]) for r in rows if r["family"] == family
                   and r["winner"] == "True"}
        assert len(winners) == 1
        assert sum(r["default"] == "True" for r in rows if r["family"] == family) == (1 if family == "stats" else 2)


def test_a_stage_past_its_limit_is_stopped_and_the_run_goes_on(tmp_path):
    # --stage-limit 5: the train stage (a dry run and two vopd-train launches)
    # cannot finish in 5 s; it is killed at its limit, recorded as a timeout,
    # and the next stage still runs.
    t0 = time.monotonic()
    proc = run_script(tmp_path, "--stages", "train,env", "--stage-limit", "5", timeout=180)
    took = time.monotonic() - t0
    assert proc.returncode == 1
    stages = read_rows(tmp_path / "out" / "summary.csv")
    assert [s["stage"] for s in stages] == ["train", "env"]
    assert stages[0]["status"] == "timeout" and "timed out after 5s" in stages[0]["result"], stages[0]
    assert stages[1]["status"] in ("pass", "timeout") and int(stages[1]["limit_s"]) == 5
    assert took < 60, took


def test_budget_spent_marks_stages_not_run(tmp_path):
    proc = run_script(tmp_path, "--stages", "env", "--budget", "5", timeout=120)
    assert proc.returncode == 1
    (stage,) = read_rows(tmp_path / "out" / "summary.csv")
    assert stage["status"] == "not_run" and "budget" in stage["result"]


@pytest.mark.parametrize("args,message", [
    (["--stages", "env,warp"], "unknown stage 'warp'"),
    (["--budget", "8min"], "'8min' is not a number of seconds"),
    (["--out"], "--out needs a value"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr


# --- the wheels and the import closure ------------------------------------------------------------


def load_env_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("env_report", ROOT / "scripts" / "acceptance" / "env_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_closure_catches_a_missing_wheel_and_a_stale_pin():
    import megatron.core  # noqa: F401 - the check looks at what this process imported

    er = load_env_report()
    image = er.read_names(ROOT / "scripts" / "acceptance" / "image_packages.txt")
    assert er.pins() == {"megatron-core": "0.19.2"}
    assert not [p for p in er.closure_problems() if "megatron-core" in p]
    missing = er.closure_problems(carried={}, image_names=image)
    assert any(p.startswith("megatron-core (imported as megatron") for p in missing), missing
    stale = er.closure_problems(carried={"megatron-core": "0.0.1"}, image_names=image)
    assert any("pins megatron-core==0.0.1" in p for p in stale), stale
    on_image = er.closure_problems(carried={}, image_names=image + ["megatron-core"])
    assert not [p for p in on_image if "megatron-core" in p], on_image


def test_download_helper_plans_the_device_wheels():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "download_gpu_wheels.sh"), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    for needed in ("--no-deps", "--only-binary=:all:", "--python-version 3.12", "manylinux_2_24_x86_64",
                   "megatron-core==0.19.2"):
        assert needed in proc.stdout


def test_metrics_of_a_resumed_run_are_checked(tmp_path):
    # report.py train fails a second launch that did not continue the first.
    first = [{"iteration": i, "loss": 1.0, "kl": 0.1, "grad_norm": 1.0, "tokens_per_s": 100.0, "time/step_s": 1.0,
              "time/rollout_s": 1.0, "time/teacher_forward_s": 0.2, "time/student_forward_s": 0.2,
              "time/loss_forward_s": 0.1, "time/backward_and_optimizer_s": 0.5, "memory/peak_gb": 1.0}
             for i in (1, 2)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(m) + "\n" for m in first))
    (tmp_path / "b.jsonl").write_text(json.dumps({**first[0], "iteration": 1}) + "\n")  # started over
    cmd = [sys.executable, str(ROOT / "scripts" / "acceptance" / "report.py"), "train", str(tmp_path / "a.jsonl"),
           str(tmp_path / "b.jsonl"), "--first-iters", "2", "--csv-out", str(tmp_path / "t.csv"),
           "--note", str(tmp_path / "note")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "did not resume at 3" in (tmp_path / "note").read_text()
    (tmp_path / "b.jsonl").write_text(json.dumps({**first[0], "iteration": 3}) + "\n")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
    note = (tmp_path / "note").read_text()
    assert "100 tok/s training, 50 with rollout" in note and "resumed at 3" in note
