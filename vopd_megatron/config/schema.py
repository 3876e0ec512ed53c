"""Typed run configuration: Megatron-LM's names for what Megatron has, `vopd_*` for the rest.

Every field is named after the Megatron-LM flag it mirrors (`--num-layers` ->
`num_layers`), so a user's existing flags and YAML carry over unchanged; the
distillation fields mirror the plugin's `--vopd-*` and `--teacher-*` flags.
`RunConfig.validate(world_size)` checks everything that can be checked before
any process group or weight exists, and raises `ConfigError` naming the flag.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..loss.config import LOSS_MODES, TOPK_MODES, LossConfig


class ConfigError(ValueError):
    """A configuration problem found before any work starts."""


@dataclass
class ModelArgs:
    """Shape of one GPT model (student or teacher); Megatron-LM flag names."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None
    """Defaults to 4 * hidden_size (Megatron's default)."""
    num_query_groups: int | None = None
    """Grouped-query attention groups; None = multi-head attention."""
    kv_channels: int | None = None
    """Per-head dimension; defaults to hidden_size / num_attention_heads."""
    seq_length: int = 128
    max_position_embeddings: int | None = None
    """Defaults to seq_length."""
    position_embedding_type: str = "rope"
    """"rope", "learned_absolute" or "none"."""
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    use_rope_scaling: bool = False
    """Llama-3.1-style RoPE frequency scaling."""
    rope_scaling_factor: float = 8.0
    normalization: str = "LayerNorm"
    """"LayerNorm" or "RMSNorm"."""
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    untie_embeddings_and_output_weights: bool = False
    disable_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    init_method_std: float = 0.02
    vocab_size: int | None = None
    """True vocabulary size (the tokenizer's); the output layer is padded."""
    make_vocab_size_divisible_by: int = 128
    decoder_first_pipeline_num_layers: int | None = None
    """Transformer layers on the first pipeline stage; None = an even share. The
    teacher inherits the student's value unless its --teacher-model-config sets it
    (null for an even split)."""
    decoder_last_pipeline_num_layers: int | None = None
    """Transformer layers on the last pipeline stage; None = an even share. The
    layers left after the first and last stages split evenly over the middle stages."""

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Megatron's padding: the next multiple of make_vocab_size_divisible_by * tp."""
        step = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / step) * step)

    def pipeline_stage_layers(self, pp: int) -> list[int]:
        """Transformer layers on each of the `pp` pipeline stages, as Megatron-Core assigns them.

        Megatron-Core 0.19 (`get_num_layers_to_build`, TransformerConfig's checks):
        the first and last stages take --decoder-first/last-pipeline-num-layers
        where set, the layers left split evenly over the other stages, and every
        stage has at least one layer. Raises ConfigError, naming the flags, for a
        split Megatron refuses, and for two it builds wrong: both flags at PP 1
        (it builds the last-stage count), a first + last that leaves a middle
        stage no layers (it builds none there).
        """
        n, first, last = self.num_layers, self.decoder_first_pipeline_num_layers, self.decoder_last_pipeline_num_layers
        flags = "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers"
        if pp < 1:
            raise ConfigError(f"--pipeline-model-parallel-size {pp} must be >= 1")
        if pp > n:
            raise ConfigError(f"--pipeline-model-parallel-size {pp} is larger than --num-layers {n}")
        uneven = first is not None or last is not None
        if uneven and pp == 1:
            raise ConfigError(f"{flags} need --pipeline-model-parallel-size > 1")
        for flag, k in (("--decoder-first-pipeline-num-layers", first), ("--decoder-last-pipeline-num-layers", last)):
            if k is not None and k < 1:
                raise ConfigError(f"{flag} {k} must be >= 1")
        rest_stages = pp - (first is not None) - (last is not None)
        rest_layers = n - (first or 0) - (last or 0)
        if not uneven and n % pp:
            raise ConfigError(f"--num-layers {n} is not divisible by PP {pp}; set {flags} for an uneven split")
        if rest_stages == 0 and rest_layers != 0:
            raise ConfigError(f"{flags} ({first} + {last}) must add up to --num-layers {n} at PP {pp}")
        if rest_stages and (rest_layers < rest_stages or rest_layers % rest_stages):
            raise ConfigError(
                f"--num-layers {n} minus {flags} ({first}, {last}) leaves {rest_layers} layers for the other "
                f"{rest_stages} pipeline stage(s): they must split evenly, at least one layer each"
            )
        share = rest_layers // rest_stages if rest_stages else 0
        layers = [share] * pp
        if first is not None:
            layers[0] = first
        if last is not None:
            layers[-1] = last
        return layers


@dataclass
class ParallelArgs:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False


@dataclass
class TrainArgs:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 10
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "constant"
    """"constant", "linear" or "cosine" (Megatron's names)."""
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    """Defaults to train_iters."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    seed: int = 1234
    calculate_per_token_loss: bool = True
    """Global token mean over the whole batch (False: per-microbatch means)."""


@dataclass
class CheckpointArgs:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    teacher_load: str | None = None
    """Teacher checkpoint (loaded read-only); None keeps the teacher's random init (tests)."""
    finetune: bool = False
    """Load only the model weights from --load (e.g. a converted Hugging Face
    checkpoint) and start at iteration 0 with a fresh optimizer (Megatron-LM's --finetune)."""
    checkpoint_fallback: bool = True
    """When the newest checkpoint under --load / --teacher-load is damaged or
    unfinished, load the previous intact iteration with a warning (--no-checkpoint-fallback:
    stop with an error instead)."""


@dataclass
class LoggingArgs:
    tensorboard_dir: str | None = None
    log_interval: int = 1


@dataclass
class DistillArgs:
    """The plugin's `--vopd-*` flags; `loss_config()` turns them into a LossConfig."""

    vopd_loss: str = "vopd"
    vopd_top_k: int | None = None
    vopd_temperature: float = 1.0
    vopd_rollout_correction: str | None = None
    vopd_rollout_correction_cap: float = 2.0
    vopd_ppo_clip: float | None = None
    vopd_loss_backend: str = "auto"
    """Loss kernels: "auto" (fused Triton kernels on CUDA when triton imports, else
    PyTorch), "torch" or "triton" (docs/performance.md)."""
    teacher_fp8: bool = False
    """Run the teacher's transformer layers in FP8 through Transformer Engine
    (e4m3, tensorwise recipe, TE layer spec); the student and both models' logits
    stay in their dtype. Needs TE, an FP8-capable GPU and GEMM dimensions that
    are multiples of 16 (model/fp8.py)."""
    teacher_model_config: str | None = None
    """YAML of ModelArgs overrides for the teacher (it may be deeper and wider)."""
    vopd_updates_per_batch: int = 1
    """Optimizer steps per rollout batch. Above 1 the later steps are off-policy:
    needs --vopd-ppo-clip, and rollouts that carry the sampler's log-probs (the
    PPO ratio's denominator)."""

    def loss_config(self) -> LossConfig:
        return LossConfig(
            mode=self.vopd_loss, top_k=self.vopd_top_k, temperature=self.vopd_temperature,
            rollout_correction=self.vopd_rollout_correction,
            rollout_correction_cap=self.vopd_rollout_correction_cap, ppo_clip=self.vopd_ppo_clip,
            backend=self.vopd_loss_backend,
        )


@dataclass
class DataArgs:
    rollout_data: str | None = None
    """JSONL of tokenized rollouts (file-backed RolloutSource: an external sampler's output)."""
    prompt_data: str | None = None
    """Prompts for on-policy sampling (the student samples the completions every
    step): JSONL or Parquet with a text prompt field, chat `messages`, or
    pre-tokenized `prompt_ids`."""
    prompt_field: str = "prompt"
    """Field holding a text prompt in --prompt-data."""
    apply_chat_template: bool = False
    """Wrap text prompts as one user turn in the tokenizer's chat template
    (chat `messages` always use it)."""
    teacher_tokenizer_model: str | None = None
    """The teacher's tokenizer, checked against --tokenizer-model: they must be identical."""
    rollout_max_new_tokens: int = 32
    """Completion tokens at most per on-policy rollout."""
    rollout_top_k: int = 0
    """0 = unfiltered sampling (what the OPD/vOPD estimators assume)."""
    rollout_top_p: float = 0.0
    """0.0 = unfiltered sampling (what the OPD/vOPD estimators assume)."""
    eos_id: int | None = None
    """End-of-sequence token id: an on-policy completion stops after it."""
    rollout_stop: str | None = None
    """Stop string: a completion (rollouts and evaluation) ends after the token that
    completes it in the decoded text; several as a JSON list, e.g. '["</answer>", "\\n\\n"]'.
    Needs --tokenizer-model."""
    rollout_batch_size: int = 64
    """Prompts per static generation batch."""
    tokenizer_model: str | None = None
    """Student tokenizer: tokenizer.json, a Hugging Face tokenizer directory, or a
    sentencepiece model; needed for text prompts."""


@dataclass
class EvalArgs:
    """Periodic evaluation inside vopd-train, and vopd-eval (docs/eval.md)."""

    eval_data: str | None = None
    """JSONL (or Parquet) of problems with reference answers; problems are tokenized as training prompts are."""
    eval_problem_field: str = "problem"
    """Field holding the problem (text, chat `messages`, or token ids) in --eval-data."""
    eval_answer_field: str = "answer"
    """Field holding the reference answer in --eval-data (graded with math-verify)."""
    eval_interval: int = 0
    """Evaluate at iteration 0, every N iterations and after the last one; 0 = never (vopd-train)."""
    eval_samples: int = 1
    """Completions sampled per problem (n)."""
    eval_pass_k: int | None = None
    """k of pass@k (unbiased estimator from n samples); defaults to --eval-samples."""
    eval_max_problems: int | None = None
    """Evaluate only the first M problems of --eval-data; None = all."""
    eval_temperature: float | None = None
    """Sampling temperature of evaluation; defaults to --vopd-temperature."""
    eval_max_new_tokens: int | None = None
    """Completion tokens at most in evaluation; defaults to --rollout-max-new-tokens."""
    eval_output: str | None = None
    """vopd-eval: directory for summary.json and per-problem records (problems.jsonl)."""


@dataclass
class RunConfig:
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
        """Raise ConfigError for anything wrong that needs no GPU to see."""
        p, t = self.parallel, self.train
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        if world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not divisible by TP {tp} x PP {pp}")
        for who, m in (("student", self.model), ("teacher", self.teacher)):
            validate_model_args(who, m, tp, pp)
        if self.model.vocab_size != self.teacher.vocab_size:
            raise ConfigError(
                f"teacher vocab size {self.teacher.vocab_size} != student vocab size "
                f"{self.model.vocab_size}: distillation needs one shared tokenizer and vocabulary"
            )
        if self.model.seq_length != self.teacher.seq_length:
            raise ConfigError("teacher and student must use the same --seq-length")
        dp = world_size // (tp * pp)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size {t.global_batch_size} is not divisible by "
                f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp}"
            )
        if self.distill.vopd_loss not in LOSS_MODES:
            raise ConfigError(f"unknown --vopd-loss {self.distill.vopd_loss!r}; expected one of {LOSS_MODES}")
        if self.distill.vopd_loss in TOPK_MODES and self.distill.vopd_top_k is None:
            raise ConfigError(f"--vopd-loss {self.distill.vopd_loss} needs --vopd-top-k")
        if self.distill.vopd_updates_per_batch < 1:
            raise ConfigError("--vopd-updates-per-batch must be >= 1")
        if self.distill.vopd_updates_per_batch > 1 and self.distill.vopd_ppo_clip is None:
            raise ConfigError("--vopd-updates-per-batch > 1 needs --vopd-ppo-clip (the later updates are off-policy)")
        try:
            self.distill.loss_config()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        d = self.data
        if d.rollout_data and d.prompt_data:
            raise ConfigError("give either --rollout-data (external rollouts) or --prompt-data (on-policy), not both")
        if d.rollout_stop is not None:
            self.data_stop_strings()  # raises on a malformed list
            if not d.tokenizer_model:
                raise ConfigError("--rollout-stop needs --tokenizer-model (stop strings are matched on decoded text)")
        if d.prompt_data and not 1 <= d.rollout_max_new_tokens < self.model.seq_length:
            raise ConfigError(
                f"--rollout-max-new-tokens {d.rollout_max_new_tokens} must be in [1, --seq-length "
                f"{self.model.seq_length}): the prompt needs room in the sequence"
            )
        self._validate_eval()
        if t.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ConfigError(f"unknown --lr-decay-style {t.lr_decay_style!r}")
        if p.sequence_parallel and tp == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if p.sequence_parallel and self.model.seq_length % tp:
            raise ConfigError(f"--sequence-parallel needs --seq-length {self.model.seq_length} divisible by TP {tp}")
        if self.distill.teacher_fp8:
            from ..model.fp8 import fp8_shape_problems

            problems = fp8_shape_problems(self.teacher, p, t)
            if problems:
                raise ConfigError("--teacher-fp8: the teacher's GEMMs cannot run in FP8: " + "; ".join(problems))
        return self

    def check_runtime(self) -> "RunConfig":
        """Raise ConfigError for what this machine lacks (Transformer Engine, an
        FP8 GPU); run before any process group or weight exists. Separate from
        validate() so that --dry-run can plan a GPU job on a machine without one."""
        if self.distill.teacher_fp8:
            from ..model.fp8 import fp8_runtime_problems

            problems = fp8_runtime_problems()
            if problems:
                raise ConfigError("--teacher-fp8 cannot run here: " + "; ".join(problems))
        return self


    def _validate_eval(self) -> None:
        e = self.eval
        if e.eval_interval < 0:
            raise ConfigError(f"--eval-interval {e.eval_interval} must be >= 0 (0 = never)")
        if e.eval_interval and not e.eval_data:
            raise ConfigError("--eval-interval needs --eval-data")
        if not e.eval_data:
            return
        if e.eval_samples < 1:
            raise ConfigError(f"--eval-samples {e.eval_samples} must be >= 1")
        if e.eval_pass_k is not None and not 1 <= e.eval_pass_k <= e.eval_samples:
            raise ConfigError(f"--eval-pass-k {e.eval_pass_k} must be in [1, --eval-samples {e.eval_samples}]")
        if e.eval_max_problems is not None and e.eval_max_problems < 1:
            raise ConfigError(f"--eval-max-problems {e.eval_max_problems} must be >= 1")
        if e.eval_temperature is not None and not e.eval_temperature > 0:
            raise ConfigError(f"--eval-temperature {e.eval_temperature} must be > 0")
        n = self.eval_max_new_tokens
        if not 1 <= n < self.model.seq_length:
            raise ConfigError(f"--eval-max-new-tokens {n} must be in [1, --seq-length {self.model.seq_length}): "
                              "the problem needs room in the sequence")

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


def validate_model_args(who: str, m: ModelArgs, tp: int, pp: int) -> None:
    """ConfigError if one model's shape cannot be split TP x PP (used for both
    models of a run and by the checkpoint converter)."""
    if m.vocab_size is None or m.vocab_size < 1:
        raise ConfigError(f"{who}: vocab size unknown (set --vocab-size or a tokenizer)")
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"{who}: --num-attention-heads {m.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}"
        )
    if m.query_groups % tp:
        raise ConfigError(f"{who}: --num-query-groups {m.query_groups} is not divisible by TP {tp}")
    if m.num_attention_heads % m.query_groups:
        raise ConfigError(f"{who}: --num-attention-heads must be a multiple of --num-query-groups")
    try:
        m.pipeline_stage_layers(pp)
    except ConfigError as exc:
        raise ConfigError(f"{who}: {exc}") from None
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"{who}: --hidden-size must be divisible by --num-attention-heads (or set --kv-channels)")
    if m.ffn_size % tp:
        raise ConfigError(f"{who}: --ffn-hidden-size {m.ffn_size} is not divisible by TP {tp}")
    if m.position_embedding_type not in ("rope", "learned_absolute", "none"):
        raise ConfigError(f"{who}: unknown --position-embedding-type {m.position_embedding_type!r}")
    if m.normalization not in ("LayerNorm", "RMSNorm"):
        raise ConfigError(f"{who}: unknown --normalization {m.normalization!r}")


def section_fields(section) -> list[str]:
    """Field names of a config section dataclass (for flag generation)."""
    return [f.name for f in fields(section)]
