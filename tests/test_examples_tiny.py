"""examples/tiny trains with 1, 2 (TP2) and 4 (TP2·PP2) CPU processes under
torchrun and writes TensorBoard events with the step's scalars."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCALARS = {
    "loss", "kl", "log_ratio", "advantage", "baseline_explained_variance", "grad_norm", "lr",
    "tokens_per_s", "time/step_s", "time/teacher_forward_s", "time/student_forward_s", "time/loss_forward_s",
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
    # progress in a log: rank 0 alone prints it, a line at the first iteration and at the end
    progress = [ln for ln in out.stderr.splitlines() if ln.startswith("[vopd] train ")]
    assert [ln.split(" [")[0] for ln in progress] == ["[vopd] train 1/2", "[vopd] train 2/2"], progress
    assert "kl=" in progress[-1]
    scalars = read_scalars(tmp_path / "tb")
    assert SCALARS <= scalars.keys(), SCALARS - scalars.keys()
    assert all(len(v) == 2 for k, v in scalars.items() if k in SCALARS)
    assert all(k > 0 for k in scalars["kl"])
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_several_ppo_clipped_updates_per_rollout_batch(tmp_path):
    """--vopd-updates-per-batch 2 with --vopd-ppo-clip: two optimizer steps per
    on-policy batch, the PPO clip statistic logged, and a different result
    from one update per batch (the second update really happens)."""
    curves = {}
    for updates in (1, 2):
        out = subprocess.run(
            [sys.executable, "-m", "vopd_megatron.training.train", "--config", "examples/tiny/config.yaml",
             "--train-iters", "2", "--vopd-ppo-clip", "0.2", "--vopd-updates-per-batch", str(updates),
             "--tensorboard-dir", str(tmp_path / f"tb{updates}")],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        curves[updates] = read_scalars(tmp_path / f"tb{updates}")
    assert "ppo_clipped" in curves[2] and all(0 <= v <= 1 for v in curves[2]["ppo_clipped"])
    assert curves[1]["kl"][0] == curves[2]["kl"][0]  # same weights, same first batch
    assert curves[1]["kl"][1] != curves[2]["kl"][1]  # one more optimizer step before batch 2
