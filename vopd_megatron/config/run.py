"""RunConfig: the sections of one run, and the rules that need more than one of them.

A RunConfig is what the front end (`config/args.py`) hands to an entry point:
the Megatron-backed sections (`schema.ModelArgs` for the student and the
teacher, `ParallelArgs`, `TrainArgs`, ...) and the plugin's (`DistillArgs`,
`DataArgs`, `EvalArgs`). `RunConfig.validate(world_size)` checks everything
that can be checked before any process group or weight exists and raises
`ConfigError` naming the flag: first each section on its own (`checks`:
ranges, one model's TP x PP split, the `--vopd-*` flags together), then the
rules that compare sections, which live here: the world size against the
layout, teacher and student sharing one vocabulary and sequence length, the
batch against data parallelism, data and evaluation lengths against
`--seq-length`, FP8 GEMM shapes (`fp8_shapes`). What the machine lacks
(Transformer Engine, an FP8 GPU) is asked separately when a run starts
(`model/runtime_checks.py`), so that `--dry-run` plans a GPU job on a laptop.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from .checks import (
    MEGATRON_SECTIONS, PLUGIN_SECTIONS, check_distill, check_megatron_values, check_ranges, validate_model_args,
)
from .fp8_shapes import fp8_shape_problems
from .schema import (
    CheckpointArgs, ConfigError, DataArgs, DistillArgs, EvalArgs, LoggingArgs, ModelArgs, ParallelArgs, TrainArgs,
)


@dataclass
class RunConfig:
    """One run: each section once (two models), built by the front end or in code."""

    model: ModelArgs = field(default_factory=ModelArgs)
    teacher: ModelArgs = field(default_factory=ModelArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    distill: DistillArgs = field(default_factory=DistillArgs)
    data: DataArgs = field(default_factory=DataArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)

    def data_parallel_size(self, world_size: int) -> int:
        mp = self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size
        return world_size // mp

    def num_microbatches(self, world_size: int) -> int:
        per_step = self.train.micro_batch_size * self.data_parallel_size(world_size)
        return self.train.global_batch_size // per_step

    def validate(self, world_size: int) -> "RunConfig":
        """Raise ConfigError for anything wrong that needs no GPU to see (validate_run)."""
        validate_run(self, world_size)
        return self

    def data_stop_strings(self) -> tuple[str, ...]:
        """--rollout-stop as a tuple of strings: one string, or a JSON list of strings."""
        raw = self.data.rollout_stop
        if raw is None or raw == "":
            return ()
        if raw.lstrip().startswith("["):
            import json

            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--rollout-stop {raw!r} starts with '[' but is not a JSON list ({exc})") from None
            if not (isinstance(value, list) and value and all(isinstance(x, str) and x for x in value)):
                raise ConfigError(f"--rollout-stop {raw!r}: expected a JSON list of non-empty strings")
            return tuple(value)
        return (raw,)

    @property
    def eval_max_new_tokens(self) -> int:
        e = self.eval
        return e.eval_max_new_tokens if e.eval_max_new_tokens is not None else self.data.rollout_max_new_tokens

    @property
    def eval_temperature(self) -> float:
        e = self.eval
        return e.eval_temperature if e.eval_temperature is not None else self.distill.vopd_temperature



def validate_run(run: RunConfig, world_size: int) -> None:
    """Every check that needs neither a GPU nor a process group (RunConfig.validate):
    each section's own (`checks`), then the rules across sections."""
    p, t = run.parallel, run.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    check_megatron_fields(run)
    for attr in PLUGIN_SECTIONS:
        check_ranges(getattr(run, attr))
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by TP {tp} x PP {pp}")
    for who, m in (("student", run.model), ("teacher", run.teacher)):
        validate_model_args(who, m, tp, pp)
    if run.model.vocab_size != run.teacher.vocab_size:
        raise ConfigError(
            f"teacher vocab size {run.teacher.vocab_size} != student vocab size "
            f"{run.model.vocab_size}: distillation needs one shared tokenizer and vocabulary"
        )
    if run.model.padded_vocab_size(tp) != run.teacher.padded_vocab_size(tp):
        raise ConfigError(f"teacher padded vocab size {run.teacher.padded_vocab_size(tp)} != the student's "
                          f"{run.model.padded_vocab_size(tp)}: set the same --make-vocab-size-divisible-by / "
                          "--padded-vocab-size for both")
    if run.model.seq_length != run.teacher.seq_length:
        raise ConfigError("teacher and student must use the same --seq-length")
    dp = world_size // (tp * pp)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {t.global_batch_size} is not divisible by "
            f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp}"
        )
    check_distill(run.distill)
    _validate_data(run)
    validate_eval(run)
    if run.checkpoint.finetune and not run.checkpoint.load:
        raise ConfigError("--finetune needs --load (the weights to start from)")
    if p.sequence_parallel and tp > 1 and run.model.seq_length % tp:
        raise ConfigError(f"--sequence-parallel needs --seq-length {run.model.seq_length} divisible by TP {tp}")
    if run.distill.teacher_fp8:
        problems = fp8_shape_problems(run.teacher, p, t)
        if problems:
            raise ConfigError("--teacher-fp8: the teacher's GEMMs cannot run in FP8: " + "; ".join(problems))
    if run.model.megatron_overrides.get("fp8"):
        problems = fp8_shape_problems(run.model, p, t)
        if problems:
            raise ConfigError("--fp8-format: the student's GEMMs cannot run in FP8: " + "; ".join(problems))


def check_megatron_fields(run: RunConfig) -> None:
    """MEGATRON_RANGES on the Megatron-backed fields of a RunConfig (also one built in code)."""
    for attr in MEGATRON_SECTIONS:
        section = getattr(run, attr)
        values = {f.name: getattr(section, f.name) for f in fields(section) if f.name != "megatron_overrides"}
        try:
            check_megatron_values({**values, **section.megatron_overrides}
                                  if hasattr(section, "megatron_overrides") else values)
        except ConfigError as exc:
            raise ConfigError(f"teacher: {exc}" if attr == "teacher" else str(exc)) from None


def _validate_data(run: RunConfig) -> None:
    d, vocab = run.data, run.model.vocab_size
    if d.rollout_data and d.prompt_data:
        raise ConfigError("give either --rollout-data (external rollouts) or --prompt-data (on-policy), not both")
    if d.eos_id is not None and vocab is not None and d.eos_id >= vocab:
        raise ConfigError(f"--eos-id {d.eos_id} is outside the vocabulary [0, {vocab}) (--vocab-size)")
    if d.rollout_stop is not None:
        run.data_stop_strings()  # raises on a malformed list
        if not d.tokenizer_model:
            raise ConfigError("--rollout-stop needs --tokenizer-model (stop strings are matched on decoded text)")
    if d.prompt_data and not 1 <= d.rollout_max_new_tokens < run.model.seq_length:
        raise ConfigError(
            f"--rollout-max-new-tokens {d.rollout_max_new_tokens} must be in [1, --seq-length "
            f"{run.model.seq_length}): the prompt needs room in the sequence"
        )


def validate_eval(run: RunConfig) -> None:
    e = run.eval
    if e.eval_every and not e.eval_data:
        raise ConfigError("--eval-every needs --eval-data")
    if not e.eval_data:
        return
    if e.eval_pass_k is not None and not 1 <= e.eval_pass_k <= e.eval_samples:
        raise ConfigError(f"--eval-pass-k {e.eval_pass_k} must be in [1, --eval-samples {e.eval_samples}]")
    n = run.eval_max_new_tokens
    if not 1 <= n < run.model.seq_length:
        raise ConfigError(f"--eval-max-new-tokens {n} must be in [1, --seq-length {run.model.seq_length}): "
                          "the problem needs room in the sequence")
