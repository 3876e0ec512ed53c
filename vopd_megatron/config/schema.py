"""Typed sections of a run's configuration: Megatron-LM's names for what Megatron has, `vopd_*` for the rest.

Every field is named after the Megatron-LM flag it mirrors (`--num-layers` ->
`num_layers`), so a user's existing flags and YAML carry over unchanged; the
distillation fields mirror the plugin's `--vopd-*`, `--teacher-*`,
`--rollout-*` and `--eval-*` flags. The command line fills these sections
through Megatron-LM's own parser (`config/args.py`): Megatron-LM's defaults
apply there. The dataclass defaults below are only for a RunConfig built in
code (tests, tools); `ModelArgs.megatron_overrides` / `TrainArgs.megatron_overrides`
carry the Megatron-LM flags a user set that no field mirrors, so that
Megatron's own helpers rebuild the exact TransformerConfig, optimizer and DDP
configs from a RunConfig (`config/megatron_args.py`).

A `RunConfig` (config/run.py) holds one of each section (two ModelArgs: the
student and the teacher); `RunConfig.validate(world_size)` checks everything
that can be checked before any process group or weight exists, and raises
`ConfigError` naming the flag.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from ..errors import UserError
from ..loss.config import RANGES as LOSS_RANGES
from ..loss.config import LossConfig, LossConfigError


class ConfigError(UserError, ValueError):
    """A configuration problem found before any work starts: a user error, reported
    as one `error: ...` line naming the flag (errors.entry_point); also a ValueError
    for callers that catch that."""


def ranged(default, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False):
    """A numeric plugin field with its admissible range, checked by `checks.check_ranges`.

    None (where the field allows it) is always admissible; otherwise the value
    must be finite and lie in [lo, hi], with the end marked open excluded.
    Every int and float field of the plugin sections declares one (a test
    holds it), so a new field cannot skip range checking.
    """
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open)})


def loss_field(default, name: str):
    """A `--vopd-*` field that sets LossConfig's `name`: its range is the loss's own
    (`loss.config.RANGES`), so the flag and LossConfig refuse the same values."""
    return field(default=default, metadata={"range": LOSS_RANGES[name]})


def flag_field(default, *aliases: str, **metadata):
    """A plugin field whose flag has extra spellings (e.g. ModelOpt's names)."""
    return field(default=default, metadata={"aliases": aliases, **metadata})


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
    megatron_overrides: dict = field(default_factory=dict)
    """Megatron-LM flags of this model that no field above mirrors, by argparse
    dest (e.g. {"attention_backend": AttnBackend.fused, "layernorm_zero_centered_gamma": True},
    {"padded_vocab_size": 152064}); only values that differ from Megatron-LM's defaults."""

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
        """Megatron's padding: the next multiple of make_vocab_size_divisible_by * tp,
        or exactly --padded-vocab-size when that is given (as Megatron-LM does)."""
        explicit = self.megatron_overrides.get("padded_vocab_size")
        if explicit is not None:
            return int(explicit)
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
    distributed_timeout_minutes: int = 10
    """Timeout of the process groups' collectives (Megatron-LM's flag and default)."""


@dataclass
class TrainArgs:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 10
    """Iterations (global batches); with --train-samples the front end sets it to
    train_samples // global_batch_size, as Megatron-LM does."""
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "constant"
    """Megatron-LM's names: "constant", "linear", "cosine", "inverse-square-root", "WSD"."""
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
    exit_interval: int | None = None
    """Save and stop after an iteration that is a multiple of this (Megatron-LM's --exit-interval)."""
    exit_duration_in_mins: int | None = None
    """Save and stop once the run has lasted this many minutes (Megatron-LM's --exit-duration-in-mins)."""
    megatron_overrides: dict = field(default_factory=dict)
    """Megatron-LM optimizer, schedule and data-parallel flags no field mirrors
    (e.g. {"train_samples": ..., "lr_warmup_fraction": 0.01, "decoupled_lr": 5e-4,
    "grad_reduce_in_bf16": True}), by dest; read by Megatron's own config helpers."""


@dataclass
class CheckpointArgs:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    teacher_load: str | None = flag_field(None, "--export-kd-teacher-load", plugin=True)
    """Teacher checkpoint (loaded read-only; ModelOpt's --export-kd-teacher-load is the
    same flag). Without --teacher-model-config its architecture comes from the
    model_config.yaml (ModelOpt) or model_flags.yaml (vopd-convert) in that directory.
    None keeps the teacher's random initialisation (tests)."""
    finetune: bool = False
    """Load only the model weights from --load (e.g. a converted Hugging Face
    checkpoint) and start at iteration 0 with a fresh optimizer (Megatron-LM's --finetune)."""
    checkpoint_fallback: bool = flag_field(True, plugin=True)
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
    """Loss mode: opd, vopd, vopd_topk, vopd_opt, full_kl or topk_kl (docs/loss.md)."""
    vopd_top_k: int | None = loss_field(None, "top_k")
    """k of the top-k modes (vopd_topk, topk_kl); an error with any other mode."""
    vopd_temperature: float = loss_field(1.0, "temperature")
    """Sampling and loss temperature tau (> 0, finite)."""
    vopd_rollout_correction: str | None = None
    """Correction for a sampling engine whose log-probs differ from the trainer's:
    "truncate" (truncated importance weight) or "mask"."""
    vopd_rollout_correction_cap: float = loss_field(2.0, "rollout_correction_cap")
    """Cap C of the rollout correction's importance weight."""
    vopd_ppo_clip: float | None = loss_field(None, "ppo_clip")
    """PPO ratio clipping epsilon in (0, 1) (needed by --vopd-updates-per-batch > 1)."""
    vopd_loss_backend: str = "auto"
    """Loss kernels: "auto" (fused Triton kernels on CUDA when triton imports, else
    PyTorch), "torch" or "triton" (docs/performance.md)."""
    vopd_fused_output: bool = False
    """Fuse both models' output layers into the loss: the last stage never holds
    the [s*b, V/tp] logits; vocabulary tiles of them are formed from the final
    hidden states and output weights on the fly, and the student's are recomputed
    in backward (docs/loss.md). Same values and gradients, one more GEMM."""
    teacher_fp8: bool = False
    """Run the teacher's transformer layers in FP8 through Transformer Engine
    (e4m3, tensorwise recipe, TE layer spec); the student and both models' logits
    stay in their dtype. Needs TE, an FP8-capable GPU and GEMM dimensions that
    are multiples of 16 (model/fp8.py)."""
    teacher_model_config: str | None = flag_field(None, "--export-kd-teacher-model-config")
    """YAML of the teacher's Megatron-LM model flags that differ from the student's
    (flag or argparse names as keys; ModelOpt's --export-kd-teacher-model-config is
    the same flag). Default: model_config.yaml in --teacher-load."""
    vopd_updates_per_batch: int = ranged(1, 1)
    """Optimizer steps per rollout batch. Above 1 the later steps are off-policy:
    needs --vopd-ppo-clip, and rollouts that carry the sampler's log-probs (the
    PPO ratio's denominator)."""

    def loss_config(self) -> LossConfig:
        """The LossConfig these flags describe; ConfigError in the flags' words if it cannot work.

        Built once per set of values: RunConfig.validate builds it, and the trainer
        gets the same (immutable) object."""
        return _loss_config(
            mode=self.vopd_loss, top_k=self.vopd_top_k, temperature=self.vopd_temperature,
            rollout_correction=self.vopd_rollout_correction,
            rollout_correction_cap=self.vopd_rollout_correction_cap, ppo_clip=self.vopd_ppo_clip,
            backend=self.vopd_loss_backend,
        )


@functools.lru_cache(maxsize=32)
def _loss_config(**values) -> LossConfig:
    try:
        return LossConfig(**values)
    except LossConfigError as exc:
        raise ConfigError(exc.flags) from exc


@dataclass
class DataArgs:
    """Prompts, rollouts and sampling (the plugin's flags; --tokenizer-model is Megatron-LM's)."""

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
    rollout_max_new_tokens: int = ranged(32, 1)
    """Completion tokens at most per on-policy rollout."""
    rollout_top_k: int = ranged(0, 0)
    """0 = unfiltered sampling (what the OPD/vOPD estimators assume)."""
    rollout_top_p: float = ranged(0.0, 0, 1)
    """In [0, 1]; 0.0 = unfiltered sampling (what the OPD/vOPD estimators assume)."""
    eos_id: int | None = ranged(None, 0)
    """End-of-sequence token id (< the vocabulary size): an on-policy completion stops after it."""
    rollout_stop: str | None = None
    """Stop string: a completion (rollouts and evaluation) ends after the token that
    completes it in the decoded text; several as a JSON list, e.g. '["</answer>", "\\n\\n"]'.
    Needs --tokenizer-model."""
    rollout_batch_size: int = ranged(64, 1)
    """Prompts per static generation batch."""
    tokenizer_model: str | None = field(default=None, metadata={"megatron": True})
    """Student tokenizer (Megatron-LM's --tokenizer-model): tokenizer.json, a Hugging
    Face tokenizer directory, or a sentencepiece model; needed for text prompts."""


@dataclass
class EvalArgs:
    """Periodic evaluation inside vopd-train, and vopd-eval (docs/eval.md)."""

    eval_data: str | None = None
    """JSONL (or Parquet) of problems with reference answers; problems are tokenized as training prompts are."""
    eval_problem_field: str = "problem"
    """Field holding the problem (text, chat `messages`, or token ids) in --eval-data."""
    eval_answer_field: str = "answer"
    """Field holding the reference answer in --eval-data (graded with math-verify)."""
    eval_every: int = ranged(0, 0)
    """vopd-train: evaluate --eval-data at iteration 0, every N iterations and after
    the last one; 0 = never. (Megatron-LM's --eval-interval is its validation-loss
    interval, which vopd-train does not run.)"""
    eval_samples: int = ranged(1, 1)
    """Completions sampled per problem (n)."""
    eval_pass_k: int | None = ranged(None, 1)
    """k of pass@k (unbiased estimator from n samples); defaults to --eval-samples."""
    eval_max_problems: int | None = ranged(None, 1)
    """Evaluate only the first M problems of --eval-data; None = all."""
    eval_temperature: float | None = ranged(None, 0, lo_open=True)
    """Sampling temperature of evaluation; defaults to --vopd-temperature."""
    eval_max_new_tokens: int | None = ranged(None, 1)
    """Completion tokens at most in evaluation; defaults to --rollout-max-new-tokens."""
    eval_output: str | None = None
    """vopd-eval: directory for summary.json and per-problem records (problems.jsonl)."""
