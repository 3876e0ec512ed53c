"""Checkpoints both ways between vopd_megatron and Megatron-LM's own checkpointing, on CPU gloo ranks.

Megatron-LM -> vopd-train. A TP2 student and a teacher are built the way
`pretrain_gpt.py` builds them (Megatron-LM's parser and `validate_args`,
`core_transformer_config_from_args`, its optimizer and LR schedule), the student
takes one optimizer step, and both are written by Megatron-LM's
`megatron.training.checkpointing.save_checkpoint`. The same ranks then compute,
from those in-memory weights and the plain reference loss, the loss of the next
global batch. `vopd-train` resumes the student checkpoint (optimizer, schedule,
consumed samples) with `--teacher-load` of the teacher's, at TP2 in a separate
torchrun job; its first logged loss must be that value.

vopd_megatron -> Megatron-LM. A student trained two steps and saved by our
`save_checkpoint` (no Megatron-LM Namespace given: built from the model) is
restored by Megatron-LM's `load_checkpoint` into fresh objects: iteration,
weights, Adam moments and step counts, scheduler position and RNG streams must
be bit-identical to those saved.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
ROLLOUTS = str(ROOT / "examples/tiny/rollouts.jsonl")
GBS, MBS, VOCAB = 4, 2, 250
# The tiny example's student and teacher (examples/tiny/*.yaml) in Megatron-LM's own flags.
STUDENT_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "256",
    "--seq-length", "64", "--max-position-embeddings", "64", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "64",
]
TEACHER_FLAGS = STUDENT_FLAGS + ["--num-layers", "4", "--hidden-size", "96", "--ffn-hidden-size", "384"]
TRAIN_FLAGS = [
    "--micro-batch-size", str(MBS), "--global-batch-size", str(GBS), "--train-iters", "2", "--lr", "3e-4",
    "--min-lr", "3e-5", "--lr-decay-style", "cosine", "--weight-decay", "0.0", "--clip-grad", "1.0",
    "--seed", "1234", "--ckpt-format", "torch_dist", "--save-interval", "1", "--transformer-impl", "local",
    "--no-persist-layer-norm",
    "--use-cpu-initialization", "--no-gradient-accumulation-fusion", "--no-rope-fusion",
    "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
]
VOPD_TRAIN_FLAGS = [  # the same run in vopd-train's flags (tiny example + the overrides above)
    "--config", "examples/tiny/config.yaml", "--prompt-data", "", "--rollout-data", ROLLOUTS, "--train-iters", "2",
    "--global-batch-size", str(GBS), "--micro-batch-size", str(MBS), "--lr-warmup-iters", "0",
    "--tensor-model-parallel-size", "2",
]


# --- Megatron-LM's side, inside the ranks ----------------------------------------------------------


def _megatron_lm_args(flags: list[str]) -> argparse.Namespace:
    """Megatron-LM's Namespace for `flags`, parsed and validated as its entry points do, set globally."""
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator, init_num_microbatches_calculator,
    )
    from megatron.training import global_vars
    from megatron.training.arguments import add_megatron_arguments, validate_args

    from vopd_megatron.megatron import cpu_compat

    cpu_compat.enable_training_loop()
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    args = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)).parse_args(flags)
    args.rank, args.world_size = dist.get_rank(), dist.get_world_size()
    args._is_global_batch_size_explicitly_specified = True
    validate_args(args, {})
    args.padded_vocab_size = 256  # Megatron-LM's tokenizer setup: 250 padded to a multiple of 64 x TP2
    global_vars.set_args(args)
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(args.rank, None, args.global_batch_size, args.micro_batch_size,
                                     ps.get_data_parallel_world_size())
    return args


def _megatron_lm_gpt(args):
    """The GPTModel pretrain_gpt.py builds from `args` (local layer spec: no Transformer Engine on CPU)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.training.arguments import core_transformer_config_from_args

    model_parallel_cuda_manual_seed(args.seed)
    return GPTModel(
        core_transformer_config_from_args(args), get_gpt_layer_local_spec(normalization=args.normalization),
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
    )


def _lm_step(model, optimizer, scheduler, args, batch):
    """One Megatron-LM-style optimizer step on the model's own LM loss."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        per_token = model(b["tokens"], b["position_ids"], None, labels=b["labels"])  # [b, s]
        return per_token, lambda out: (out.sum(), torch.tensor(out.numel(), dtype=torch.int), {})

    model.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
                                num_microbatches=1, seq_length=args.seq_length, micro_batch_size=GBS,
                                forward_only=False)
    finalize_model_grads([model])
    assert optimizer.step()[0]
    scheduler.step(increment=GBS)


def _full_logits(model, batch):
    """[b, s, V] logits, gathered over TP."""
    from megatron.core import parallel_state as ps

    model.eval()
    with torch.no_grad():
        out = model(batch["tokens"], batch["position_ids"], None)  # [b, s, V/tp]
    pieces = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(pieces, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)


def _reference_loss(student, teacher, batch) -> dict:
    from vopd_megatron.loss import LossConfig, reference_loss

    _, _, metrics = reference_loss(_full_logits(student, batch).double(), _full_logits(teacher, batch).double(),
                                   batch["labels"], batch["loss_mask"], LossConfig(mode="vopd"), vocab_size=VOCAB)
    return {k: float(v[0] / v[1]) for k, v in metrics.items()}


def _rollout_batch(index: int) -> dict:
    """Global batch `index` of the rollout file, collated as vopd-train collates it."""
    from vopd_megatron.rollout.file_source import JsonlRolloutSource
    from vopd_megatron.training.batch import collate

    source = JsonlRolloutSource(ROLLOUTS, vocab_size=VOCAB)
    source.seek(index * GBS)
    return collate(source.take(GBS), 64)


def _cleanup_megatron_lm():
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.training import global_vars

    global_vars.set_args(None)
    destroy_num_microbatches_calculator()
    ps.destroy_model_parallel()


def case_megatron_lm_saves(student_dir: str, teacher_dir: str) -> dict:
    """Megatron-LM builds, steps and saves a student (iteration 1) and a teacher; returns the
    reference loss of global batch 1 (what a resumed run computes first) on the saved weights."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.training import (
        get_megatron_ddp_config, get_megatron_optimizer_config, get_optimizer_param_scheduler,
        preprocess_common_state_dict,
    )

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        t_args = _megatron_lm_args(TEACHER_FLAGS + TRAIN_FLAGS + [
            "--tensor-model-parallel-size", "2", "--save", teacher_dir, "--no-save-optim", "--seed", "77"])
        teacher = _megatron_lm_gpt(t_args)
        save_checkpoint(1, [teacher], None, None, 0, preprocess_common_state_dict_fn=preprocess_common_state_dict)

        args = _megatron_lm_args(STUDENT_FLAGS + TRAIN_FLAGS + ["--tensor-model-parallel-size", "2",
                                                                "--save", student_dir])
        module = _megatron_lm_gpt(args)
        model = DistributedDataParallel(module.config, get_megatron_ddp_config(args), module)
        optimizer = get_megatron_optimizer(get_megatron_optimizer_config(args)[0], [model])
        scheduler = get_optimizer_param_scheduler(optimizer)
        _lm_step(model, optimizer, scheduler, args, _rollout_batch(0))
        args.consumed_train_samples = GBS  # as Megatron-LM's training loop counts them
        save_checkpoint(1, [model], optimizer, scheduler, 0, preprocess_common_state_dict_fn=preprocess_common_state_dict)
        return _reference_loss(module, teacher, _rollout_batch(1))
    finally:
        _cleanup_megatron_lm()


def case_megatron_lm_loads_ours(save_dir: str) -> dict:
    """Our save at iteration 2, then Megatron-LM's load_checkpoint into fresh objects."""
    from megatron.training.checkpointing import load_checkpoint

    from tests.test_checkpoint import _destroy, _init, _rng_draws, _train_step, _trainer
    from vopd_megatron.training import checkpoint as ckpt

    _init(2)
    try:
        model, optimizer, scheduler = _trainer(5, 2, 1, False, dropout=0.1)
        for step in range(2):
            _train_step(model, optimizer, scheduler, step)
        ckpt.save_checkpoint(save_dir, 2, [model], optimizer, scheduler, {"iteration": 2, "consumed_samples": 8})
        saved = _snapshot(model, optimizer, scheduler)
        saved["draws"] = _rng_draws()

        fresh, fresh_optimizer, fresh_scheduler = _trainer(6, 2, 1, False, dropout=0.1)
        flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
                 "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
                 "--train-iters", "10", "--tensor-model-parallel-size", "2", "--load", save_dir,
                 "--ckpt-format", "torch_dist", "--transformer-impl", "local", "--no-persist-layer-norm"]
        _megatron_lm_args(flags)
        try:
            iteration, _ = load_checkpoint([fresh], fresh_optimizer, fresh_scheduler)
        finally:
            from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
            from megatron.training import global_vars

            global_vars.set_args(None)
            destroy_num_microbatches_calculator()
        loaded = _snapshot(fresh, fresh_optimizer, fresh_scheduler)
        loaded["draws"] = _rng_draws()
        return dict(iteration=iteration, saved=saved, loaded=loaded)
    finally:
        _destroy()


def _snapshot(model, optimizer, scheduler) -> dict:
    params = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    by_param = {id(p): n for n, p in model.module.named_parameters()}
    moments = {}
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in sub.optimizer.param_groups:
            for main in group["params"]:
                state = sub.optimizer.state[main]
                name = by_param.get(id(main), f"main{len(moments)}")
                moments[name] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    return dict(params=params, moments=moments, num_steps=scheduler.num_steps)


# --- tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool2(gloo_pools):
    if torch.cuda.is_available():
        pytest.skip("cpu_compat stays off when CUDA is present")
    return gloo_pools(2)


def _metrics_lines(tb_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (tb_dir / "metrics.jsonl").read_text().splitlines()]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    return out


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def megatron_lm_then_vopd(pool2, tmp_path_factory):
    """Megatron-LM saves a student (iteration 1) and a teacher; vopd-train resumes the student to iteration 2."""
    tmp = tmp_path_factory.mktemp("interop")
    student, teacher = tmp / "mlm_student", tmp / "mlm_teacher"
    expected = pool2.run(case_megatron_lm_saves, str(student), str(teacher))[0]
    out = _run(TORCHRUN + ["-m", "vopd_megatron.training.train", *VOPD_TRAIN_FLAGS, "--load", str(student),
                           "--teacher-load", str(teacher), "--save", str(tmp / "vopd"),
                           "--tensorboard-dir", str(tmp / "tb")])
    return dict(dir=tmp, expected=expected, stdout=out.stdout)


def test_vopd_train_resumes_a_megatron_lm_checkpoint(megatron_lm_then_vopd):
    run = megatron_lm_then_vopd
    assert not (run["dir"] / "mlm_student/iter_0000001/vopd_checkpoint_complete.json").exists()  # Megatron-LM's
    assert "iterations 2..2" in run["stdout"]  # resumed after Megatron-LM's iteration 1
    (first,) = _metrics_lines(run["dir"] / "tb")
    assert first["iteration"] == 2
    assert first["loss"] == pytest.approx(run["expected"]["loss"], rel=1e-5, abs=1e-7)
    assert first["kl"] == pytest.approx(run["expected"]["kl"], rel=1e-5)


def case_example_reference(student_dir: str, teacher_dir: str, first_sample: int) -> dict:
    """The reference loss of the example's synthetic global batch starting at `first_sample`,
    on the weights of the checkpoints it loads."""
    import importlib.util

    from vopd_megatron.config import parse_config
    from vopd_megatron.training.checkpoint import load_model_weights
    from vopd_megatron.runtime.startup import initialize_parallel
    from vopd_megatron.training.setup import build_models

    spec = importlib.util.spec_from_file_location("example", ROOT / "examples/pretrain_with_vopd_loss.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    samples = [example.synthetic_sample(i, 64, VOCAB, seed=0) for i in range(first_sample, first_sample + GBS)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    run, _ = parse_config(VOPD_TRAIN_FLAGS)
    ctx = initialize_parallel(run)
    try:
        models = build_models(run, ctx)
        load_model_weights(student_dir, models.student)
        load_model_weights(teacher_dir, [models.teacher])
        return _reference_loss(models.student[0].module, models.teacher, batch)
    finally:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()


def _megatron_log(stdout: str, iteration: int, total: int) -> dict:
    """The `name: value` fields of Megatron-LM's log line for `iteration`."""
    line = next(l for l in stdout.splitlines() if f"iteration {iteration:8d}/{total:8d}" in l)
    return {k.strip(): float(v) for k, v in re.findall(r"\|\s*([^|:]+):\s+([-+0-9.eE]+)\s*(?=\|)", line)}


def test_megatron_lm_pretrain_trains_on_from_a_vopd_checkpoint_with_our_loss(pool2, megatron_lm_then_vopd):
    """examples/pretrain_with_vopd_loss.py: Megatron-LM's `pretrain` with our loss_func resumes the
    vopd-train checkpoint (shape from its args, --no-load-rng) and trains iterations 3-4; its first
    logged loss is the reference loss of the same weights and batch."""
    d = megatron_lm_then_vopd["dir"]
    out = _run(TORCHRUN + [
        "examples/pretrain_with_vopd_loss.py", "--cpu", "--tensor-model-parallel-size", "2",
        "--use-checkpoint-args", "--load", str(d / "vopd"), "--no-load-rng", "--teacher-load", str(d / "mlm_teacher"),
        "--teacher-num-layers", "4", "--teacher-hidden-size", "96", "--teacher-ffn-hidden-size", "384",
        "--vocab-size", str(VOCAB), "--micro-batch-size", str(MBS), "--global-batch-size", str(GBS),
        "--train-iters", "4", "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine",
        "--weight-decay", "0.0", "--use-checkpoint-opt-param-scheduler", "--calculate-per-token-loss",
        "--eval-interval", "1000", "--eval-iters", "0", "--log-interval", "1",
    ])
    assert "loading distributed checkpoint" in out.stdout and "at iteration 2" in out.stdout
    first, second = _megatron_log(out.stdout, 3, 4), _megatron_log(out.stdout, 4, 4)
    assert first["consumed samples"] == 3 * GBS and second["consumed samples"] == 4 * GBS
    expected = pool2.run(case_example_reference, str(d / "vopd"), str(d / "mlm_teacher"), 2 * GBS)[0]
    assert first["loss"] == pytest.approx(expected["loss"], rel=2e-5, abs=1e-6)  # logged as %.6E
    assert first["kl"] == pytest.approx(expected["kl"], rel=2e-5)


def test_megatron_lm_loads_our_checkpoint_bit_identically(pool2, tmp_path):
    for r in pool2.run(case_megatron_lm_loads_ours, str(tmp_path)):
        assert r["iteration"] == 2
        saved, loaded = r["saved"], r["loaded"]
        assert loaded["num_steps"] == saved["num_steps"] == 2
        assert set(loaded["params"]) == set(saved["params"])
        for name, p in saved["params"].items():
            assert torch.equal(loaded["params"][name], p), name
        assert set(loaded["moments"]) == set(saved["moments"]) and saved["moments"]
        for name, state in saved["moments"].items():
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}, name
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(loaded["moments"][name][key]), torch.as_tensor(value)), (name, key)
        assert loaded["draws"] == saved["draws"]  # Megatron-LM restored the RNG streams we saved


# --- resuming with other flags: one line before anything is built (entry points called in-process) ---


def _cli_error(main, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert not dist.is_initialized()  # refused before any process group (or model) existed
    return str(info.value)


def test_resume_and_path_errors_before_the_build(megatron_lm_then_vopd, monkeypatch, tmp_path):
    from vopd_megatron.eval.cli import main as eval_main
    from vopd_megatron.training.train import main as train_main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would set it for the TP2 flags; rank 0 checks
    monkeypatch.setenv("RANK", "0")
    d = megatron_lm_then_vopd["dir"]
    resume = [*VOPD_TRAIN_FLAGS, "--load", str(d / "vopd"), "--teacher-load", str(d / "mlm_teacher")]
    error = _cli_error(train_main, resume + ["--train-iters", "3", "--vopd-loss", "opd"])
    assert error.startswith("error: --vopd-loss opd differs from the loss vopd") and "iteration 2" in error
    error = _cli_error(train_main, resume)  # --train-iters 2: the checkpoint is at iteration 2
    assert error.startswith("error: --train-iters 2 leaves nothing to train") and str(d / "vopd") in error
    error = _cli_error(train_main, [*VOPD_TRAIN_FLAGS, "--teacher-load", str(d / "mlm_student")])
    assert error.startswith(f"error: --teacher-load {d / 'mlm_student'} holds a model of another shape")
    assert "--num-layers: checkpoint 2, this run 4" in error and "--teacher-model-config" in error
    missing = tmp_path / "typo"
    error = _cli_error(train_main, [*VOPD_TRAIN_FLAGS, "--load", str(missing), "--save", str(tmp_path / "out")])
    assert error == f"error: --load {missing} does not exist"
    error = _cli_error(eval_main, ["--config", "examples/tiny/config.yaml", "--load", str(missing),
                                   "--eval-data", "examples/tiny/eval.jsonl"])
    assert error == f"error: --load {missing} does not exist"
    assert not missing.exists() and not (tmp_path / "out").exists()


def test_megatron_lm_checkpoint_converts_to_hf_without_flags(megatron_lm_then_vopd, tmp_path):
    """vopd-convert megatron-to-hf reads the model shape from the args Megatron-LM recorded."""
    from vopd_megatron.convert import convert_megatron_to_hf
    from vopd_megatron.convert.dcp_io import ChunkReader
    from vopd_megatron.convert.hf_io import HFCheckpoint

    src = megatron_lm_then_vopd["dir"] / "mlm_student"
    convert_megatron_to_hf(str(src), str(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"],
            cfg["num_attention_heads"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == \
        ("llama", 2, 64, 256, 4, VOCAB, False)
    stored = ChunkReader(str(src / "iter_0000001"))
    hf = HFCheckpoint(str(tmp_path / "hf"))
    assert torch.equal(hf.get("model.embed_tokens.weight"), stored.read("embedding.word_embeddings.weight")[:VOCAB])
    assert torch.equal(hf.get("lm_head.weight"), stored.read("output_layer.weight")[:VOCAB])


def test_recorded_model_shape_round_trips_through_megatron_lm_args():
    """What a checkpoint records (`args` from Megatron-LM's parser) reads back as the same model shape."""
    import dataclasses

    from vopd_megatron.config.schema import ModelArgs
    from vopd_megatron.training.checkpoint_preflight import recorded_model, shape_mismatches
    from vopd_megatron.training.megatron_format import namespace_from_model_args

    llama_like = ModelArgs(num_layers=4, hidden_size=128, num_attention_heads=8, num_query_groups=2,
                           ffn_hidden_size=344, kv_channels=32, vocab_size=1000, normalization="RMSNorm",
                           norm_epsilon=1e-6, swiglu=True, disable_bias_linear=True, add_qkv_bias=True,
                           qk_layernorm=True, rotary_base=500000, use_rope_scaling=True,
                           untie_embeddings_and_output_weights=True)
    back = recorded_model({"args": namespace_from_model_args(llama_like)})
    assert dataclasses.asdict(back) == {**dataclasses.asdict(llama_like), "seq_length": back.seq_length}
    wider = dataclasses.replace(llama_like, hidden_size=256, num_query_groups=None)
    assert shape_mismatches(back, wider) == ["--hidden-size: checkpoint 128, this run 256",
                                             "--num-query-groups: checkpoint 2, this run 8"]
