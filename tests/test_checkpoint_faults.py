"""Checkpoint faults: damaged iterations, a full disk during a save, another model's checkpoint, bad paths.

- Damaged newest iteration (a deleted shard, a truncated shard, a corrupt
  torch_dist index): loading falls back to the previous intact iteration, with a
  warning naming the damaged file; `fallback=False` (--no-checkpoint-fallback) is
  an error naming it; with nothing intact left, the error lists every directory.
- A full disk during a save (a 4 MiB tmpfs, filled after the first save): the
  save fails with "no space left on device" and the staging path, leaves no
  partial directory, and the previous checkpoint still loads with its weights.
- Weights of another shape: the error lists the tensors with both shapes and the
  shape the checkpoint was saved with.
- Path preflight (no process group): a missing, empty or file `--load`, an
  unwritable or too small `--save`, each one line naming the flag.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import warnings

import pytest
import torch

from tests.test_checkpoint import LOGITS_TOL, _build, _destroy, _full_logits, _init, _max_err
from vopd_megatron.training.checkpoint_files import CheckpointError, find_latest
from vopd_megatron.training.checkpoint_preflight import check_load_dir, check_save_dir

# --- cases (inside the ranks) ------------------------------------------------------------------


def case_two_saves(save_dir: str) -> tuple:
    """Iterations 1 and 2 of a model-only run (different weights); the logits of each."""
    from vopd_megatron.training import checkpoint as ckpt

    _init()
    try:
        model = _build(0, 1, 1)
        ckpt.save_checkpoint(save_dir, 1, [model], None, None, {"iteration": 1})
        first = _full_logits(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        ckpt.save_checkpoint(save_dir, 2, [model], None, None, {"iteration": 2})
        return first, _full_logits(model)
    finally:
        _destroy()


def case_load(load_dirs: list[str], fallback: bool = True) -> list[dict]:
    """For each directory: the loaded state and logits, the warnings, or the CheckpointError."""
    from vopd_megatron.training import checkpoint as ckpt

    out = []
    _init()
    try:
        for load_dir in load_dirs:
            model = _build(9, 1, 1)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    state = ckpt.load_checkpoint(load_dir, [model], None, None, fallback=fallback)
                    out.append(dict(state=state, logits=_full_logits(model), error="",
                                    warnings=[str(w.message) for w in caught]))
                except ckpt.CheckpointError as exc:
                    out.append(dict(state=None, logits=None, error=str(exc), warnings=[]))
    finally:
        _destroy()
    return out


def case_full_disk(save_dir: str, leave_free: int) -> dict:
    """Save iteration 1, fill the disk to `leave_free` bytes, save iteration 2, then load."""
    import torch.distributed as dist

    from vopd_megatron.training import checkpoint as ckpt

    _init()
    try:
        model = _build(0, 1, 1)
        ckpt.save_checkpoint(save_dir, 1, [model], None, None, {"iteration": 1})
        saved = _full_logits(model)
        if dist.get_rank() == 0:
            with open(os.path.join(save_dir, "filler"), "wb") as f:
                f.write(b"\0" * max(0, shutil.disk_usage(save_dir).free - leave_free))
        dist.barrier()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        error = ""
        try:
            ckpt.save_checkpoint(save_dir, 2, [model], None, None, {"iteration": 2})
        except ckpt.CheckpointError as exc:
            error = str(exc)
        listing = sorted(os.listdir(save_dir))
        fresh = _build(9, 1, 1)
        state = ckpt.load_checkpoint(save_dir, [fresh], None, None)
        return dict(error=error, listing=listing, state=state, saved=saved, loaded=_full_logits(fresh))
    finally:
        _destroy()


def case_other_shape(load_dir: str) -> str:
    from vopd_megatron.training import checkpoint as ckpt

    _init()
    try:
        wider = _build(0, 1, 1, ffn_hidden_size=320)
        try:
            ckpt.load_model_weights(load_dir, [wider])
        except ckpt.CheckpointError as exc:
            return str(exc)
        return ""
    finally:
        _destroy()


# --- damage, done by the test (the parent process) ---------------------------------------------


def _delete_shard(path):
    victim = os.path.join(path, "__1_0.distcp")
    os.remove(victim)
    return victim


def _truncate_shard(path):
    victim = os.path.join(path, "__0_0.distcp")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    return victim


def _corrupt_index(path):
    victim = os.path.join(path, ".metadata")
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 3)
        f.write(b"\xff" * 64)
    return victim


DAMAGE = {"deleted shard": _delete_shard, "truncated shard": _truncate_shard, "corrupt index": _corrupt_index}


# --- tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool2(gloo_pools):
    if torch.cuda.is_available():
        pytest.skip("cpu_compat stays off when CUDA is present")
    return gloo_pools(2)


@pytest.fixture(scope="module")
def two_saves(pool2, tmp_path_factory):
    run = tmp_path_factory.mktemp("two_saves")
    first, second = pool2.run(case_two_saves, str(run))[0]
    assert _max_err(first, second) > 1e-3
    return run, first


@pytest.fixture(scope="module")
def damaged_copies(two_saves, tmp_path_factory):
    """One copy of the run per kind of damage to its newest iteration: {kind: (dir, damaged file)}."""
    run, _ = two_saves
    out = {}
    for kind, damage in DAMAGE.items():
        copy = tmp_path_factory.mktemp(kind.replace(" ", "_")) / "run"
        shutil.copytree(run, copy)
        out[kind] = (copy, damage(str(copy / "iter_0000002")))
    return out


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_iteration_is_found_and_named(damaged_copies, kind):
    copy, victim = damaged_copies[kind]
    found = find_latest(str(copy))
    assert found.iteration == 1
    assert len(found.damaged) == 1 and victim in found.damaged[0]
    with pytest.raises(CheckpointError, match="switched off") as info:
        check_load_dir(str(copy), "--load", fallback=False)
    assert str(info.value).startswith(f"--load {copy}") and victim in str(info.value)

    shutil.rmtree(copy / "iter_0000001")  # nothing intact left: an error listing what is wrong
    with pytest.raises(CheckpointError, match="no complete checkpoint") as info:
        check_load_dir(str(copy), "--load")
    assert victim in str(info.value)


def test_loading_falls_back_past_a_damaged_iteration(pool2, two_saves, tmp_path):
    run, first = two_saves
    copies = {}
    for kind, damage in DAMAGE.items():
        copies[kind] = tmp_path / kind.replace(" ", "_")
        shutil.copytree(run, copies[kind])
        copies[kind] = (copies[kind], damage(str(copies[kind] / "iter_0000002")))
    dirs = [str(c) for c, _ in copies.values()]
    results = pool2.run(case_load, dirs)
    strict = pool2.run(case_load, dirs, fallback=False)
    for r_rank, s_rank in zip(results, strict):
        for (copy, victim), r, s in zip(copies.values(), r_rank, s_rank):
            assert r["error"] == "" and r["state"] == {"iteration": 1}
            assert _max_err(r["logits"], first) <= LOGITS_TOL  # iteration 1's weights
            assert s["state"] is None and victim in s["error"]
    loud = [w for w in results[0][0]["warnings"] if "damaged checkpoint" in w]
    assert loud and copies["deleted shard"][1] in loud[0] and "loading iteration 1" in loud[0]


def test_full_disk_during_save_keeps_the_previous_checkpoint(pool2, tmp_path):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if ok.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {ok.stderr.decode().strip()}")
    try:
        save_dir = mount / "run"
        for r in pool2.run(case_full_disk, str(save_dir), 64 * 1024):
            assert "no space left on device" in r["error"]
            assert str(save_dir / "iter_0000002.incomplete") in r["error"]
            assert r["listing"] == ["filler", "iter_0000001", "latest_checkpointed_iteration.txt"]
            assert r["state"] == {"iteration": 1}
            assert _max_err(r["loaded"], r["saved"]) <= LOGITS_TOL
        assert (save_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_weights_of_another_shape_are_named(pool2, two_saves):
    run, _ = two_saves
    for error in pool2.run(case_other_shape, str(run)):
        assert "does not fit the model" in error
        assert "decoder.layers.mlp.linear_fc1.weight: [2, 256, 64] in the checkpoint, [2, 320, 64] in the model" in error
        assert "saved with num_layers=2, hidden_size=64" in error and "ffn_hidden_size=256" in error


def test_load_dir_preflight(tmp_path):
    with pytest.raises(CheckpointError, match=r"^--load \S+ does not exist$"):
        check_load_dir(str(tmp_path / "missing"), "--load")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"^--teacher-load \S+ holds no checkpoint"):
        check_load_dir(str(tmp_path / "empty"), "--teacher-load")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"^--load \S+ is a file"):
        check_load_dir(str(tmp_path / "file"), "--load")
    assert check_load_dir(str(tmp_path / "missing"), "--load", fresh_start_ok=True) is None


def test_save_dir_preflight(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"^--save \S+ is a file"):
        check_save_dir(str(tmp_path / "file"), "--save", 0)
    check_save_dir(str(tmp_path / "new" / "run"), "--save", 1 << 20)  # creatable: fine, and not created
    assert sorted(os.listdir(tmp_path)) == ["file"]
    with pytest.raises(CheckpointError, match=r"GiB free on its filesystem, a checkpoint needs about"):
        check_save_dir(str(tmp_path), "--save", shutil.disk_usage(tmp_path).free * 2)

    mount = tmp_path / "ro"
    mount.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)], capture_output=True)
    if ok.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root): {ok.stderr.decode().strip()}")
    try:
        with pytest.raises(CheckpointError, match=r"^--save \S+ is not writable: .*[Rr]ead-only"):
            check_save_dir(str(mount / "run"), "--save", 0)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
