"""The argument front end of vopd-train, vopd-eval, vopd-sft and the tools: argv -> typed configs.

`parse_run(argv, tool=...)` is the one way in:

1. Megatron-LM's parser with the plugin's flags (`plugin_flags.build_parser`);
   a `--config` YAML becomes command-line tokens placed before the real ones.
2. Values checked as a class (`checks`): every float finite, Megatron-LM
   ranges, every plugin field's declared range.
3. Megatron-LM flags reviewed (`flag_policy`): refused ones are an error,
   no-effect ones a warning and reset.
4. The teacher's namespace: the student's flags overridden by its config
   (`teacher`).
5. Megatron-LM's `validate_args` on both, at the run's world size.
6. Typed configs: the RunConfig sections, and each model's TransformerConfig
   from Megatron-LM's `core_transformer_config_from_args`.

Every problem is a `ConfigError` (the entry points print it as one `error:`
line) before any process group exists. The namespace stops here: below the
entry point every component takes typed configs, and Megatron's configs are
rebuilt from a RunConfig by `megatron_args.megatron_namespace`.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import enum
import functools
import sys
from dataclasses import dataclass

from .. import launch
from .checks import check_megatron_values, check_ranges
from .flag_policy import ARCHITECTURE, MODEL_KERNELS, MODEL_SHARED, RESET, TRAINING, VALUE_RULES, classify
from .megatron_args import (
    check_schedule, megatron_defaults, megatron_group, option_for, scheduler_settings,
    transformer_config_from_namespace, validate,
)
from .plugin_flags import (
    PLUGIN_SECTIONS, build_parser, load_yaml_overrides, parse_tokens, plugin_section, yaml_tokens,
)
from .run import RunConfig
from .schema import CheckpointArgs, ConfigError, LoggingArgs, ModelArgs, ParallelArgs, TrainArgs
from .teacher import teacher_config_path, teacher_namespace

__all__ = ["ParsedRun", "parse_run", "parse_config", "build_parser", "load_yaml_overrides", "to_flat_dict"]

#: Tool -> (program name, Megatron-LM defaults for what the tool does not need).
TOOLS = {
    "train": ("vopd-train", {}),
    "sft": ("vopd-sft", {}),
    "eval": ("vopd-eval", {"micro_batch_size": 1}),
    "model": ("vopd", {"micro_batch_size": 1}),  # tools that only build a model (convert, init_checkpoint)
}
TRAINING_TOOLS = ("train", "sft")
#: Megatron-LM flags without a default that every tool needs (training also --seq-length, --micro-batch-size).
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")


@dataclass
class ParsedRun:
    """What the front end hands to an entry point."""

    run: RunConfig
    namespace: argparse.Namespace
    """The student's namespace as Megatron-LM's validate_args left it, with the
    plugin's and the entry point's flags (dry_run, num_nodes, gpu_memory_gb, ...)."""
    student_config: object
    """TransformerConfig of the student: core_transformer_config_from_args(namespace)."""
    teacher_config: object
    """TransformerConfig of the teacher, from its own validated namespace."""
    warnings: list[str]


def _config_path(argv: list[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    return pre.parse_known_args(argv)[0].config


def _world_size(ns: argparse.Namespace) -> int:
    """--world-size; else torchrun's $WORLD_SIZE (for --dry-run: --num-nodes x --gpus-per-node first);
    else --num-nodes x --gpus-per-node; else 1."""
    env = launch.world_size()
    if ns.world_size is not None:
        if env is not None and env != ns.world_size and not ns.dry_run:
            raise ConfigError(f"--world-size {ns.world_size} differs from torchrun's WORLD_SIZE {env}")
        return ns.world_size
    cluster = ns.num_nodes * ns.gpus_per_node if ns.num_nodes else None
    if ns.dry_run:
        return cluster or env or 1
    return env if env is not None else cluster or 1


def review_flags(ns: argparse.Namespace, defaults: dict, who: str = "") -> list[str]:
    """Refuse or reset (with a warning) the Megatron-LM flags set to a non-default value."""
    notes = []
    for dest, default in defaults.items():
        value = getattr(ns, dest)
        if value == default:
            continue
        verdict = classify(dest, megatron_group(dest))
        option = option_for(dest, value)
        if verdict.kind == "refused":
            raise ConfigError(f"{who}{option} is not supported by vopd-train: {verdict.reason}")
        if verdict.kind == "no_effect":
            notes.append(f"{who}{option} has no effect in vopd-train: {verdict.reason}")
            if dest in RESET:
                setattr(ns, dest, default)
        elif verdict.kind == "honoured" and verdict.reason:
            allowed, why = VALUE_RULES[dest]
            if value not in allowed:
                raise ConfigError(f"{who}{option} {value}: {why}")
    return notes


def _fill_vocab_size(ns: argparse.Namespace) -> None:
    """Megatron-LM takes the vocabulary from the tokenizer; so does this, unless --vocab-size is given."""
    if ns.vocab_size is not None or not ns.tokenizer_model or ns.tokenizer_type == "NullTokenizer":
        return
    from ..data import load_tokenizer

    try:
        ns.vocab_size = load_tokenizer(ns.tokenizer_model).vocab_size
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--tokenizer-model {ns.tokenizer_model}: {exc} (or give --vocab-size)") from None


def _overrides(raw: argparse.Namespace, defaults: dict, dests, fields: set[str]) -> dict:
    return {d: getattr(raw, d) for d in sorted(dests)
            if d in defaults and d not in fields and getattr(raw, d) != defaults[d]}


_MODEL_FIELD_DESTS = {f.name for f in dataclasses.fields(ModelArgs)} | {
    "layernorm_epsilon", "add_bias_linear", "group_query_attention"}


def model_args(ns: argparse.Namespace, raw: argparse.Namespace, defaults: dict) -> ModelArgs:
    """One model's ModelArgs from its validated namespace (`ns`) and what the user set (`raw`)."""
    return ModelArgs(
        num_layers=ns.num_layers, hidden_size=ns.hidden_size, num_attention_heads=ns.num_attention_heads,
        ffn_hidden_size=ns.ffn_hidden_size, kv_channels=ns.kv_channels,
        num_query_groups=ns.num_query_groups if ns.group_query_attention else None,
        seq_length=ns.seq_length, max_position_embeddings=ns.max_position_embeddings,
        position_embedding_type=ns.position_embedding_type, rotary_base=ns.rotary_base,
        rotary_percent=ns.rotary_percent, use_rope_scaling=ns.use_rope_scaling,
        rope_scaling_factor=ns.rope_scaling_factor, normalization=ns.normalization, norm_epsilon=ns.layernorm_epsilon,
        swiglu=ns.swiglu, untie_embeddings_and_output_weights=ns.untie_embeddings_and_output_weights,
        disable_bias_linear=not ns.add_bias_linear, add_qkv_bias=ns.add_qkv_bias, qk_layernorm=ns.qk_layernorm,
        attention_dropout=ns.attention_dropout, hidden_dropout=ns.hidden_dropout,
        init_method_std=ns.init_method_std, vocab_size=ns.vocab_size,
        make_vocab_size_divisible_by=ns.make_vocab_size_divisible_by,
        decoder_first_pipeline_num_layers=ns.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=ns.decoder_last_pipeline_num_layers,
        megatron_overrides=_overrides(raw, defaults, _model_override_dests(), _MODEL_FIELD_DESTS),
    )


@functools.cache
def _model_override_dests() -> frozenset:
    """Flags carried per model: the model categories of flag_policy, and any other
    TransformerConfig field a user may set (e.g. a no-effect one Megatron-LM still
    records there), except what ParallelArgs / TrainArgs hold for the run."""
    from megatron.core.transformer import TransformerConfig

    run_fields = {f.name for cls in (ParallelArgs, TrainArgs) for f in dataclasses.fields(cls)}
    tc_fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    return frozenset((ARCHITECTURE | MODEL_SHARED | MODEL_KERNELS | tc_fields) - run_fields - RESET)


def run_config(ns: argparse.Namespace, raw: argparse.Namespace, teacher_ns: argparse.Namespace,
               teacher_raw: argparse.Namespace, defaults: dict) -> RunConfig:
    """The typed RunConfig of a validated student (and teacher) namespace."""
    train_fields = {f.name for f in dataclasses.fields(TrainArgs)}
    train = TrainArgs(**{name: getattr(ns, name) for name in train_fields if name != "megatron_overrides"},
                      megatron_overrides=_overrides(raw, defaults, TRAINING, train_fields))
    if ns.train_iters is None and ns.train_samples and ns.global_batch_size:  # Megatron-LM's update_train_iters
        train.train_iters = ns.train_samples // ns.global_batch_size
    sections = {
        "model": model_args(ns, raw, defaults), "teacher": model_args(teacher_ns, teacher_raw, defaults),
        "parallel": ParallelArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(ParallelArgs)}),
        "train": train,
        "checkpoint": CheckpointArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(CheckpointArgs)}),
        "logging": LoggingArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(LoggingArgs)}),
    }
    sections.update({attr: plugin_section(cls, raw) for attr, cls in PLUGIN_SECTIONS})
    return RunConfig(**sections)


def parse_run(argv: list[str] | None = None, *, tool: str = "train") -> ParsedRun:
    """argv -> ParsedRun(RunConfig, validated namespace, TransformerConfigs, warnings).

    tool: "train" and "sft" need --lr and --train-iters / --train-samples (not for
    --dry-run); "eval" and "model" default --micro-batch-size to 1. Raises ConfigError.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    prog, tool_defaults = TOOLS[tool]
    parser = build_parser(prog)
    tokens, raw = _parse_flags(parser, argv)                               # 1
    defaults = megatron_defaults()
    check_megatron_values({d: getattr(raw, d) for d in defaults})          # 2
    for _, cls in PLUGIN_SECTIONS:
        check_ranges(plugin_section(cls, raw))
    notes = review_flags(raw, defaults)                                    # 3
    _fill_vocab_size(raw)
    path, note = teacher_config_path(raw.teacher_model_config, raw.teacher_load)
    teacher_raw = teacher_namespace(parser, tokens, raw, path)             # 4
    _fill_vocab_size(teacher_raw)
    own = review_flags(teacher_raw, defaults, "teacher: ")  # the student's own notes come back prefixed
    notes += [n for n in own if n.removeprefix("teacher: ") not in notes] + ([note] if note else [])
    _check_required(raw, tool)
    if tool not in TRAINING_TOOLS and raw.seq_length is None and raw.max_position_embeddings is not None:
        tool_defaults = {**tool_defaults, "seq_length": raw.max_position_embeddings}  # a model-only YAML
    world = _world_size(raw)
    ns, teacher_ns = copy.deepcopy(raw), copy.deepcopy(teacher_raw)
    try:                                                                   # 5
        notes += validate(ns, world, tool_defaults, rank=launch.rank())
        try:
            validate(teacher_ns, world, tool_defaults)
        except ConfigError as exc:
            raise ConfigError(f"teacher{f' ({path})' if path else ''}: {exc}") from None
    except ConfigError:
        _check_shapes_first(raw, teacher_raw, defaults, world)
        raise
    if ns.lr is not None and (ns.train_iters or ns.train_samples):
        check_schedule(scheduler_settings(ns))
    run = run_config(ns, raw, teacher_ns, teacher_raw, defaults)           # 6
    _check_shapes(run, world)
    student_config = transformer_config_from_namespace(ns)
    try:
        teacher_config = transformer_config_from_namespace(teacher_ns)
    except ConfigError as exc:
        raise ConfigError(f"teacher: {exc}") from None
    parsed = ParsedRun(run, ns, student_config, teacher_config, list(dict.fromkeys(notes)))
    emit_warnings(parsed.warnings)
    return parsed


def _parse_flags(parser, argv: list[str]) -> tuple[list[str], argparse.Namespace]:
    """(the command-line tokens, --config YAML's first, and what argparse makes of them)."""
    config = _config_path(argv)
    tokens = yaml_tokens(config, parser) if config else []
    if tokens:
        parse_tokens(parser, tokens, f"config file {config}")  # a bad value names the file
    tokens += argv
    return tokens, parser.parse_args(tokens)


def _check_required(raw: argparse.Namespace, tool: str) -> None:
    """Megatron-LM's flags without a default, named together."""
    required = REQUIRED + (("seq_length", "micro_batch_size") if tool in TRAINING_TOOLS else ())
    missing = [option_for(d) for d in required if getattr(raw, d) is None]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (Megatron-LM has no default for "
                          f"{'it' if len(missing) == 1 else 'them'})")
    if tool in TRAINING_TOOLS and not raw.dry_run:
        if raw.lr is None:
            raise ConfigError("--lr is required (Megatron-LM has no default learning rate)")
        if not (raw.train_iters or raw.train_samples):
            raise ConfigError("give --train-iters (or --train-samples)")


def _check_shapes_first(raw, teacher_raw, defaults: dict, world: int) -> None:
    """After Megatron-LM refused the flags: where the plugin's shape checks see the problem
    too, raise theirs, which name the flags (on the flags as given)."""
    try:
        _check_shapes(run_config(raw, raw, teacher_raw, teacher_raw, defaults), world)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - values Megatron-LM would have derived are missing: keep its message
        return


def _check_shapes(run: RunConfig, world: int) -> None:
    """Both models' TP / PP split (checks.validate_model_args), before Megatron-Core's config does it."""
    from .checks import validate_model_args

    tp, pp = run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size
    if world % (tp * pp) == 0:
        for who, m in (("student", run.model), ("teacher", run.teacher)):
            validate_model_args(who, m, tp, pp)


def emit_warnings(notes: list[str]) -> None:
    """One `warning:` line each, on global rank 0 (stderr)."""
    if launch.rank() == 0:
        for note in notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)


def parse_config(argv: list[str] | None = None, tool: str = "model") -> tuple[RunConfig, argparse.Namespace]:
    """(RunConfig, namespace) of parse_run; the default tool builds a model and trains nothing."""
    parsed = parse_run(argv, tool=tool)
    return parsed.run, parsed.namespace


def _plain(value):
    return value.name if isinstance(value, enum.Enum) else value


def to_flat_dict(config: RunConfig) -> dict[str, object]:
    """Field name (or Megatron-LM dest) -> value over every section, for logging or saving the resolved run.

    The teacher's fields share the student's names, so they appear as
    `teacher.<field>`; every other key is one a `--config` YAML accepts."""
    flat = {}
    for f in dataclasses.fields(RunConfig):
        if f.name == "teacher":
            continue
        section = getattr(config, f.name)
        for g in dataclasses.fields(section):
            value = getattr(section, g.name)
            if g.name == "megatron_overrides":
                flat.update({k: _plain(v) for k, v in value.items()})
            else:
                flat[g.name] = value
    for g in dataclasses.fields(config.teacher):
        value = getattr(config.teacher, g.name)
        if g.name == "megatron_overrides":
            flat.update({f"teacher.{k}": _plain(v) for k, v in value.items()})
        else:
            flat[f"teacher.{g.name}"] = value
    for prefix, m in (("", config.model), ("teacher.", config.teacher)):  # Megatron-LM's spelling of MHA
        flat[f"{prefix}group_query_attention"] = m.num_query_groups is not None
        if m.num_query_groups is None:
            del flat[f"{prefix}num_query_groups"]
    return flat
