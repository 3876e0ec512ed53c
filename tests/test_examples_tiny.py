"""examples/tiny trains with 1, 2 (TP2) and 4 (TP2·PP2) CPU processes under
torchrun and writes TensorBoard events with the step's scalars."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCALARS = {
    "loss", "kl", "log_ratio", "advantage", "baseline_explained_variance", "grad_norm", "lr",
    "tokens_per_s", "time/step_s", "time/teacher_forward_s", "time/student_forward_s",
    "time/backward_and_optimizer_s", "memory/peak_gb",
}


def read_scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_tiny_example_runs_and_logs(tmp_path, nproc):
    out = subprocess.run(
        ["bash", str(ROOT / "examples/tiny/run_cpu.sh"), str(nproc), "--train-iters", "2",
         "--save", str(tmp_path / "ckpt"), "--tensorboard-dir", str(tmp_path / "tb")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHON": sys.executable},
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "[vopd] iter      2" in out.stdout
    scalars = read_scalars(tmp_path / "tb")
    assert SCALARS <= scalars.keys(), SCALARS - scalars.keys()
    assert all(len(v) == 2 for k, v in scalars.items() if k in SCALARS)
    assert all(k > 0 for k in scalars["kl"])
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
