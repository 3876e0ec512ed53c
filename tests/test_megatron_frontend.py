"""The front end's contracts with Megatron-LM and with other modules.

- The plugin's flags are generated from its dataclasses: a field added to a
  plugin section is a flag with no other edit; a field that collides with a
  Megatron-LM flag is refused. `add_vopd_arguments` works as Megatron-LM's
  own extra-arguments hook (`parse_args(extra_args_provider=...)`).
- The flag policy's tables name real Megatron-LM flags, and
  docs/megatron_flags.md is what they generate.
- The optimizer config and the LR / weight-decay schedule are Megatron-LM's:
  equal to `get_megatron_optimizer_config` and `get_optimizer_param_scheduler`
  on the same flags.
- A ModelOpt-style teacher: an 8B teacher of a 1B student (which sets
  --kv-channels) has the 8B model's parameter count.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import yaml

from vopd_megatron.config import megatron_args, plugin_flags
from vopd_megatron.config.args import parse_run
from vopd_megatron.config.flag_policy import (
    HONOURED, NO_EFFECT, REFUSED, RESET, SILENT, VALUE_RULES, markdown_table, runconfig_dests,
)
from vopd_megatron.config.schema import DistillArgs, ranged

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
         "--max-position-embeddings", "64", "--micro-batch-size", "1", "--vocab-size", "128"]


def _fresh_parsers():
    plugin_flags._build_parser.cache_clear()
    plugin_flags.plugin_specs.cache_clear()


@pytest.fixture
def extended_distill(monkeypatch):
    """DistillArgs with one more field, as another module would add it."""
    @dataclasses.dataclass
    class Extended(DistillArgs):
        vopd_fused_output: bool = False
        """Fuse the output layer into the loss."""
        vopd_chunk_tokens: int = ranged(1, 1)
        """Tokens per fused chunk."""

    sections = tuple((a, Extended if c is DistillArgs else c) for a, c in plugin_flags.PLUGIN_SECTIONS)
    monkeypatch.setattr(plugin_flags, "PLUGIN_SECTIONS", sections)
    _fresh_parsers()
    yield Extended
    _fresh_parsers()


def test_a_new_plugin_field_is_a_flag(extended_distill, capsys):
    ns = plugin_flags.build_parser().parse_args(MODEL + ["--vopd-fused-output", "--vopd-chunk-tokens", "4"])
    distill = plugin_flags.plugin_section(extended_distill, ns)
    assert distill.vopd_fused_output is True and distill.vopd_chunk_tokens == 4
    with pytest.raises(SystemExit):
        plugin_flags.build_parser().parse_args(["--help"])
    assert "--vopd-fused-output Fuse the output layer into the loss." in " ".join(capsys.readouterr().out.split())


def test_a_field_colliding_with_a_megatron_flag_is_refused(monkeypatch):
    @dataclasses.dataclass
    class Clash(DistillArgs):
        eval_interval: int = 0
        """Would shadow Megatron-LM's --eval-interval with another meaning."""

    monkeypatch.setattr(plugin_flags, "PLUGIN_SECTIONS", (("distill", Clash),))
    _fresh_parsers()
    try:
        with pytest.raises(TypeError, match="collides with Megatron-LM's --eval-interval"):
            plugin_flags.plugin_specs()
    finally:
        _fresh_parsers()


def test_add_vopd_arguments_is_megatrons_extra_args_hook(monkeypatch):
    from megatron.training.arguments import parse_args

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *MODEL, "--vopd-loss", "opd", "--teacher-load", "/t",
                                      "--export-kd-teacher-model-config", "t.yaml"])
    args = parse_args(extra_args_provider=plugin_flags.add_vopd_arguments)
    assert (args.vopd_loss, args.teacher_load, args.teacher_model_config, args.num_layers) == ("opd", "/t", "t.yaml", 2)


def test_policy_tables_name_real_flags():
    dests = set(megatron_args.megatron_defaults())
    for name, table in (("HONOURED", HONOURED), ("NO_EFFECT", set(NO_EFFECT)), ("SILENT", SILENT),
                        ("RESET", RESET), ("VALUE_RULES", set(VALUE_RULES)), ("RunConfig fields", runconfig_dests())):
        assert not (set(table) - dests), (name, sorted(set(table) - dests))
    for named, _, _, _ in REFUSED:
        assert not (named - dests), sorted(named - dests)
    assert not HONOURED & set(NO_EFFECT) and RESET <= set(NO_EFFECT) and set(VALUE_RULES) <= HONOURED


def test_flag_table_doc_is_current():
    generated = markdown_table(megatron_args.megatron_actions())
    assert (ROOT / "docs/megatron_flags.md").read_text() == generated, \
        "run: python -m vopd_megatron.config.flag_policy > docs/megatron_flags.md"


# --- Megatron-LM's optimizer and schedule -----------------------------------------------------------

SCHEDULES = [
    ["--train-iters", "100", "--lr-warmup-iters", "10", "--lr-decay-style", "cosine", "--lr-decay-iters", "80"],
    ["--train-samples", "5000", "--global-batch-size", "16", "--lr-warmup-fraction", "0.05",
     "--lr-decay-samples", "4000", "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "800",
     "--weight-decay-incr-style", "linear", "--start-weight-decay", "0.0", "--end-weight-decay", "0.1",
     "--decoupled-lr", "1e-3", "--decoupled-min-lr", "1e-5", "--lr-warmup-init", "1e-6"],
]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_optimizer_and_schedule_are_megatrons(schedule):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.training import global_vars
    from megatron.training.training import get_megatron_optimizer_config, get_optimizer_param_scheduler

    parsed = parse_run(MODEL + ["--lr", "3e-4", "--min-lr", "3e-5", "--weight-decay", "0.05"] + schedule)
    run = parsed.run
    ours, our_overrides = megatron_args.optimizer_config(run.model, run.parallel, run.train)
    theirs, their_overrides = get_megatron_optimizer_config(copy.deepcopy(parsed.namespace))
    assert ours == theirs and our_overrides == their_overrides

    class _Optimizer:  # what OptimizerParamScheduler touches
        param_groups = [{"params": []}]

    ns = megatron_args.megatron_namespace(run.model, run.parallel, run.train)
    mine = OptimizerParamScheduler(_Optimizer(), **megatron_args.scheduler_settings(ns))
    saved = global_vars._GLOBAL_ARGS
    global_vars._GLOBAL_ARGS = copy.deepcopy(parsed.namespace)
    try:
        reference = get_optimizer_param_scheduler(_Optimizer())
    finally:
        global_vars._GLOBAL_ARGS = saved
    # All of Megatron-LM's scheduler but the resume policy (the checkpoint's schedule wins by default here).
    ignore = {"optimizer": None, "use_checkpoint_opt_param_scheduler": None}
    assert vars(mine) | ignore == vars(reference) | ignore and mine.use_checkpoint_opt_param_scheduler
    gbs = run.train.global_batch_size
    for _ in range(7):  # the same LR and WD along the way
        mine.step(increment=gbs)
        reference.step(increment=gbs)
        assert (mine.get_lr({}), mine.get_wd()) == (reference.get_lr({}), reference.get_wd())


# --- the teacher ---------------------------------------------------------------------------------------

LLAMA_3_2_1B = ["--num-layers", "16", "--hidden-size", "2048", "--ffn-hidden-size", "8192",
                "--num-attention-heads", "32", "--group-query-attention", "--num-query-groups", "8",
                "--kv-channels", "64", "--seq-length", "4096", "--max-position-embeddings", "131072",
                "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
                "--disable-bias-linear", "--vocab-size", "128256", "--micro-batch-size", "1"]
#: Llama-3.1-8B's model_config.yaml as ModelOpt reads it (argparse dests as keys).
LLAMA_3_1_8B = {"num_layers": 32, "hidden_size": 4096, "ffn_hidden_size": 14336, "num_attention_heads": 32,
                "num_query_groups": 8, "untie_embeddings_and_output_weights": True}


def test_8b_teacher_of_a_1b_student_has_8b_parameters(tmp_path):
    from vopd_megatron.model.param_count import stage_param_count

    ckpt = tmp_path / "llama-3.1-8b"
    ckpt.mkdir()
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(LLAMA_3_1_8B))
    run = parse_run(LLAMA_3_2_1B + ["--export-kd-teacher-load", str(ckpt)], tool="model").run
    assert run.teacher.kv_channels == 128 and run.model.kv_channels == 64
    assert stage_param_count(run.teacher, 1, 1, 0) == 8_030_261_248  # Llama-3.1-8B on the Hugging Face hub
    assert stage_param_count(run.model, 1, 1, 0) == 1_235_814_400  # Llama-3.2-1B, tied embeddings


def test_exit_interval_stops_the_loop():
    from vopd_megatron.training.train import should_exit

    run = parse_run(MODEL + ["--exit-interval", "3"], tool="model").run
    assert [should_exit(run, i, 0.0) for i in (1, 2, 3)] == [None, None, "--exit-interval 3"]


def test_namespace_stops_at_the_entry_point():
    """Below the entry point nothing holds an argparse Namespace: the RunConfig is typed dataclasses."""
    run = parse_run(MODEL, tool="model").run
    def walk(obj):
        assert not isinstance(obj, argparse.Namespace)
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name))
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
    walk(run)
