"""`--teacher-fp8`: shape rules and missing-runtime errors before any work, and the config it builds.

The shape rules are those of Transformer Engine's FP8 GEMMs (every dimension a
multiple of 16 after the TP split; config/fp8_shapes.py); they are plain arithmetic,
checked on CPU. On a machine without TE or CUDA the run must stop with the
reason before a process group exists. The FP8 forward itself needs TE and an
FP8 GPU: `test_gpu_*` (skipped elsewhere) and benchmarks/bench_teacher.py.
"""
import importlib.util

import pytest
import torch

from vopd_megatron.config import ConfigError, DistillArgs, ModelArgs, ParallelArgs, RunConfig, TrainArgs
from vopd_megatron.config.args import parse_config
from vopd_megatron.config.fp8_shapes import fp8_shape_problems
from vopd_megatron.model import fp8
from vopd_megatron.model.runtime_checks import check_runtime


def fp8_run(model=None, parallel=None, train=None, **teacher):
    model = model or ModelArgs(vocab_size=1000, hidden_size=64, num_attention_heads=4, seq_length=128)
    return RunConfig(model=model, teacher=ModelArgs(**{**vars(model), **teacher}),
                     parallel=parallel or ParallelArgs(), train=train or TrainArgs(global_batch_size=8),
                     distill=DistillArgs(teacher_fp8=True))


#: Megatron-LM's required model flags (the front end has no model defaults).
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
         "--max-position-embeddings", "128", "--micro-batch-size", "1", "--vocab-size", "1000"]


def test_flag_parses():
    run, _ = parse_config(MODEL + ["--teacher-fp8"])
    assert run.distill.teacher_fp8
    assert not parse_config(MODEL)[0].distill.teacher_fp8


def test_valid_shapes_pass_validation():
    fp8_run().validate(1)
    fp8_run(parallel=ParallelArgs(tensor_model_parallel_size=2, sequence_parallel=True)).validate(2)


@pytest.mark.parametrize("teacher,needles", [
    # 72 = 4 * 16 + 8; its head dim 18 also breaks qkv (12 * 18 = 216) and proj (72)
    ({"hidden_size": 72}, ["--hidden-size", "query/key/value", "attention output"]),
    ({"ffn_hidden_size": 200}, ["fc1 outputs", "fc2 inputs"]),  # 200 = 12 * 16 + 8
    ({"kv_channels": 10}, ["query/key/value", "attention output"]),  # (4 + 2*4) * 10 = 120, 4 * 10 = 40
    ({"seq_length": 100}, ["tokens per micro-batch"]),
])
def test_shape_rules_name_the_dimension(teacher, needles):
    run = fp8_run(**teacher)
    if "seq_length" in teacher:  # the student must share the sequence length
        run.model = ModelArgs(**{**vars(run.model), "seq_length": teacher["seq_length"]})
    problems = fp8_shape_problems(run.teacher, run.parallel, run.train)
    assert len(problems) == len(needles), problems
    for needle in needles:
        assert any(needle in p for p in problems), (needle, problems)
    with pytest.raises(ConfigError, match="--teacher-fp8") as exc:
        run.validate(1)
    assert "multiple of 16" in str(exc.value)


def test_tensor_parallel_split_is_checked_per_rank():
    # ffn 256 is fine at TP 1 and 8 (32 per rank) but not at TP 32 (8 per rank).
    model = ModelArgs(vocab_size=1000, hidden_size=512, num_attention_heads=32, ffn_hidden_size=256)
    ok = fp8_shape_problems(model, ParallelArgs(tensor_model_parallel_size=8), TrainArgs())
    bad = fp8_shape_problems(model, ParallelArgs(tensor_model_parallel_size=32), TrainArgs())
    assert ok == [] and any("fc2 inputs per TP rank (--ffn-hidden-size / TP) = 8" in p for p in bad)


def test_sequence_parallel_divides_the_tokens():
    par = ParallelArgs(tensor_model_parallel_size=4, sequence_parallel=True)
    model = ModelArgs(vocab_size=1000, seq_length=32)
    assert fp8_shape_problems(model, ParallelArgs(), TrainArgs()) == []
    assert any("sequence parallel" in p and "= 8" in p for p in fp8_shape_problems(model, par, TrainArgs()))
    assert fp8_shape_problems(model, par, TrainArgs(micro_batch_size=2)) == []


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None,
                    reason="this machine can run an FP8 teacher")
def test_missing_runtime_stops_the_run_before_any_work():
    with pytest.raises(ConfigError, match="--teacher-fp8 cannot run here") as exc:
        check_runtime(fp8_run())
    msg = str(exc.value)
    assert "Transformer Engine is not installed" in msg or "no CUDA device" in msg
    from vopd_megatron.training.train import main

    with pytest.raises(SystemExit, match="^error: --teacher-fp8 cannot run here"):
        main(MODEL + ["--teacher-fp8", "--prompt-data", "unused.jsonl", "--lr", "1e-4", "--train-iters", "1"])
    assert not torch.distributed.is_initialized()  # stopped before the process group


def test_without_cuda_the_reason_is_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    real = importlib.util.find_spec
    monkeypatch.setattr(fp8.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "transformer_engine" else real(name, *a))
    assert fp8.fp8_runtime_problems() == ["no CUDA device: FP8 GEMMs need an NVIDIA GPU"]


def test_dry_run_validation_does_not_need_the_runtime():
    fp8_run().validate(1)  # no ConfigError on this machine: only check_runtime looks for TE


def test_teacher_transformer_config_turns_on_tensorwise_fp8():
    from vopd_megatron.model.builder import transformer_config

    run = fp8_run()
    cfg = transformer_config(run.teacher, run.parallel, TrainArgs(bf16=True), fp8=True)
    assert (cfg.fp8, cfg.fp8_recipe) == ("e4m3", "tensorwise")
    plain = transformer_config(run.model, run.parallel, TrainArgs(bf16=True))
    assert plain.fp8 is None


@pytest.mark.gpu
def test_gpu_fp8_runtime_ready():
    if importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("Transformer Engine not installed")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")
    assert fp8.fp8_runtime_problems() == []
    check_runtime(fp8_run())
