"""The one catch at the entry points, and training that stops on a fault.

- `errors.entry_point`: a user error is one `error: ...` line and exit status 1,
  a bug keeps its traceback, VOPD_DEBUG=1 shows the traceback of user errors
  too; the rank policy under torchrun (before the process group: local rank 0
  speaks for its node; after: every failing rank, or rank 0 for an error
  raised the same on every rank), in process, in gloo ranks and under torchrun.
- training faults: a non-finite loss or gradient norm stops `vopd-train` with
  the iteration and the data rows named, exit status 1, and no checkpoint of
  that iteration (a real run, diverged on purpose with --lr 1e30).
"""
import errno
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vopd_megatron.errors import DataError, TrainingFault, UserError, entry_point
from vopd_megatron.loss.vocab_parallel import NonFiniteLogitsError
from vopd_megatron.rollout.types import Rollout
from vopd_megatron.training.faults import at_iteration, check_step, naming_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "VOPD_DEBUG"):
        monkeypatch.delenv(var, raising=False)


@entry_point
def failing(exc):
    raise exc


# --------------------------------------------------------------------- entry_point

@pytest.mark.parametrize("exc,line", [
    (DataError("data.jsonl:3: field 'prompt_ids'[0] is 'a'"), "error: data.jsonl:3: field 'prompt_ids'[0] is 'a'"),
    (UserError("two\nlines"), "error: two; lines"),
    (OSError(errno.ENOSPC, "No space left on device", "/ckpt/iter_0000002"),
     "error: [Errno 28] No space left on device: '/ckpt/iter_0000002'"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), "error: [Errno 13] Permission denied: '/ro/out'"),
])
def test_user_error_is_one_line(exc, line):
    with pytest.raises(SystemExit) as info:
        failing(exc)
    assert info.value.code == line


def test_mapped_error_classes_are_user_errors():
    from vopd_megatron.config.schema import ConfigError
    from vopd_megatron.convert.hf_config import ConversionError
    from vopd_megatron.training.checkpoint import CheckpointError

    for cls in (ConfigError, ConversionError, CheckpointError):
        with pytest.raises(SystemExit) as info:
            failing(cls("--flag is wrong"))
        assert info.value.code == "error: --flag is wrong"


def test_converter_and_checkpoint_errors_are_user_errors_of_their_old_kinds():
    """Derived from UserError (errors.py needs not know them) and still the builtin they were."""
    from vopd_megatron.convert.hf_config import ConversionError
    from vopd_megatron.training.checkpoint import CheckpointError

    for cls, builtin in ((ConversionError, ValueError), (CheckpointError, RuntimeError)):
        exc = cls("bad checkpoint")
        assert isinstance(exc, UserError) and isinstance(exc, builtin)
        assert str(exc) == "bad checkpoint" and exc.args == ("bad checkpoint",)
        assert not exc.same_on_all_ranks


@pytest.mark.parametrize("exc", [KeyError("a bug"), ZeroDivisionError(), OSError(errno.ENOENT, "gone")])
def test_a_bug_keeps_its_traceback(exc):
    with pytest.raises(type(exc)):
        failing(exc)


def test_debug_switch_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("VOPD_DEBUG", "1")
    with pytest.raises(DataError):
        failing(DataError("bad row"))


def test_before_the_process_group_local_rank_0_speaks_for_the_node(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as info:
        failing(DataError("bad row"))
    assert info.value.code == 1  # status 1, nothing printed
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as info:
        failing(DataError("bad row"))
    assert info.value.code == "error: bad row"


def exit_codes_in_rank(same_on_all_ranks):
    """In a gloo rank (the process group exists): what a user error exits with."""
    try:
        failing(UserError("diverged", same_on_all_ranks=same_on_all_ranks))
    except SystemExit as exc:
        return exc.code


def test_after_the_process_group_ranks_say_who_they_are(gloo_pools):
    pool = gloo_pools(2)
    assert pool.run(exit_codes_in_rank, False) == ["error: diverged (rank 0 of 2)", "error: diverged (rank 1 of 2)"]
    assert pool.run(exit_codes_in_rank, True) == ["error: diverged", 1]


def tiny_config(tmp_path: Path) -> Path:
    """examples/tiny/config.yaml without its --prompt-data."""
    text = (ROOT / "examples/tiny/config.yaml").read_text()
    path = tmp_path / "config.yaml"
    path.write_text("".join(line for line in text.splitlines(True) if not line.startswith("prompt-data:")))
    return path


def clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "VOPD_DEBUG")}


def test_torchrun_prints_one_error_line(tmp_path):
    # Two ranks read the same bad file before any process group: one line. (torchrun
    # then reports the failed workers in its own words, a ChildFailedError summary.)
    bad = tmp_path / "rollouts.jsonl"
    bad.write_text('{"prompt_ids": [1], "completion_ids": []}\n')
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "-m", "vopd_megatron.training.train", "--config", str(tiny_config(tmp_path)),
                          "--rollout-data", str(bad), "--tensorboard-dir", str(tmp_path / "tb")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=clean_env())
    assert out.returncode == 1
    ours = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error:")]
    assert ours == [f"error: {bad}:1: field 'completion_ids' is empty: the rollout has no token to train on"]
    assert not (tmp_path / "tb").exists()


# --------------------------------------------------------------------- training faults (units)

ROWS = [Rollout([1], [2], source=f"r.jsonl:{i}") for i in range(1, 7)]


@pytest.mark.parametrize("loss,norm,named", [(float("nan"), 1.0, "loss nan"), (0.5, float("inf"), "gradient norm inf"),
                                             (float("nan"), float("nan"), "loss nan and gradient norm nan")])
def test_non_finite_step_names_the_batch(loss, norm, named):
    with pytest.raises(TrainingFault) as info, at_iteration(7):
        check_step(SimpleNamespace(metrics={"loss": loss}, grad_norm=norm, skipped=False), ROWS)
    message = str(info.value)
    assert message.startswith(f"iteration 7: non-finite {named} in the global batch")
    assert "r.jsonl:1, r.jsonl:2, r.jsonl:3, r.jsonl:4 (+2 more)" in message
    assert info.value.same_on_all_ranks  # every rank sees the same loss and norm: rank 0 reports


def test_not_faults():
    # A step the fp16 loss scaler skipped, and an unknown norm (--clip-grad 0), are not faults.
    check_step(SimpleNamespace(metrics={"loss": 0.3}, grad_norm=float("nan"), skipped=True), ROWS)
    check_step(SimpleNamespace(metrics={"loss": 0.3}, grad_norm=float("nan"), skipped=False), ROWS,
               grad_norm_known=False)


def test_non_finite_logits_name_the_data_rows():
    def loss_func(_output):
        raise NonFiniteLogitsError("non-finite student logits on real vocabulary columns (token rows [70])",
                                   model="student", token_rows=[70, 71, 130])

    # [b = 3, s = 64]: token rows 70, 71 are in sequence 1, 130 in sequence 2.
    with pytest.raises(TrainingFault) as info, at_iteration(3):
        naming_rows(loss_func, ["r.jsonl:4", "r.jsonl:5", "r.jsonl:6"], 64)(None)
    assert str(info.value).endswith("; data row(s) r.jsonl:5, r.jsonl:6")
    assert str(info.value).startswith("iteration 3: non-finite student logits")


# --------------------------------------------------------------------- a run that diverges

def test_diverging_run_stops_before_saving_garbage(tmp_path):
    save = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "vopd_megatron.training.train", "--config", str(tiny_config(tmp_path)),
           "--rollout-data", "examples/tiny/rollouts.jsonl", "--lr", "1e30", "--train-iters", "6",
           "--save", str(save), "--save-interval", "1", "--tensorboard-dir", str(tmp_path / "tb")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=clean_env())
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    match = re.match(r"error: iteration (\d+): non-finite (student logits|loss|gradient norm)", last)
    assert match, last
    assert re.search(r"rollouts\.jsonl:\d+", last), last
    stopped = int(match.group(1))
    saved = int((save / "latest_checkpointed_iteration.txt").read_text()) if save.exists() else 0
    assert saved == stopped - 1  # every finished iteration saved, the faulty one not
    assert not (save / f"iter_{stopped:07d}").exists()
