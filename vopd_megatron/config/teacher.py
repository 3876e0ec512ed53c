"""The teacher's Megatron-LM arguments: the student's flags, overridden by the teacher's config.

As in ModelOpt knowledge distillation (Megatron-LM's
megatron/post_training/model_builder.py), the command line describes the
student and a YAML holds the teacher's settings that differ from it:

* `--teacher-model-config FILE` (ModelOpt's `--export-kd-teacher-model-config`
  is the same flag), else
* `model_config.yaml` in the `--teacher-load` directory (ModelOpt's
  convention), else `model_flags.yaml` there (what `vopd-convert
  hf-to-megatron` writes), else the teacher has the student's architecture
  (with a warning, as ModelOpt does).

Keys are Megatron-LM flag names (`num-layers`) or argparse dests
(`num_layers`, what ModelOpt's files use); `null` restores Megatron-LM's
default (e.g. an even pipeline split). The teacher may change its
architecture and kernel settings (`flag_policy.TEACHER_MAY_DIFFER`); any
other key must repeat the student's value: the teacher shares the student's
parallel layout, sequence length, vocabulary and precision.

Values Megatron-LM derives from the model's shape follow the teacher's own
shape: when the teacher config changes a shape a derived value depends on
and does not set that value, the student's is dropped and `validate_args`
derives the teacher's (`kv_channels` from hidden size / heads,
`ffn_hidden_size` from 4h or the SwiGLU rule). ModelOpt drops kv_channels
always; this keeps an explicit one when the shape it depends on is the
student's (Qwen3-style head dims).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .flag_policy import TEACHER_MAY_DIFFER
from .megatron_args import megatron_defaults, option_for
from .plugin_flags import items_tokens, parse_tokens, read_yaml, resolve_key
from .schema import ConfigError

#: Derived value -> the flags it is derived from (validate_args).
SHAPE_DERIVED = {
    "kv_channels": ("hidden_size", "num_attention_heads"),
    "ffn_hidden_size": ("hidden_size", "swiglu"),
}
#: Files read beside --teacher-load when no --teacher-model-config is given, in order.
BESIDE_CHECKPOINT = ("model_config.yaml", "model_flags.yaml")


def teacher_config_path(teacher_model_config: str | None, teacher_load: str | None) -> tuple[Path | None, str]:
    """(the teacher config to read or None, a note when the teacher is the student's architecture)."""
    if teacher_model_config:
        return Path(teacher_model_config), ""
    if not teacher_load:
        return None, ""
    for name in BESIDE_CHECKPOINT:
        path = Path(teacher_load) / name
        if path.is_file():
            return path, ""
    return None, (f"no --teacher-model-config and no {' or '.join(BESIDE_CHECKPOINT)} in {teacher_load}: "
                  "the teacher is built with the student's architecture")


def teacher_namespace(parser: argparse.ArgumentParser, student_tokens: list[str], student: argparse.Namespace,
                      path: Path | None) -> argparse.Namespace:
    """The teacher's raw (not yet validated) namespace; `student` is the student's raw one."""
    if path is None:
        return parse_tokens(parser, student_tokens, "command line")
    defaults = megatron_defaults()
    where = f"teacher config {path}"
    try:
        items = read_yaml(path)
    except ConfigError as exc:  # say which config: the student's was read already
        flag = "--teacher-model-config" if getattr(student, "teacher_model_config", None) else "--teacher-load"
        raise ConfigError(f"{flag}: teacher {exc}") from None
    nulls = {name: entry for name, entry in items.items() if entry[0] is None}
    tokens, dests = items_tokens({k: v for k, v in items.items() if k not in nulls}, where, parser, set(defaults))
    teacher = parse_tokens(parser, student_tokens + tokens, where)
    for name, (_, written) in nulls.items():
        action = resolve_key(parser, name, None)
        if action is None or action.dest not in defaults:
            raise ConfigError(f"{where}: unknown key(s) {written}")
        setattr(teacher, action.dest, defaults[action.dest])
        dests[action.dest] = written
    for derived, inputs in SHAPE_DERIVED.items():
        if derived not in dests and any(getattr(teacher, i) != getattr(student, i) for i in inputs):
            setattr(teacher, derived, defaults[derived])
    for dest, written in dests.items():
        mine, theirs = getattr(teacher, dest), getattr(student, dest)
        if dest not in TEACHER_MAY_DIFFER and mine != theirs:
            raise ConfigError(
                f"{where}: {written} = {mine!r} differs from the student's {option_for(dest)} {theirs!r}; a "
                "teacher may change its architecture, but shares the student's parallel layout, sequence length, "
                "vocabulary, precision and training settings")
    return teacher
