"""Resume after SIGKILL reproduces an uninterrupted run exactly (CPU, fp32).

Run A trains 6 iterations straight. Run B saves every 3 iterations and is
killed with SIGKILL as soon as its iteration-3 checkpoint is complete; run C
resumes B's checkpoint to iteration 6. The logged scalars of iterations 4-6
and the final checkpoints (model and optimizer state) must be identical.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.test_examples_tiny import read_scalars

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("time/", "tokens_per_s", "memory/")


def train_cmd(tmp, name, *extra):
    return [sys.executable, "-m", "vopd_megatron.training.train", "--config", "examples/tiny/config.yaml",
            "--train-iters", "6", "--tensorboard-dir", str(tmp / f"tb_{name}"), *extra]


def flat_checkpoint(ckpt_dir: Path, out: Path) -> dict:
    """A torch_dist checkpoint as one flat {key: tensor} dict (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt_dir), str(out))
    state = torch.load(out, weights_only=False)
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, torch.Tensor):
            flat[prefix] = obj

    walk("", state)
    return flat


def test_resume_after_sigkill_is_exact(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    a = subprocess.run(train_cmd(tmp_path, "a", "--save", str(tmp_path / "a"), "--save-interval", "100"),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, a.stderr[-3000:]

    ckpt_b = tmp_path / "b"
    tracker = ckpt_b / "latest_checkpointed_iteration.txt"
    b = subprocess.Popen(train_cmd(tmp_path, "b", "--save", str(ckpt_b), "--save-interval", "3"),
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (tracker.exists() and tracker.read_text().strip() == "3"):
        assert b.poll() is None, "run B ended before it could be killed"
        time.sleep(0.01)
    b.send_signal(signal.SIGKILL)
    assert b.wait() == -signal.SIGKILL

    c = subprocess.run(train_cmd(tmp_path, "c", "--save", str(ckpt_b), "--save-interval", "3", "--load", str(ckpt_b)),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stderr[-3000:]
    assert "iterations 4..6" in c.stdout

    sa, sc = read_scalars(tmp_path / "tb_a"), read_scalars(tmp_path / "tb_c")
    compared = 0
    for tag, values in sc.items():
        if tag.startswith(TIMING):
            continue
        assert len(values) == 3, tag
        assert values == sa[tag][3:], f"{tag}: resumed {values} vs straight {sa[tag][3:]}"
        compared += 1
    assert compared >= 6

    final_a = flat_checkpoint(tmp_path / "a" / "iter_0000006", tmp_path / "a.pt")
    final_c = flat_checkpoint(ckpt_b / "iter_0000006", tmp_path / "c.pt")
    assert final_a.keys() == final_c.keys() and len(final_a) > 10
    assert any("optimizer" in k or "exp_avg" in k for k in final_a), "optimizer state not in the checkpoint"
    for key, tensor in final_a.items():
        assert torch.equal(tensor, final_c[key]), key


def torchrun_cmd(tmp, name, nproc, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "-m", "vopd_megatron.training.train", "--config", "examples/tiny/config.yaml",
            # The rollout file: a fixed batch isolates what is compared here
            # (the resharded weights), independent of per-layout sampling.
            "--prompt-data", "", "--rollout-data", "examples/tiny/rollouts.jsonl",
            "--tensorboard-dir", str(tmp / f"tb_{name}"), *extra]


def test_checkpoint_saved_at_tp2_resumes_at_tp1_and_pp2(tmp_path):
    """Save at TP2 after 2 iterations; the 3rd iteration's loss is the same
    resumed at TP2, TP1 and PP2 (dist-checkpointing reshards on load)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    teacher = tmp_path / "teacher"  # one fixed teacher for every layout
    made = subprocess.run([sys.executable, "tools/init_checkpoint.py", "--config", "examples/tiny/config.yaml",
                           "--which", "teacher", "--out", str(teacher)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    saved = tmp_path / "tp2"
    first = subprocess.run(torchrun_cmd(tmp_path, "first", 2, "--tensor-model-parallel-size", "2",
                                        "--train-iters", "2", "--save", str(saved), "--teacher-load", str(teacher)),
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    third = {}
    for name, nproc, layout in (("tp2", 2, ["--tensor-model-parallel-size", "2"]),
                                ("tp1", 1, []),
                                ("pp2", 2, ["--pipeline-model-parallel-size", "2"])):
        out = subprocess.run(torchrun_cmd(tmp_path, name, nproc, *layout, "--train-iters", "3",
                                          "--load", str(saved), "--save", str(tmp_path / f"resumed_{name}"),
                                          "--teacher-load", str(teacher)),
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (name, out.stderr[-3000:])
        assert "iterations 3..3" in out.stdout, out.stdout[-1000:]
        third[name] = read_scalars(tmp_path / f"tb_{name}")
    for name in ("tp1", "pp2"):
        for tag in ("kl", "loss", "log_ratio"):
            got, ref = third[name][tag][0], third["tp2"][tag][0]
            assert abs(got - ref) <= 1e-5 * max(1.0, abs(ref)), (name, tag, got, ref)
