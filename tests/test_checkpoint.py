"""Distributed checkpoints (`vopd_megatron.training.checkpoint`) on CPU gloo ranks.

- Resharding: a checkpoint saved at TP2 loads at TP1 (DP2), PP2 and TP2, and the
  loaded model's logits on a fixed batch equal the saved model's.
- Resume: saving and loading mid-run (Adam, plain and distributed optimizer,
  LR schedule, dropout) and taking one more step gives bit-identical
  parameters to the run that never stopped; this needs Adam's moments and
  per-parameter step counts, the scheduler and every RNG stream restored.
- Optimizer resharding: optimizer state (plain, and distributed over DP2)
  saved at TP1xDP2 resumes at TP2 and at PP2: the next step is the same up to
  reduction-order noise, and far from a step with a fresh optimizer.
- Atomicity: a save killed mid-write, a directory without the completion
  marker and a tracker pointing at a broken directory never win over the
  previous complete checkpoint; debris with nothing complete is a clear error.
- The teacher's weights-only load writes nothing and fails clearly on an
  empty directory; a model that does not match names the keys.

Each case runs on every rank of a spawned gloo pool, builds its models with
`build_gpt_stage`, and sets up and tears down Megatron's parallel state.
Checkpoint directories are made by the parent (pytest's tmp_path) and passed in.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.distributed as dist

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=250, seq_length=32)
MICRO_BATCH = 2
LOGITS_TOL = 1e-6


# --- helpers run inside the ranks ----------------------------------------------------------


def _init(tp=1, pp=1):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _destroy():
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def _args(tp, pp, distopt=False, dropout=0.0, **model_overrides):
    from vopd_megatron.config.schema import ModelArgs, ParallelArgs, TrainArgs

    return (
        ModelArgs(**MODEL, hidden_dropout=dropout, attention_dropout=dropout, **model_overrides),
        ParallelArgs(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                     use_distributed_optimizer=distopt),
        # Per-microbatch means, averaged over DP by DDP: the same gradient for any DP split.
        TrainArgs(micro_batch_size=MICRO_BATCH, lr=1e-3, clip_grad=1.0, seed=0, calculate_per_token_loss=False),
    )


def _build(seed, tp, pp, **kwargs):
    """This rank's stage of the tiny GPT, initialised from `seed`."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from vopd_megatron.model.builder import build_gpt_stage

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    m, p, t = _args(tp, pp, **kwargs)
    return build_gpt_stage(m, p, t, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())


def _batch(index, rows=MICRO_BATCH):
    g = torch.Generator().manual_seed(100 + index)
    tokens = torch.randint(0, MODEL["vocab_size"], (rows, MODEL["seq_length"] + 1), generator=g)
    positions = torch.arange(MODEL["seq_length"]).expand(rows, -1)
    return dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], position_ids=positions)


def _full_logits(model):
    """[b, s, V] logits of batch 0 on the last pipeline stage (gathered over TP); None elsewhere."""
    from megatron.core import parallel_state as ps

    batch = _batch(0)
    hidden_shape = (MODEL["seq_length"], MICRO_BATCH, MODEL["hidden_size"])
    model.eval()
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(hidden_shape)  # [s, b, h] from the previous stage
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(batch["tokens"], batch["position_ids"], None)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        pieces = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(pieces, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)[..., : MODEL["vocab_size"]]  # [b, s, V]: drop the padding


def _trainer(seed, tp, pp, distopt, dropout=0.0):
    """DDP-wrapped stage, Megatron Adam (plain or distributed) and a warmup+cosine LR schedule."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    module = _build(seed, tp, pp, distopt=distopt, dropout=dropout)
    model = DistributedDataParallel(
        config=module.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distopt),
        module=module,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-5, weight_decay=0.01, clip_grad=1.0,
                        use_distributed_optimizer=distopt),
        [model],
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-5, lr_warmup_steps=2, lr_decay_steps=10,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=10, wd_incr_style="constant",
    )
    return model, optimizer, scheduler


GLOBAL_ROWS = 4  # rows of one global batch, split over the DP ranks


def _loss_step(data_iterator, model):
    batch = next(data_iterator)
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s]

    def loss_func(output):
        loss = output.mean()  # this rank's mean; DDP averages over DP (equal rows per rank)
        return loss, {"loss": loss.detach().clone()}

    return per_token, loss_func


def _train_step(model, optimizer, scheduler, step):
    """One optimizer step on global batch `step`, whatever the TP/PP/DP layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows = GLOBAL_ROWS // ps.get_data_parallel_world_size()
    full = _batch(1000 + step, rows=GLOBAL_ROWS)
    mine = {k: v[ps.get_data_parallel_rank() * rows:][:rows] for k, v in full.items()}
    model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=_loss_step, data_iterator=iter([mine]), model=[model], num_microbatches=1,
        seq_length=MODEL["seq_length"], micro_batch_size=rows, forward_only=False,
    )
    finalize_model_grads([model])  # DP reduction and the tied embedding's PP all-reduce
    ok, _, _ = optimizer.step()
    assert ok
    scheduler.step(increment=1)


def _rng_draws():
    """One draw from each RNG stream a checkpoint restores (python, numpy, torch, the TP tracker)."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(2)
    return [random.random(), float(np.random.rand()), torch.rand(2).tolist(), tracker.tolist()]


def _adam_steps(optimizer):
    """Distinct Adam `step` values over the parameters this rank's optimizer holds."""
    return sorted({
        float(state["step"])
        for sub in getattr(optimizer, "chained_optimizers", [optimizer])
        for state in sub.optimizer.state.values()
    })


def _max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# --- cases (module-level so spawned ranks can import them) -------------------------------------


def case_save_model(save_dir, seed, tp, pp, iteration):
    """Save a model (no optimizer); return the saved model's logits."""
    from vopd_megatron.training import checkpoint as ckpt

    _init(tp, pp)
    try:
        model = _build(seed, tp, pp)
        state = {"iteration": iteration, "consumed_samples": 8 * iteration}
        path = ckpt.save_checkpoint(save_dir, iteration, [model], None, None, state)
        return _full_logits(model), path
    finally:
        _destroy()


def case_load_logits(load_dir, seed, tp, pp):
    """Load into a differently initialised model at TP/PP; its logits before and after."""
    from vopd_megatron.training import checkpoint as ckpt

    _init(tp, pp)
    try:
        model = _build(seed, tp, pp)
        before = _full_logits(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = ckpt.load_checkpoint(load_dir, [model], None, None)
        return dict(state=state, before=before, after=_full_logits(model),
                    warnings=[str(w.message) for w in caught])
    finally:
        _destroy()


def case_teacher_weights(load_dir, seed, tp, pp):
    """`load_model_weights` into a frozen eval-mode model; (iteration, logits)."""
    from vopd_megatron.training import checkpoint as ckpt

    _init(tp, pp)
    try:
        teacher = _build(seed, tp, pp).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        iteration = ckpt.load_model_weights(load_dir, [teacher])
        return iteration, _full_logits(teacher)
    finally:
        _destroy()


def case_load_error(load_dir, what, strict=True, **model_overrides):
    """The CheckpointError message of loading `what` ("checkpoint" | "weights") ("" if none), and the state."""
    from vopd_megatron.training import checkpoint as ckpt

    _init()
    try:
        model = _build(0, 1, 1, **model_overrides)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if what == "weights":
                    return "", ckpt.load_model_weights(load_dir, [model])
                return "", ckpt.load_checkpoint(load_dir, [model], None, None, strict=strict)
        except ckpt.CheckpointError as exc:
            return str(exc), None
    finally:
        _destroy()


def case_resume(save_dir, seed, tp, distopt, steps_before=2):
    """Stop after `steps_before` steps, save, resume in fresh objects: the next step is bit-identical.

    Dropout is on, so the step after the resume also needs every RNG stream restored.
    """
    from vopd_megatron.training import checkpoint as ckpt

    _init(tp)
    try:
        model, optimizer, scheduler = _trainer(seed, tp, 1, distopt, dropout=0.1)
        for step in range(steps_before):
            _train_step(model, optimizer, scheduler, step)
        state = {"iteration": steps_before, "consumed_samples": GLOBAL_ROWS * steps_before}
        ckpt.save_checkpoint(save_dir, steps_before, [model], optimizer, scheduler, state)
        expected_draws = _rng_draws()
        _train_step(model, optimizer, scheduler, steps_before)  # the run that never stopped
        expected = {n: p.detach().clone() for n, p in model.module.named_parameters()}
        expected_lr, expected_steps = optimizer.param_groups[0]["lr"], _adam_steps(optimizer)

        model, optimizer, scheduler = _trainer(seed + 1, tp, 1, distopt, dropout=0.1)
        loaded_state = ckpt.load_checkpoint(save_dir, [model], optimizer, scheduler)
        draws, steps_after_load = _rng_draws(), _adam_steps(optimizer)
        _train_step(model, optimizer, scheduler, steps_before)
        return dict(
            state=loaded_state, steps_after_load=steps_after_load, draws=draws, expected_draws=expected_draws,
            steps=_adam_steps(optimizer), expected_steps=expected_steps,
            lr=optimizer.param_groups[0]["lr"], expected_lr=expected_lr,
            errors={n: _max_err(p.detach(), expected[n]) for n, p in model.module.named_parameters()},
        )
    finally:
        _destroy()


def case_reshard_optimizer(save_dir, seed, distopt, src, dsts):
    """Train 2 steps at layout `src`, save, take step 3; resume at each of `dsts` and take step 3.

    Returns, per layout, the logits after step 3 with the optimizer state loaded and
    with a fresh optimizer (model and schedule loaded only): the latter shows the
    comparison can see a missing optimizer state.
    """
    from vopd_megatron.training import checkpoint as ckpt

    def run(tp, pp, seed, with_optimizer):
        model, optimizer, scheduler = _trainer(seed, tp, pp, distopt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the layout changed: RNG re-seeded (no dropout here)
            ckpt.load_checkpoint(save_dir, [model], optimizer if with_optimizer else None, scheduler)
        _train_step(model, optimizer, scheduler, 2)
        return _full_logits(model.module)

    _init(*src)
    try:
        model, optimizer, scheduler = _trainer(seed, *src, distopt)
        for step in range(2):
            _train_step(model, optimizer, scheduler, step)
        ckpt.save_checkpoint(save_dir, 2, [model], optimizer, scheduler, {"iteration": 2})
        _train_step(model, optimizer, scheduler, 2)
        results = {"src": _full_logits(model.module)}
    finally:
        _destroy()
    for tp, pp in dsts:
        _init(tp, pp)
        try:
            results[(tp, pp)] = (run(tp, pp, seed + 1, True), run(tp, pp, seed + 2, False))
        finally:
            _destroy()
    return results


# --- a save killed mid-write (a separate single-rank process) -------------------------------------

_KILLED_SAVER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import torch.distributed as dist
    from vopd_megatron.megatron import cpu_compat

    def main(save_dir, hang_at):
        cpu_compat.enable()
        dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + sys.argv[3])
        from megatron.core import dist_checkpointing
        from tests.test_checkpoint import _build, _init
        from vopd_megatron.training.checkpoint import save_checkpoint

        real_save = dist_checkpointing.save

        def save_then_hang(sharded, path, *args, **kwargs):  # shards written, marker not yet
            real_save(sharded, path, *args, **kwargs)
            if path.endswith("iter_%07d.incomplete" % hang_at):
                print("mid-save", flush=True)
                time.sleep(600)

        dist_checkpointing.save = save_then_hang
        _init()
        model = _build(0, 1, 1)
        for iteration in range(1, hang_at + 1):
            save_checkpoint(save_dir, iteration, [model], None, None, {{"iteration": iteration}})

    if __name__ == "__main__":
        main(sys.argv[1], int(sys.argv[2]))
""")


def _kill_mid_save(save_dir, hang_at, tmp_path):
    """Run saves 1..hang_at in a fresh process and SIGKILL it inside save `hang_at`."""
    from vopd_megatron.net import free_local_port

    script = tmp_path / "killed_saver.py"
    script.write_text(_KILLED_SAVER.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    log = tmp_path / "killed_saver.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(save_dir), str(hang_at), str(free_local_port())],
            stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
        )
    try:
        line = proc.stdout.readline()  # blocks until the hook reports, or the process dies
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the saver and any writer processes it started
        except ProcessLookupError:
            pass
        proc.wait()
    assert line.strip() == "mid-save", f"the saver exited early:\n{log.read_text()[-3000:]}"
    return proc.returncode


def _tree_fingerprint(root):
    """{relative path: (size, mtime_ns, sha256)} of every file and directory under `root`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else None
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, digest)
    return out


# --- tests -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool2(gloo_pools):
    if torch.cuda.is_available():
        pytest.skip("cpu_compat stays off when CUDA is present")
    return gloo_pools(2)


@pytest.fixture(scope="module")
def tp2_checkpoint(pool2, tmp_path_factory):
    """A TP2 checkpoint at iteration 7 (model only) and the saved model's logits."""
    save_dir = tmp_path_factory.mktemp("tp2")
    (logits, path), _ = pool2.run(case_save_model, str(save_dir), 3, 2, 1, 7)
    assert path == os.path.join(str(save_dir), "iter_0000007")
    return save_dir, logits


@pytest.mark.parametrize("tp, pp", [(1, 1), (1, 2), (2, 1)], ids=["tp1dp2", "pp2", "tp2"])
def test_tp2_checkpoint_loads_at_any_layout(pool2, tp2_checkpoint, tp, pp):
    save_dir, saved_logits = tp2_checkpoint
    results = pool2.run(case_load_logits, str(save_dir), 11, tp, pp)
    last_stages = [r for r in results if r["after"] is not None]
    assert len(last_stages) == 2 // pp
    for r in results:
        assert r["state"] == {"iteration": 7, "consumed_samples": 56}
    for r in last_stages:
        assert _max_err(r["before"], saved_logits) > 0.1  # a different initialisation ...
        assert _max_err(r["after"], saved_logits) <= LOGITS_TOL  # ... replaced by the saved weights
    # RNG states are restored only at the saved layout; elsewhere rank 0 warns of the re-seed.
    reseeded = any("re-seeding" in w for w in results[0]["warnings"])
    assert reseeded == ((tp, pp) != (2, 1))


@pytest.mark.parametrize("distopt", [False, True], ids=["plain", "distopt"])
@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_resume_is_bit_identical(pool2, tmp_path, tp, distopt):
    for r in pool2.run(case_resume, str(tmp_path), 5, tp, distopt):
        assert r["state"] == {"iteration": 2, "consumed_samples": 2 * GLOBAL_ROWS}
        assert r["steps_after_load"] == [2.0]
        assert r["draws"] == r["expected_draws"]
        assert r["steps"] == r["expected_steps"] == [3.0]  # one `step` per parameter (trap 4)
        assert r["lr"] == r["expected_lr"]
        bad = {n: e for n, e in r["errors"].items() if e != 0.0}
        assert not bad, f"{len(bad)} of {len(r['errors'])} parameters differ after resuming: {bad}"


@pytest.mark.parametrize("distopt", [False, True], ids=["plain", "distopt"])
def test_optimizer_state_reshards(pool2, tmp_path, distopt):
    """Saved at TP1xDP2 (the distributed optimizer sharded over DP), resumed at TP2 and at PP2."""
    dsts = [(2, 1), (1, 2)]
    results = pool2.run(case_reshard_optimizer, str(tmp_path), 7, distopt, (1, 1), dsts)
    reference = results[0]["src"]
    for r in results:
        for layout in dsts:
            resumed, fresh_optimizer = r[layout]
            if resumed is None:  # not a last pipeline stage
                continue
            assert _max_err(resumed, reference) <= 1e-5, layout
            assert _max_err(fresh_optimizer, reference) > 1e-3, layout  # the optimizer state matters


def test_killed_save_never_becomes_latest(pool2, tmp_path):
    from vopd_megatron.training import checkpoint as ckpt

    save_dir = tmp_path / "run"
    assert _kill_mid_save(save_dir, 3, tmp_path) == -signal.SIGKILL
    assert (save_dir / ckpt.TRACKER_FILENAME).read_text().strip() == "2"
    assert (save_dir / "iter_0000003.incomplete" / ".metadata").exists()  # its shards were all written
    assert not (save_dir / "iter_0000003").exists()
    assert ckpt.latest_iteration(str(save_dir)) == 2
    for error, state in pool2.run(case_load_error, str(save_dir), "checkpoint"):
        assert error == "" and state == {"iteration": 2}


def test_incomplete_iteration_is_skipped(pool2, tp2_checkpoint, tmp_path):
    from vopd_megatron.training import checkpoint as ckpt

    src, _ = tp2_checkpoint
    run = tmp_path / "run"
    shutil.copytree(src, run)
    shutil.copytree(run / "iter_0000007", run / "iter_0000009")  # a newer save that never finished:
    (run / "iter_0000009" / ckpt.COMPLETE_MARKER).unlink()  # no completion marker ...
    (run / ckpt.TRACKER_FILENAME).write_text("9\n")  # ... even though a tracker names it
    assert ckpt.latest_iteration(str(run)) == 7
    results = pool2.run(case_load_logits, str(run), 1, 2, 1)
    for r in results:
        assert r["state"]["iteration"] == 7
    assert any("names iteration 9" in w for w in results[0]["warnings"])

    (run / ckpt.TRACKER_FILENAME).unlink()  # no tracker: the newest complete directory
    assert ckpt.latest_iteration(str(run)) == 7
    shutil.rmtree(run / "iter_0000007")  # nothing complete left: a clear error, not a fresh start
    assert ckpt.latest_iteration(str(run)) is None
    for error, _ in pool2.run(case_load_error, str(run), "checkpoint"):
        assert "no complete checkpoint" in error and "iter_0000009" in error


def test_teacher_load_is_read_only(pool2, tp2_checkpoint):
    save_dir, saved_logits = tp2_checkpoint
    before = _tree_fingerprint(save_dir)
    results = pool2.run(case_teacher_weights, str(save_dir), 13, 1, 2)  # another layout: PP2
    assert _tree_fingerprint(save_dir) == before
    for iteration, logits in results:
        assert iteration == 7
        if logits is not None:
            assert _max_err(logits, saved_logits) <= LOGITS_TOL


def test_load_errors_are_clear(pool2, tp2_checkpoint, tmp_path):
    save_dir, _ = tp2_checkpoint
    empty = tmp_path / "empty"
    empty.mkdir()
    for error, _ in pool2.run(case_load_error, str(empty), "weights"):
        assert "holds no checkpoint" in error and str(empty) in error
    for error, state in pool2.run(case_load_error, str(empty), "checkpoint"):
        assert error == "" and state is None  # a fresh start
    for error, _ in pool2.run(case_load_error, str(tmp_path / "missing"), "weights"):
        assert "does not exist" in error
    # A model the checkpoint does not fit: untied output layer, RMSNorm (no LayerNorm bias).
    mismatch = dict(untie_embeddings_and_output_weights=True, normalization="RMSNorm")
    for error, _ in pool2.run(case_load_error, str(save_dir), "weights", **mismatch):
        assert "not in the checkpoint" in error and "output_layer.weight" in error
        assert "in the checkpoint but not in the model" in error and "layer_norm_bias" in error
    for error, state in pool2.run(case_load_error, str(save_dir), "checkpoint", strict=False, **mismatch):
        assert error == "" and state["iteration"] == 7


def test_state_must_be_plain():
    from vopd_megatron.training import checkpoint as ckpt

    with pytest.raises(ckpt.CheckpointError, match="plain values"):
        ckpt._check_weights_only_loadable({"iteration": 1, "sampler": object()})
    ckpt._check_weights_only_loadable({"iteration": 1, "lr": 1e-3, "tags": ["a"], "t": torch.ones(2)})
