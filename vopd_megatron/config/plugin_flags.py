"""The plugin's own flags, generated from its config dataclasses, and `--config` YAML.

`build_parser(prog)` is Megatron-LM's parser with these flags added.
`add_vopd_arguments(parser)` has the signature of Megatron-LM's
extra-arguments hook (`megatron.training.arguments.parse_args(extra_args_provider=...)`,
`megatron.training.pretrain(..., extra_args_provider=...)`): it adds one flag
per field of the plugin sections (DistillArgs, DataArgs, EvalArgs) and per
field of a Megatron-backed section that Megatron-LM has no flag for
(`--teacher-load`), plus the entry-point flags (`--config`, `--dry-run`, ...).
A field `vopd_top_k` becomes `--vopd-top-k`, its type comes from the
annotation, its help from the attribute docstring, extra spellings from the
field's `aliases` metadata; booleans are `store_true` switches (`--x/--no-x`
when they default to True). So a field added to DistillArgs is a flag with no
further edit. A plugin field whose name is already a Megatron-LM flag must
say so (`metadata={"megatron": True}`, as DataArgs.tokenizer_model does);
any other collision is a bug `plugin_specs` refuses.

`--config FILE.yaml` holds `flag: value` pairs with the flag names as keys
(`num-layers`, `--num-layers`, or the argparse dest `num_layers`); they are
turned into command-line tokens placed before the real ones, so argparse
alone decides precedence (command line > YAML > Megatron-LM's defaults) and
checks types and choices exactly as for the command line.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import textwrap
import types
import typing
from pathlib import Path
from typing import NamedTuple

import yaml

from .megatron_args import megatron_defaults, megatron_parser
from .schema import CheckpointArgs, ConfigError, DataArgs, DistillArgs, EvalArgs

#: Plugin sections of RunConfig (attribute, class): every field is a flag of ours.
PLUGIN_SECTIONS = (("distill", DistillArgs), ("data", DataArgs), ("eval", EvalArgs))
#: Fields of Megatron-backed sections that are the plugin's flags.
PLUGIN_FIELDS_ELSEWHERE = (("checkpoint", CheckpointArgs, "teacher_load"),
                           ("checkpoint", CheckpointArgs, "checkpoint_fallback"))


class Spec(NamedTuple):
    """What the parser needs to know about one plugin option."""

    type: type          # int, float, str or bool
    optional: bool      # annotation is `X | None`
    default: object
    help: str | None
    aliases: tuple = ()


@functools.cache
def field_docs(cls) -> tuple[str | None, dict[str, str]]:
    """A dataclass's own docstring and its attribute docstrings (the string
    literal right after a field), read from the source."""
    cls_node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
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


def _spec(cls, f: dataclasses.Field) -> Spec:
    typ, optional = _scalar(typing.get_type_hints(cls)[f.name])
    if typ not in (int, float, str, bool):
        raise TypeError(f"{cls.__name__}.{f.name}: unsupported flag type {typ}")
    return Spec(typ, optional, f.default, field_docs(cls)[1].get(f.name), tuple(f.metadata.get("aliases", ())))


@functools.cache
def plugin_specs() -> dict[str, Spec]:
    """dest -> Spec of every plugin flag (entry-point flags included)."""
    megatron = megatron_defaults()
    specs = {}
    for _, cls in PLUGIN_SECTIONS:
        for f in dataclasses.fields(cls):
            if f.metadata.get("megatron"):
                if f.name not in megatron:
                    raise TypeError(f"{cls.__name__}.{f.name} is marked as a Megatron-LM flag but is none")
                continue
            if f.name in megatron:
                raise TypeError(f"{cls.__name__}.{f.name} collides with Megatron-LM's --{f.name.replace('_', '-')}: "
                                "rename it, or mark it metadata={'megatron': True} if the meaning is the same")
            specs[f.name] = _spec(cls, f)
    for _, cls, name in PLUGIN_FIELDS_ELSEWHERE:
        specs[name] = _spec(cls, next(f for f in dataclasses.fields(cls) if f.name == name))
    clash = set(specs) & set(ENTRY_SPECS)
    assert not clash, f"entry-point flags shadow plugin fields: {clash}"
    return {**specs, **ENTRY_SPECS}


#: Flags of the entry point only; they stay in the namespace, not in RunConfig.
ENTRY_SPECS = {
    "dry_run": Spec(bool, False, False, "Resolve, validate and plan the run (memory per GPU), then exit; "
                                        "needs no GPU, also for GPU-only settings such as --fp8-format."),
    "gpu_memory_gb": Spec(float, False, 80.0, "GPU memory per device for the --dry-run memory plan."),
    "num_nodes": Spec(int, True, None, "Number of nodes (for the launch plan)."),
    "world_size": Spec(int, True, None, "Ranks of the run (default: $WORLD_SIZE, or --num-nodes x "
                                        "--gpus-per-node for --dry-run); must match torchrun's."),
    "gpus_per_node": Spec(int, False, 8, "GPUs per node, for --dry-run with --num-nodes."),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_option(group, name: str, spec: Spec) -> None:
    kw = {"dest": name, "default": spec.default, "help": spec.help or ""}
    if spec.type is bool:
        kw["action"] = argparse.BooleanOptionalAction if spec.default else "store_true"
    else:
        kw["type"] = spec.type
        kw["help"] = (kw["help"] + " (default: %(default)s)").lstrip()
    group.add_argument(_flag(name), *spec.aliases, **kw)


def add_vopd_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's extra-arguments hook: the plugin's flags, generated from its dataclasses."""
    specs = plugin_specs()
    entry = parser.add_argument_group("vopd entry point")
    entry.add_argument("--config", default=None, metavar="FILE.yaml",
                       help="YAML of flag: value (flag names as keys); command-line flags override it.")
    for name, spec in ENTRY_SPECS.items():
        _add_option(entry, name, spec)
    for title, cls in PLUGIN_SECTIONS:
        group = parser.add_argument_group(f"vopd {title}", field_docs(cls)[0])
        for f in dataclasses.fields(cls):
            if f.name in specs:
                _add_option(group, f.name, specs[f.name])
    group = parser.add_argument_group("vopd teacher checkpoint")
    for _, _, name in PLUGIN_FIELDS_ELSEWHERE:
        _add_option(group, name, specs[name])
    return parser


def build_parser(prog: str = "vopd-train") -> argparse.ArgumentParser:
    """Every Megatron-LM flag, then the plugin's through Megatron's extra-arguments hook.
    (Cached: parsing does not change a parser. Kept per value of $WORLD_SIZE, which one of
    Megatron-LM's defaults reads, as megatron_args keeps its table of defaults.)"""
    return _build_parser(prog, os.environ.get("WORLD_SIZE"))


@functools.cache
def _build_parser(prog: str, _world_size: str | None) -> argparse.ArgumentParser:
    parser = megatron_parser()
    parser.prog = prog
    parser.description = ("vOPD on-policy distillation on Megatron-Core. Megatron-LM's flags keep their "
                          "defaults and meanings (docs/training.md, docs/megatron_flags.md).")
    return add_vopd_arguments(parser)


# ---------------------------------------------------------------- YAML

def load_yaml_overrides(path) -> dict[str, object]:
    """Read a flat YAML mapping; keys may be flag names (`num-layers`, `--num-layers`)
    or dests (`num_layers`) and come back normalised to underscores. An empty file is {}."""
    return {k: v for k, (v, _) in read_yaml(path).items()}


def read_yaml(path) -> dict[str, tuple[object, str]]:
    """normalised key -> (value, the key as written)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a YAML file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of flag: value, not a {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in out:
            raise ConfigError(f"config file {path}: {key!r} is set twice (as flag and field name)")
        out[name] = (value, str(key).lstrip("-"))
    return out


def _switch_tokens(where: str, action, value, by_option: bool) -> list[str]:
    """A switch set from YAML: by its flag name, true means "given"; by its dest, the value is the dest's."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if isinstance(action, argparse.BooleanOptionalAction):
        return [action.option_strings[0] if value else action.option_strings[1]]
    if by_option:
        return [action.option_strings[0]] if value else []
    if value == action.const:
        return [action.option_strings[0]]
    if value == action.default:
        return []
    raise ConfigError(f"{where}: {value!r} cannot be set through {action.option_strings[0]}")


def _value_tokens(where: str, action, value) -> list[str]:
    option = action.option_strings[0]
    if value is None:
        if action.default is None:
            return []
        raise ConfigError(f"{where} may not be null")
    if isinstance(value, list):
        if action.nargs not in ("+", "*") and not isinstance(action.nargs, int):
            raise ConfigError(f"{where}: expected one value, got a list")
        return [option, *map(str, value)]
    if isinstance(value, (dict, bool)) or (isinstance(value, (int, float)) and action.type is str):
        expected = getattr(action.type, "__name__", "a value")
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    return [option, str(value)]


def yaml_tokens(path, parser: argparse.ArgumentParser, allowed: set[str] | None = None) -> list[str]:
    """Command-line tokens equivalent to a --config YAML (keys: flag names or dests).

    allowed: dests the file may set (None: any option of `parser`)."""
    return items_tokens(read_yaml(path), f"config file {path}", parser, allowed)[0]


def resolve_key(parser: argparse.ArgumentParser, name: str, value):
    """The argparse action a YAML key means: the option `--name`, else an action of dest `name`
    (for a switch, the one whose constant is `value`); None if neither exists."""
    action = parser._option_string_actions.get(_flag(name))  # noqa: SLF001 - argparse's option table
    if action is not None:
        return action
    candidates = [a for a in parser._actions if a.dest == name]  # noqa: SLF001
    return next((a for a in candidates if a.nargs == 0 and a.const == value), candidates[0] if candidates else None)


def items_tokens(items: dict[str, tuple[object, str]], where: str, parser: argparse.ArgumentParser,
                 allowed: set[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(tokens, {dest: key as written}) for YAML items (normalised key -> (value, written key))."""
    tokens, dests, unknown = [], {}, []
    for name, (value, written) in items.items():
        here = f"{where}: {written}"
        action = resolve_key(parser, name, value)
        if action is None or (allowed is not None and action.dest not in allowed):
            unknown.append(written)
            continue
        if action.dest in ("config", "help"):
            raise ConfigError(f"{here}: a config file cannot set --{written}")
        dests[action.dest] = written
        if action.nargs == 0:
            tokens += _switch_tokens(here, action, value, by_option=_flag(name) in action.option_strings)
        else:
            tokens += _value_tokens(here, action, value)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return tokens, dests


def parse_tokens(parser: argparse.ArgumentParser, tokens: list[str], where: str) -> argparse.Namespace:
    """parser.parse_args, with its error prefixed by where the tokens came from."""
    try:
        return parser.parse_args(tokens)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def plugin_section(cls, ns: argparse.Namespace):
    """A plugin section (DistillArgs, DataArgs, EvalArgs) from the parsed namespace."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
