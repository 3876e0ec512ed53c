"""Megatron-LM's own argument parser and config helpers, behind typed functions.

Configuration is Megatron-LM's (DESIGN.md §4): the parser is
`megatron.training.arguments.add_megatron_arguments` (`megatron_parser`), to
which `plugin_flags.build_parser` adds the plugin's flags through its
extra-arguments hook (`plugin_flags.add_vopd_arguments`),
Megatron-LM's `validate_args` derives and checks what it always does
(ffn_hidden_size from the SwiGLU rule, kv_channels, the global batch size,
sequence parallelism off at TP 1, ...), and Megatron-LM's helpers turn the
namespace into typed configs: `core_transformer_config_from_args` (the
TransformerConfig exactly as pretrain_gpt.py builds it),
`get_megatron_optimizer_config` and `get_megatron_ddp_config`.

A RunConfig carries Megatron-named fields plus the `megatron_overrides` of the
flags no field mirrors, so `megatron_namespace(model, parallel, train)`
rebuilds the namespace Megatron-LM would have parsed from it: Megatron-LM's
defaults, then the fields, then the overrides, validated again. Every typed
Megatron config below the entry point comes from there, also for a RunConfig
built in code, so there is one way a config is made.

`validate_args` prints its arguments and asserts; here it runs quietly (its
warnings are returned as lines) and a failed check becomes a `ConfigError`
naming the flags the failing statement reads.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import functools
import inspect
import io
import os
import warnings

from .megatron_lm import import_megatron_training, planning_as_on_gpu
from .schema import ConfigError, ModelArgs, ParallelArgs, TrainArgs

USAGE = ("%(prog)s [Megatron-LM flags] [--vopd-* / --teacher-* / --rollout-* / --eval-* flags] "
         "[--config FILE.yaml] [--dry-run]")


class FrontEndParser(argparse.ArgumentParser):
    """Megatron-LM's parser, whose errors are one-line ConfigErrors (not usage + exit 2)."""

    def error(self, message):
        raise ConfigError(message)


def megatron_parser() -> FrontEndParser:
    """Every Megatron-LM flag, on a parser whose errors are ConfigErrors (a new parser each call)."""
    import_megatron_training()
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(FrontEndParser(prog="vopd-train", usage=USAGE, allow_abbrev=False))
    for action in parser._actions:  # noqa: SLF001
        # Megatron-LM 0.19 has a help text with a bare "%" (--moe-paged-stash-buffer-size-factor-cuda)
        # that makes --help raise; escape it the way argparse expects.
        if action.help and "%" in action.help:
            try:
                action.help % {"default": action.default, "prog": "", "dest": action.dest}
            except (ValueError, TypeError, KeyError):
                action.help = action.help.replace("%", "%%")
    return parser


def _megatron_tables() -> tuple[dict, dict, dict, tuple]:
    """Megatron-LM's defaults, option groups and actions. One of its defaults is read from the
    environment (`--inprocess-active-world-size`: $WORLD_SIZE), so the tables are kept per value of
    it: a process that parses under another launcher environment (tests do) compares a flag with
    the default its own parser gives it, not with a stale one."""
    return _megatron_tables_for(os.environ.get("WORLD_SIZE"))


@functools.cache
def _megatron_tables_for(_world_size: str | None) -> tuple[dict, dict, dict, tuple]:
    parser = megatron_parser()
    defaults = vars(parser.parse_args([]))  # argparse's own resolution (first action of a dest wins)
    groups, options, actions = {}, {}, []
    for group in parser._action_groups:  # noqa: SLF001 - the only record of argparse's groups
        for action in group._group_actions:  # noqa: SLF001
            if action.dest == "help":
                continue
            groups.setdefault(action.dest, group.title)
            options.setdefault(action.dest, []).append(action)
            actions.append((tuple(action.option_strings), action.dest, group.title))
    return defaults, groups, options, tuple(actions)


def megatron_defaults() -> dict[str, object]:
    """Megatron-LM's default of every dest (a fresh deep copy)."""
    return copy.deepcopy(_megatron_tables()[0])


def megatron_group(dest: str) -> str:
    return _megatron_tables()[1][dest]


def megatron_actions() -> tuple:
    """(option strings, dest, argparse group title) of every Megatron-LM flag."""
    return _megatron_tables()[3]


def option_for(dest: str, value=None) -> str:
    """The command-line spelling of a dest (the option whose constant is `value` for switches)."""
    actions = _megatron_tables()[2].get(dest)
    if not actions:
        return "--" + dest.replace("_", "-")
    for action in actions:
        if action.nargs == 0 and action.const == value and action.option_strings:
            return action.option_strings[0]
    return actions[0].option_strings[0]


# ---------------------------------------------------------------- validate_args, quietly


@contextlib.contextmanager
def _validation_context():
    """Silence validate_args' argument dump, record its warnings, let it run without a GPU."""
    with planning_as_on_gpu(), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def validate(ns: argparse.Namespace, world_size: int, defaults: dict | None = None, rank: int = 0) -> list[str]:
    """Megatron-LM's validate_args on `ns` (in place); returns its warnings as text.

    Raises ConfigError for a failed check, naming the flags it reads."""
    import_megatron_training()
    from megatron.training.arguments import validate_args

    ns.world_size, ns.rank = world_size, rank
    # validate_args copies the training batch sizes into the evaluation ones it was not
    # given, then checks those first: a bad --global-batch-size would be reported as
    # the --eval-global-batch-size nobody set.
    eval_given = any(getattr(ns, d, None) is not None for d in ("eval_global_batch_size", "eval_micro_batch_size"))
    with _validation_context() as caught:
        try:
            validate_args(ns, dict(defaults or {}))
        except (AssertionError, ValueError, RuntimeError, TypeError, KeyError) as exc:
            if "eval_global_batch_size" in str(exc) and not eval_given:
                raise ConfigError(
                    f"--global-batch-size {ns.global_batch_size} is not divisible by --micro-batch-size "
                    f"{ns.micro_batch_size} x data-parallel size {ns.data_parallel_size} (Megatron-LM's check)"
                ) from None
            raise ConfigError(describe_failure(exc)) from None
        except SystemExit:  # validate_args calls exit() on a few removed flags
            raise ConfigError("Megatron-LM's argument checks stopped the run (a removed flag)") from None
    # "Overriding default arguments for ..." is validate_args reporting that the command
    # line set a flag the tool gave a default (`defaults`: vopd-eval's micro batch of 1,
    # say) -- what the user asked for, not news to them.
    return [str(w.message).strip() for w in caught
            if issubclass(w.category, UserWarning) and "megatron/training" in w.filename.replace("\\", "/")
            and not str(w.message).startswith("Overriding default arguments for ")]


@functools.cache
def _arguments_ast():
    import_megatron_training()
    import megatron.training.arguments as arguments

    return ast.parse(inspect.getsource(arguments))


def _failing_statement(exc: BaseException) -> ast.stmt | None:
    """The statement of megatron/training/arguments.py that raised `exc`."""
    tb, line = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith("megatron/training/arguments.py"):
            line = tb.tb_lineno
        tb = tb.tb_next
    if line is None:
        return None
    best = None
    for node in ast.walk(_arguments_ast()):
        if isinstance(node, (ast.Assert, ast.Raise)) and node.lineno <= line <= node.end_lineno:
            best = node
    return best


def describe_failure(exc: BaseException) -> str:
    """One line: Megatron-LM's message (or its failed check) and the flags involved."""
    message = " ".join(str(exc).split())
    node = _failing_statement(exc)
    dests = []
    if node is not None:
        for sub in ast.walk(node.test if isinstance(node, ast.Assert) else node):
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "args":
                if sub.attr in _megatron_tables()[0] and sub.attr not in dests:
                    dests.append(sub.attr)
        if not message and isinstance(node, ast.Assert):
            message = f"check `{ast.unparse(node.test)}` failed"
    flags = ", ".join(option_for(d) for d in dests)
    return f"Megatron-LM rejects the arguments: {message or type(exc).__name__}" + (f" ({flags})" if flags else "")


# ---------------------------------------------------------------- RunConfig sections <-> Megatron dests

#: ModelArgs fields whose Megatron-LM dest has another name (the flag's spelling is the field's).
_MODEL_RENAMED = {"norm_epsilon": "layernorm_epsilon"}


def model_dests(m: ModelArgs) -> dict[str, object]:
    """Megatron-LM dests of one model. A ModelArgs from the command line has every
    derived value filled in; one built in code keeps the dataclass' meaning
    (ffn 4h, kv_channels hidden/heads, max position embeddings = seq length)."""
    from dataclasses import fields

    dests = {_MODEL_RENAMED.get(f.name, f.name): getattr(m, f.name) for f in fields(m)
             if f.name not in ("megatron_overrides", "disable_bias_linear", "num_query_groups")}
    dests.update(
        add_bias_linear=not m.disable_bias_linear, ffn_hidden_size=m.ffn_size, kv_channels=m.head_dim,
        max_position_embeddings=m.max_position_embeddings or m.seq_length,
        group_query_attention=m.num_query_groups is not None,
    )
    if m.num_query_groups is not None:
        dests["num_query_groups"] = m.num_query_groups
    return {**dests, **m.megatron_overrides}


def parallel_dests(p: ParallelArgs) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(p)


def train_dests(t: TrainArgs) -> dict[str, object]:
    from dataclasses import fields

    dests = {f.name: getattr(t, f.name) for f in fields(t) if f.name != "megatron_overrides"}
    if t.megatron_overrides.get("train_samples") is not None:  # sample-based: Megatron wants no train_iters
        dests["train_iters"] = None
    return {**dests, **t.megatron_overrides}


def megatron_namespace(m: ModelArgs, p: ParallelArgs, t: TrainArgs, world_size: int | None = None,
                       ) -> argparse.Namespace:
    """The validated namespace Megatron-LM would have parsed for this model and run."""
    ns = argparse.Namespace(**megatron_defaults())
    for dest, value in {**model_dests(m), **parallel_dests(p), **train_dests(t)}.items():
        setattr(ns, dest, value)
    validate(ns, world_size or p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    return ns


def transformer_config_from_namespace(ns: argparse.Namespace):
    """core_transformer_config_from_args(ns), also where the target's fused kernels are absent
    (megatron_lm.planning_as_on_gpu); its errors as ConfigError."""
    import_megatron_training()
    from megatron.training.arguments import core_transformer_config_from_args

    with planning_as_on_gpu(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return core_transformer_config_from_args(ns)
        except (AssertionError, ValueError) as exc:
            raise ConfigError(f"Megatron-Core rejects the model config: {' '.join(str(exc).split())}") from None


def megatron_transformer_config(m: ModelArgs, p: ParallelArgs, t: TrainArgs):
    """TransformerConfig exactly as Megatron-LM's core_transformer_config_from_args builds it
    for this model on the target machine (the plan; model/builder.py adapts it to this one)."""
    return transformer_config_from_namespace(megatron_namespace(m, p, t))


def optimizer_config(m: ModelArgs, p: ParallelArgs, t: TrainArgs):
    """(OptimizerConfig, per-parameter overrides) from Megatron-LM's get_megatron_optimizer_config:
    no weight decay on biases and norms, --decoupled-lr on the embedding and output layer."""
    import_megatron_training()
    from megatron.training.training import get_megatron_optimizer_config

    return get_megatron_optimizer_config(megatron_namespace(m, p, t))


def ddp_config(m: ModelArgs, p: ParallelArgs, t: TrainArgs):
    """DistributedDataParallelConfig from Megatron-LM's get_megatron_ddp_config."""
    import_megatron_training()
    from megatron.training.training import get_megatron_ddp_config

    return get_megatron_ddp_config(megatron_namespace(m, p, t))


def scheduler_settings(ns: argparse.Namespace, updates_per_iteration: int = 1) -> dict[str, object]:
    """OptimizerParamScheduler arguments by Megatron-LM's get_optimizer_param_scheduler rules
    (steps counted in samples; the scheduler advances by the global batch per optimizer step).

    updates_per_iteration: optimizer steps per global batch (--vopd-updates-per-batch): every
    horizon is stretched by it, so the schedule keeps its shape over iterations. Where
    Megatron-LM would refuse a warmup as long as the decay (a short smoke run), the decay
    ends one sample after the warmup; and resuming keeps the checkpoint's schedule unless
    --override-opt-param-scheduler (docs/training.md, "another meaning")."""
    gbs, u = ns.global_batch_size, updates_per_iteration
    if ns.train_iters:
        decay = (ns.lr_decay_iters or ns.train_iters) * gbs
        wd_steps = ns.train_iters * gbs
        wsd = ns.lr_wsd_decay_iters * gbs if ns.lr_wsd_decay_iters is not None else None
        warmup = ns.lr_warmup_fraction * decay if ns.lr_warmup_fraction is not None else ns.lr_warmup_iters * gbs
    else:
        decay = ns.lr_decay_samples or ns.train_samples
        wd_steps = ns.train_samples
        wsd = ns.lr_wsd_decay_samples
        warmup = ns.lr_warmup_fraction * decay if ns.lr_warmup_fraction is not None else ns.lr_warmup_samples
    return dict(
        init_lr=ns.lr_warmup_init, max_lr=ns.lr, min_lr=ns.min_lr, lr_warmup_steps=warmup * u,
        lr_decay_steps=max(decay, warmup + 1) * u, lr_decay_style=ns.lr_decay_style,
        start_wd=ns.start_weight_decay, end_wd=ns.end_weight_decay, wd_incr_steps=max(wd_steps, 1) * u,
        wd_incr_style=ns.weight_decay_incr_style,
        # On resume the checkpoint's schedule wins unless --override-opt-param-scheduler: Megatron-LM
        # would refuse a changed schedule (e.g. a longer --train-iters) without one of its two flags.
        use_checkpoint_opt_param_scheduler=not ns.override_opt_param_scheduler,
        override_opt_param_scheduler=ns.override_opt_param_scheduler,
        wsd_decay_steps=wsd * u if wsd is not None else None, lr_wsd_decay_style=ns.lr_wsd_decay_style,
    )


def check_schedule(settings: dict) -> None:
    """What OptimizerParamScheduler would assert, as a ConfigError naming the flags."""
    s = settings
    if s["max_lr"] is None:
        raise ConfigError("--lr is required (Megatron-LM has no default learning rate)")
    if not s["init_lr"] <= s["max_lr"]:
        raise ConfigError(f"--lr-warmup-init {s['init_lr']} must be <= --lr {s['max_lr']}")
    if s["lr_decay_style"] == "WSD" and s["wsd_decay_steps"] is None:
        raise ConfigError("--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-samples)")
    if s["start_wd"] is not None and s["end_wd"] is not None and s["end_wd"] < s["start_wd"]:
        raise ConfigError(f"--end-weight-decay {s['end_wd']} must be >= --start-weight-decay {s['start_wd']}")
