"""Command line and YAML -> `RunConfig`, with Megatron-LM's flag names.

The parser is generated from the schema dataclasses rather than written out:
a field `num_layers` becomes `--num-layers`, its type comes from the
annotation and its help from the attribute docstring, so a new field cannot
exist in the schema without a flag (or the other way round). Booleans follow
Megatron-LM: `store_true` switches, except fields that default to True, which
get `--x/--no-x`.

Three sources, in order of precedence: explicit CLI flags > `--config
FILE.yaml` > dataclass defaults. The YAML is loaded into the parser's
defaults before the real parse, so argparse alone decides precedence. The
teacher has no flags of its own: it starts as a copy of the student and takes
the overrides in `--teacher-model-config FILE.yaml`.

`parse_config` does not validate: the world size is known only to the caller,
which runs `config.validate(world_size)`. YAML problems (missing file, unknown
key, wrong type) raise `ConfigError`; bad CLI flags are argparse errors.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import NamedTuple

import yaml

from .schema import (
    CheckpointArgs, ConfigError, DataArgs, DistillArgs, EvalArgs, LoggingArgs, ModelArgs, ParallelArgs,
    RunConfig, TrainArgs,
)

#: RunConfig sections that get flags, in help order (the teacher has none: see module doc).
SECTIONS = (
    ("model", ModelArgs), ("parallel", ParallelArgs), ("train", TrainArgs),
    ("checkpoint", CheckpointArgs), ("logging", LoggingArgs), ("distill", DistillArgs),
    ("data", DataArgs), ("eval", EvalArgs),
)


class _Spec(NamedTuple):
    """What the parser and the YAML loader need to know about one option."""

    type: type          # int, float, str or bool
    optional: bool      # annotation is `X | None`
    default: object
    help: str | None


# ---------------------------------------------------------------- field specs

@functools.cache
def _docs(cls) -> tuple[str | None, dict[str, str]]:
    """A dataclass's own docstring and its attribute docstrings (the string
    literal right after a field), read from the source."""
    cls_node = ast.parse(inspect.getsource(cls)).body[0]
    body, docs = cls_node.body, {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return ast.get_docstring(cls_node), docs


def _scalar(hint) -> tuple[type, bool]:
    """`int` -> (int, False); `int | None` -> (int, True)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config annotation {hint}")
        return args[0], True
    return hint, False


@functools.cache
def _section_specs(cls) -> dict[str, _Spec]:
    hints, docs = typing.get_type_hints(cls), _docs(cls)[1]
    specs = {}
    for f in dataclasses.fields(cls):
        typ, optional = _scalar(hints[f.name])
        if typ not in (int, float, str, bool):
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported type {typ}")
        specs[f.name] = _Spec(typ, optional, f.default, docs.get(f.name))
    return specs


#: Flags of the entry point only; they stay in the namespace, not in RunConfig.
_ENTRY_SPECS = {
    "dry_run": _Spec(bool, False, False, "Resolve, validate and plan the run, then exit."),
    "gpu_memory_gb": _Spec(float, False, 80.0, "GPU memory per device for the memory plan."),
    "num_nodes": _Spec(int, True, None, "Number of nodes (for the launch plan)."),
    "world_size": _Spec(int, True, None,
                        "GPUs in the run, for --dry-run (default: $WORLD_SIZE, or --num-nodes x --gpus-per-node)."),
    "gpus_per_node": _Spec(int, False, 8, "GPUs per node, for --dry-run with --num-nodes."),
}


@functools.cache
def _all_specs() -> dict[str, _Spec]:
    """Every option a YAML --config may set: section fields plus entry-point flags."""
    specs = {}
    for _, cls in SECTIONS:
        for name, spec in _section_specs(cls).items():
            assert name not in specs, f"field {name} is in two config sections"
            specs[name] = spec
    return {**specs, **_ENTRY_SPECS}


# ---------------------------------------------------------------- YAML

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_yaml_overrides(path) -> dict[str, object]:
    """Read a flat YAML mapping; keys may be flag names (`num-layers`, `--num-layers`)
    or field names (`num_layers`) and come back as field names. An empty file is {}."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of flag: value, not {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in out:
            raise ConfigError(f"config file {path}: {key!r} is set twice (as flag and field name)")
        out[name] = value
    return out


def _coerce(name: str, value, spec: _Spec, path) -> object:
    """Check one YAML value against its field type (YAML 1.1 reads `1e-4` as a string)."""
    where = f"config file {path}: {_flag(name)[2:]}"
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"{where} may not be null")
    if spec.type is bool:
        if isinstance(value, bool):
            return value
    elif spec.type is str:
        if isinstance(value, str):
            return value
    elif not isinstance(value, bool):
        try:
            number = spec.type(value)
        except (TypeError, ValueError):
            pass
        else:
            if spec.type is float or number == float(value):  # no silent 2.5 -> 2
                return number
    raise ConfigError(f"{where}: expected {spec.type.__name__}, got {value!r}")


def _resolve_yaml(path, specs: dict[str, _Spec]) -> dict[str, object]:
    """load_yaml_overrides + unknown-key check + type check against `specs`."""
    overrides = load_yaml_overrides(path)
    unknown = sorted(set(overrides) - set(specs))
    if unknown:
        names = ", ".join(_flag(k)[2:] for k in unknown)
        raise ConfigError(f"config file {path}: unknown key(s) {names}")
    return {k: _coerce(k, v, specs[k], path) for k, v in overrides.items()}


# ---------------------------------------------------------------- parser

def _add_option(group, name: str, spec: _Spec):
    kw = {"dest": name, "default": spec.default, "help": spec.help or ""}
    if spec.type is bool:
        kw["action"] = argparse.BooleanOptionalAction if spec.default else "store_true"
    else:
        kw["type"] = spec.type
        kw["help"] = (kw["help"] + " (default: %(default)s)").lstrip()
    group.add_argument(_flag(name), **kw)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: one flag per schema field, plus the entry-point flags."""
    parser = argparse.ArgumentParser(
        description="vOPD on-policy distillation on Megatron-Core (Megatron-LM flag names).",
        allow_abbrev=False,  # `--num-layer` must not silently mean `--num-layers`
    )
    entry = parser.add_argument_group("entry point")
    entry.add_argument("--config", default=None, metavar="FILE.yaml",
                       help="YAML of flag: value defaults; explicit flags override it.")
    for name, spec in _ENTRY_SPECS.items():
        _add_option(entry, name, spec)
    for title, cls in SECTIONS:
        group = parser.add_argument_group(title, _docs(cls)[0])
        for name, spec in _section_specs(cls).items():
            _add_option(group, name, spec)
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """Parse flags (and `--config` YAML) into an unvalidated RunConfig and the namespace.

    The namespace holds every option by field name, including the entry-point
    flags `config`, `dry_run`, `gpu_memory_gb` and `num_nodes`.
    """
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    config_path = pre.parse_known_args(argv)[0].config
    if config_path is not None:
        parser.set_defaults(**_resolve_yaml(config_path, _all_specs()))
    ns = parser.parse_args(argv)

    sections = {attr: cls(**{n: getattr(ns, n) for n in _section_specs(cls)}) for attr, cls in SECTIONS}
    teacher = sections["model"]
    if ns.teacher_model_config is not None:
        teacher = dataclasses.replace(teacher, **_resolve_yaml(ns.teacher_model_config, _section_specs(ModelArgs)))
    return RunConfig(teacher=teacher, **sections), ns


def to_flat_dict(config: RunConfig) -> dict[str, object]:
    """Field name -> value over every section, for logging or saving the resolved run.

    The teacher's fields share the student's names, so they appear as
    `teacher.<field>`; every other key is a flag name a `--config` YAML accepts.
    """
    flat = {}
    for attr, _ in SECTIONS:
        flat.update(dataclasses.asdict(getattr(config, attr)))
    flat.update({f"teacher.{k}": v for k, v in dataclasses.asdict(config.teacher).items()})
    return flat
