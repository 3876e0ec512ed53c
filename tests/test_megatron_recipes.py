"""Public Megatron-LM launch scripts through `vopd-train --dry-run`: the model is Megatron-LM's.

For each recipe of tests/fixtures/megatron_recipes.py (the literal flag blocks
of Megatron-LM's Llama-3-8B FP8 script, ModelOpt's Qwen3-8B and Qwen2.5-7B
configurations and the GPT-3 175B script, at core_v0.19.0):

* the reference is Megatron-LM alone: `parse_args()` on the same command line
  (sys.argv, WORLD_SIZE), `validate_args`, its tokenizer's vocabulary padding
  (`build_tokenizer` for NullTokenizer, `vocab_size_with_padding` otherwise),
  `core_transformer_config_from_args`, and a meta-device model from its own
  `gpt_config_from_args` + `GPTModelBuilder` for the parameter count;
* ours is `vopd-train --dry-run`'s front end and plan: the TransformerConfig
  parse_run returns, the one the model builder rebuilds from the RunConfig, and
  the dry-run report's whole-model parameter count.

Every TransformerConfig field must be equal, and the parameter count. The
GPU-only settings (FP8, fused kernels, TP 8 x PP 16) are planned on this CPU
machine: both sides run Megatron-LM's checks under `config.megatron_lm.planning_as_on_gpu`,
which answers the GPU architecture and TE's fused-RoPE availability as the GPU
target would. The reference's meta build uses Megatron's local layer spec with
the settings that spec needs without a GPU (`LOCAL_SPEC_ON_CPU`); none of them
changes a parameter.

The blocks the front end cannot honour (the data pipeline, fp16, batch-size
ramps) are each a one-line error naming the flag, and every accepted flag with
no effect is a warning line naming it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import functools
import io
import sys

import pytest
import torch
import torch.distributed as dist

from tests.fixtures.megatron_recipes import flags
from vopd_megatron.config.args import parse_run
from vopd_megatron.config.megatron_args import megatron_transformer_config
from vopd_megatron.config.schema import ConfigError
from vopd_megatron.model.builder import attention_env_kept
from vopd_megatron.model.dry_run import dry_run_report

#: recipe -> (blocks fed as they are, extra flags, world size).
#: The extra flags name the tokenizer the scripts take from the environment: Llama-3's
#: NullTokenizer block of its mock-data branch, Qwen's Hugging Face tokenizer's size.
CASES = {
    "llama3_8b_fp8": (("MODEL_ARGS", "TRAINING_ARGS", "DDP_ARGS", "DTYPE_ARGS", "MODEL_PARALLEL_ARGS",
                       "EVAL_AND_LOGGING_ARGS"), ["--tokenizer-type", "NullTokenizer", "--vocab-size", "128256"], 8),
    "qwen3_8b_modelopt": (("MODEL_ARGS",), ["--vocab-size", "151669"], 1),
    "qwen2p5_7b_modelopt": (("MODEL_ARGS",), ["--vocab-size", "151665"], 1),
    # GPT-3 175B without its fp16 and batch-size ramp flags (refused: test_refused_blocks).
    "gpt3_175b": (("GPT_MODEL_ARGS", "TRAINING_ARGS", "MODEL_PARALLEL_ARGS", "EVAL_AND_LOGGING_ARGS"),
                  ["--tokenizer-type", "NullTokenizer", "--vocab-size", "50257"], 128),
}
GPT3_REFUSED = {"--fp16": 0, "--step-batch-size-schedule": 6}  # flag -> its value words
#: The models' published parameter counts (Hugging Face checkpoints; GPT-3 with a 51,200-row padded
#: vocabulary and learned positions).
PUBLISHED = {"llama3_8b_fp8": 8_030_261_248, "qwen3_8b_modelopt": 8_190_735_360,
             "qwen2p5_7b_modelopt": 7_615_616_512, "gpt3_175b": 174.6e9}


def recipe_argv(recipe: str) -> tuple[list[str], int]:
    blocks, extra, world = CASES[recipe]
    argv = flags(recipe, *blocks)
    for flag, n in (GPT3_REFUSED.items() if recipe == "gpt3_175b" else ()):
        i = argv.index(flag)
        del argv[i:i + 1 + n]
    return argv + extra, world


# --- Megatron-LM alone ---------------------------------------------------------------------------

#: What Megatron-Core's local layer spec needs to be built without a GPU; no parameter depends on it.
LOCAL_SPEC_ON_CPU = dict(
    transformer_impl="local", use_cpu_initialization=True, perform_initialization=False,
    init_model_with_meta_device=True, sequence_parallel=False, persist_layer_norm=False,
    layernorm_zero_centered_gamma=False, gradient_accumulation_fusion=False, apply_rope_fusion=False, fp8=None,
    tensor_model_parallel_size=1, pipeline_model_parallel_size=1, num_layers_in_first_pipeline_stage=None,
    num_layers_in_last_pipeline_stage=None,
)


class _Group:
    """A one-rank stand-in process group for a meta build (size and rank only)."""

    def size(self):
        return 1

    def rank(self):
        return 0


@contextlib.contextmanager
def _one_rank_group():
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def megatron_reference(argv: list[str], world: int, monkeypatch):
    """(args, TransformerConfig, whole-model parameter count) from Megatron-LM's own code."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer, vocab_size_with_padding
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import core_transformer_config_from_args, parse_args, validate_args
    from megatron.training.models.gpt import GPTModelBuilder

    from vopd_megatron.config.megatron_lm import planning_as_on_gpu

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    args = parse_args()
    with planning_as_on_gpu(), contextlib.redirect_stdout(io.StringIO()):
        validate_args(args, {})
        if args.tokenizer_type == "NullTokenizer":
            build_tokenizer(args)
        elif args.padded_vocab_size is None:
            args.padded_vocab_size = vocab_size_with_padding(args.vocab_size, args)
        config = core_transformer_config_from_args(args)
    build = copy.copy(config)
    for name, value in LOCAL_SPEC_ON_CPU.items():
        setattr(build, name, value)
    groups = ProcessGroupCollection()
    groups.tp = groups.pp = groups.cp = _Group()
    groups.embd = groups.pos_embd = None
    with _one_rank_group(), torch.device("meta"), attention_env_kept():
        model = GPTModelBuilder(gpt_config_from_args(args, build)).build_model(groups, True, True)
    return args, config, sum(p.numel() for p in model.parameters())


def comparable(config) -> dict:
    """Field -> value, with callables compared by what they compute (function, bound arguments)."""
    def norm(value):
        if isinstance(value, functools.partial):
            return ("partial", value.func, value.args, tuple(sorted(value.keywords.items())))
        if isinstance(value, enum.Enum):
            return (type(value).__name__, value.name)
        return value
    return {f.name: norm(getattr(config, f.name)) for f in dataclasses.fields(config)}


# --- the comparison --------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", list(CASES))
def test_dry_run_builds_megatrons_model(recipe, monkeypatch, capsys):
    argv, world = recipe_argv(recipe)
    args, reference, reference_params = megatron_reference(argv, world, monkeypatch)
    monkeypatch.delenv("WORLD_SIZE")
    parsed = parse_run(argv + ["--world-size", str(world), "--dry-run"])
    run = parsed.run
    want = comparable(reference)
    for ours in (parsed.student_config, parsed.teacher_config,
                 megatron_transformer_config(run.model, run.parallel, run.train)):
        got = comparable(ours)
        assert {k: (got[k], v) for k, v in want.items() if got[k] != v} == {}
    report = dry_run_report(run, world)
    assert report.student_total_params == report.teacher_total_params == reference_params
    assert reference_params == pytest.approx(PUBLISHED[recipe], rel=1e-3)
    assert report.formula_matches
    assert run.model.padded_vocab_size(run.parallel.tensor_model_parallel_size) == args.padded_vocab_size
    assert (run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size) == (
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    assert (run.train.global_batch_size, run.train.micro_batch_size) == (args.global_batch_size, args.micro_batch_size)
    if args.lr is not None:
        assert (run.train.lr, run.train.min_lr, run.train.lr_decay_style) == (args.lr, args.min_lr, args.lr_decay_style)


def test_llama3_fp8_recipe_warnings_name_every_ignored_flag(capsys):
    argv, world = recipe_argv("llama3_8b_fp8")
    parsed = parse_run(argv + ["--world-size", str(world), "--dry-run"])
    err = capsys.readouterr().err
    for flag in ("--log-throughput", "--profile", "--manual-gc", "--empty-unused-memory-level", "--eval-interval",
                 "--eval-iters", "--overlap-grad-reduce", "--overlap-param-gather", "--cross-entropy-loss-fusion"):
        assert f"warning: {flag} has no effect" in err, flag
    assert "Disabling sequence parallelism" in err  # Megatron-LM's own warning at TP 1
    ns, run = parsed.namespace, parsed.run
    assert not ns.overlap_grad_reduce and not ns.overlap_param_gather  # what Megatron's DDP would act on
    assert not run.parallel.sequence_parallel
    # Honoured: sample-based schedule, decoupled LR, exit duration, checkpoints, timeout.
    assert run.train.train_iters == 1953125000 // 128
    assert run.train.megatron_overrides["decoupled_lr"] == 5.0e-4
    assert run.train.exit_duration_in_mins == 235 and run.parallel.distributed_timeout_minutes == 60
    assert (run.checkpoint.save, run.checkpoint.save_interval) == ("checkpoints/llama3_8b_fp8", 1000)
    assert parsed.student_config.fp8 == "hybrid" and parsed.student_config.layernorm_zero_centered_gamma


@pytest.mark.parametrize("recipe, words, start", [
    ("llama3_8b_fp8", flags("llama3_8b_fp8", "DATA_ARGS_LIST"), "--mock-data is not supported by vopd-train: "),
    ("gpt3_175b", flags("gpt3_175b", "DATA_ARGS"), "--data-path is not supported by vopd-train: "),
    ("gpt3_175b", ["--fp16"], "--fp16 is not supported by vopd-train: fp16"),
    ("gpt3_175b", ["--step-batch-size-schedule", "0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536"],
     "--step-batch-size-schedule is not supported by vopd-train: "),
    # The script expands ${TRAINING_ARGS[@]} unquoted, so bash splits the schedule into six words:
    # Megatron-LM's own parser rejects the block as this one does.
    ("gpt3_175b", flags("gpt3_175b", "TRAINING_ARGS"), "unrecognized arguments: 2.4B:320 4.8B:624"),
])
def test_refused_blocks(recipe, words, start):
    """What vopd-train cannot honour is one error line naming the flag (the first refused one)."""
    model, world = recipe_argv(recipe)
    with pytest.raises(ConfigError) as exc:
        parse_run(model + words + ["--world-size", str(world), "--dry-run"])
    message = str(exc.value)
    assert message.startswith(start) and "\n" not in message, message
