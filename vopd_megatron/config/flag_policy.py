"""What vopd-train does with each of Megatron-LM's flags.

Every flag of `megatron.training.arguments.add_megatron_arguments` is
accepted by the parser with Megatron-LM's default. A flag given with a value
other than its default is then one of:

* **honoured** with Megatron-LM's meaning: it reaches the typed config that
  uses it (TransformerConfig through `core_transformer_config_from_args`, the
  optimizer / DDP configs through Megatron's own helpers, or a RunConfig
  field). `ARCHITECTURE`, `MODEL_SHARED` and `MODEL_KERNELS` are carried per
  model (a teacher config may change the first and the last);
  `TRAINING` and `RUN` belong to the run. Some are honoured only for some
  values (`VALUE_RULES`).
* **no effect**, with a `warning:` line (`NO_EFFECT`): it changes nothing
  that is trained in vopd-train (profiling, extra logging, communication
  overlap, Megatron-LM's validation loss). Those Megatron's DDP or optimizer
  would still act on (`RESET`) go back to their defaults; the rest keep
  their value (e.g. cross_entropy_loss_fusion stays in the TransformerConfig,
  as Megatron-LM builds it, but no loss of ours reads it).
* **refused** with a one-line `error:` naming the flag and the reason
  (`REFUSED`, first matching rule); anything not listed above is refused as
  "not supported", so a flag added to a later Megatron-LM release is never
  silently ignored.

docs/megatron_flags.md is generated from these tables
(`python -m vopd_megatron.config.flag_policy > docs/megatron_flags.md`) and a
test keeps it current.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Model shape and numerics, per model: the teacher's config may change these.
ARCHITECTURE = frozenset({
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "kv_channels", "max_position_embeddings", "position_embedding_type",
    "use_rotary_position_embeddings", "add_position_embedding", "rotary_base", "rotary_percent",
    "rotary_interleaved", "rotary_seq_len_interpolation_factor", "use_rope_scaling", "rope_scaling_factor",
    "normalization", "layernorm_epsilon", "layernorm_zero_centered_gamma", "swiglu", "squared_relu", "quick_geglu",
    "add_bias_linear", "add_qkv_bias", "qk_layernorm", "untie_embeddings_and_output_weights",
    "apply_residual_connection_post_layernorm", "fp32_residual_connection", "apply_query_key_layer_scaling",
    "attention_softmax_in_fp32", "hidden_dropout", "attention_dropout", "init_method_std",
    "embedding_init_method_std", "init_method_xavier_uniform", "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers",
})
#: Per model, but the teacher must have the student's value (one token space, one sequence).
MODEL_SHARED = frozenset({"seq_length", "vocab_size", "padded_vocab_size", "make_vocab_size_divisible_by"})
#: Kernels, recomputation and precision recipes: TransformerConfig fields that change no parameter.
MODEL_KERNELS = frozenset({
    "attention_backend", "masked_softmax_fusion", "bias_gelu_fusion", "bias_swiglu_fusion", "bias_dropout_fusion",
    "apply_rope_fusion", "no_persist_layer_norm", "gradient_accumulation_fusion", "recompute_activations",
    "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
    "distribute_saved_activations", "disable_bf16_reduced_precision_matmul", "transformer_impl",
    "use_cpu_initialization", "perform_initialization", "clone_scatter_output_in_embedding",
    "fp8", "fp8_recipe", "fp8_margin", "fp8_interval", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_wgrad",
    "fp8_param_gather", "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16",
    "use_te_activation_func", "config_logger_dir",
})
#: Optimizer, LR / weight-decay schedule, precision and data-parallel gradient handling.
TRAINING = frozenset({
    "micro_batch_size", "global_batch_size", "train_iters", "train_samples", "lr", "min_lr", "lr_decay_style",
    "lr_decay_iters", "lr_decay_samples", "lr_wsd_decay_style", "lr_wsd_decay_iters", "lr_wsd_decay_samples",
    "lr_warmup_fraction", "lr_warmup_iters", "lr_warmup_samples", "lr_warmup_init", "override_opt_param_scheduler",
    "use_checkpoint_opt_param_scheduler", "start_weight_decay", "end_weight_decay", "weight_decay_incr_style",
    "weight_decay", "apply_wd_to_qk_layernorm", "no_weight_decay_cond_type", "clip_grad", "adam_beta1", "adam_beta2",
    "adam_eps", "sgd_momentum", "optimizer", "decoupled_lr", "decoupled_min_lr", "bf16", "seed",
    "calculate_per_token_loss", "accumulate_allreduce_grads_in_fp32", "grad_reduce_in_bf16",
    "check_for_nan_in_loss_and_grad", "ddp_average_in_collective", "exit_interval", "exit_duration_in_mins",
})
#: Layout, checkpoints, logging, tokenizer and process-group settings the entry point applies.
RUN = frozenset({
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel", "use_distributed_optimizer",
    "context_parallel_size", "distributed_timeout_minutes", "distributed_backend", "local_rank", "save", "load",
    "save_interval", "finetune", "ckpt_format", "log_interval", "tensorboard_dir", "tokenizer_type",
    "tokenizer_model",
})
HONOURED = ARCHITECTURE | MODEL_SHARED | MODEL_KERNELS | TRAINING | RUN
#: What a teacher config may set to a value other than the student's (the resulting vocabulary,
#: padded vocabulary and sequence length must still be the student's: RunConfig.validate).
TEACHER_MAY_DIFFER = ARCHITECTURE | MODEL_KERNELS | MODEL_SHARED

#: dest -> (admissible values, why): honoured flags with values vopd-train cannot run.
VALUE_RULES: dict[str, tuple[frozenset, str]] = {
    "position_embedding_type": (frozenset({"learned_absolute", "rope", "none"}),
                                "yarn, mrope and relative position embeddings are not supported"),
    "normalization": (frozenset({"LayerNorm", "RMSNorm"}), "only LayerNorm and RMSNorm are supported"),
    "optimizer": (frozenset({"adam", "sgd"}), "only Megatron-Core's adam and sgd are wired in"),
    "ckpt_format": (frozenset({"torch_dist"}), "checkpoints are Megatron-Core torch_dist"),
    "context_parallel_size": (frozenset({1}), "context parallelism is not supported (the loss and the "
                                              "rollouts need whole sequences on a rank)"),
    "transformer_impl": (frozenset({"transformer_engine", "local"}),
                         "only the Transformer Engine and local layer specs are supported"),
    "tokenizer_type": (frozenset({None, "HuggingFaceTokenizer", "SentencePieceTokenizer",
                                  "GPTSentencePieceTokenizer", "Llama2Tokenizer", "NullTokenizer"}),
                       "vopd-train reads Hugging Face and sentencepiece tokenizers (--tokenizer-model), "
                       "or none (NullTokenizer with --vocab-size)"),
    "distributed_backend": (frozenset({"nccl"}), "the backend is chosen automatically: nccl with CUDA, gloo without"),
    "lr_decay_style": (frozenset({"constant", "linear", "cosine", "inverse-square-root", "WSD"}),
                       "Megatron-LM's OptimizerParamScheduler styles only"),
}

_OVERLAP = "gradients are reduced once after the backward pass and parameters gathered after the step: no overlap"
_LOGS = "vopd-train logs its own metrics (console every --log-interval, TensorBoard with --tensorboard-dir)"
#: dest -> why it changes nothing here (a warning says so).
NO_EFFECT: dict[str, str] = {
    **{d: "Megatron-LM's profiler hooks are not wired into vopd-train" for d in (
        "profile", "profile_step_start", "profile_step_end", "use_pytorch_profiler", "pytorch_profiler_collect_shapes",
        "pytorch_profiler_collect_callstack", "pytorch_profiler_collect_chakra", "profile_ranks",
        "record_memory_history", "memory_snapshot_path", "record_shapes", "nvtx_ranges")},
    **{d: _LOGS for d in (
        "log_params_norm", "log_throughput", "log_progress", "timing_log_level", "timing_log_option",
        "tensorboard_log_interval", "tensorboard_queue_size", "log_timers_to_tensorboard",
        "log_loss_scale_to_tensorboard", "log_validation_ppl_to_tensorboard", "log_memory_to_tensorboard",
        "log_memory_interval", "log_device_memory_used", "log_num_zeros_in_grad", "log_world_size_to_tensorboard",
        "wandb_project", "wandb_exp_name", "wandb_save_dir", "wandb_entity", "logging_level", "log_energy",
        "barrier_with_L1_time", "log_straggler", "straggler_ctrlr_port", "straggler_minmax_count",
        "disable_straggler_on_startup", "enable_one_logger", "one_logger_project", "one_logger_run_name",
        "one_logger_async", "app_tag_run_name", "app_tag_run_version")},
    **{d: "memory housekeeping of Megatron-LM's training loop; no effect on what is trained" for d in (
        "manual_gc", "manual_gc_interval", "manual_gc_eval", "empty_unused_memory_level")},
    **{d: "Megatron-LM's validation loss on its data pipeline, which vopd-train does not run; held-out "
          "problems are evaluated with --eval-data and --eval-every" for d in (
        "eval_iters", "eval_interval", "eval_micro_batch_size", "eval_global_batch_size", "start_eval_at_iter")},
    **{d: _OVERLAP for d in (
        "overlap_grad_reduce", "overlap_param_gather", "align_grad_reduce", "align_param_gather", "ddp_bucket_size",
        "ddp_num_buckets", "ddp_pad_buckets_for_high_nccl_busbw", "overlap_p2p_comm")},
    **{d: "vopd-train's loss is the distillation loss and vopd-sft uses Megatron-Core's unfused "
          "vocab-parallel cross entropy" for d in ("cross_entropy_loss_fusion", "cross_entropy_fusion_impl")},
    **{d: "checkpoints are written and read by vopd_megatron's own torch_dist code" for d in (
        "ckpt_fully_parallel_save", "ckpt_fully_parallel_load", "ckpt_assume_constant_structure",
        "dist_ckpt_workers", "ckpt_fully_parallel_save_process_group", "ckpt_fully_parallel_load_process_group",
        "ckpt_fully_parallel_load_exchange_algo")},
    **{d: "Megatron-LM's data loader is not used (no --data-path)" for d in (
        "num_workers", "data_cache_path", "mmap_bin_files", "create_attention_mask_in_dataloader",
        "num_dataset_builder_threads", "dataloader_type", "split")},
    **{d: "no code reads it in Megatron-LM 0.19 either" for d in ("openai_gelu", "onnx_safe", "use_flash_attn")},
}
#: No-effect flags put back to their defaults, since Megatron's DDP / optimizer configs read them.
RESET = frozenset({"overlap_grad_reduce", "overlap_param_gather", "align_grad_reduce", "align_param_gather",
                   "ddp_bucket_size", "ddp_num_buckets", "ddp_pad_buckets_for_high_nccl_busbw"})
#: Deprecated Megatron-LM flags that mean nothing in 0.19 and are accepted without a word.
SILENT = frozenset({"deprecated_use_mcore_models", "use_dist_ckpt_deprecated", "dist_ckpt_format_deprecated",
                    "ckpt_fully_parallel_save_deprecated", "disable_msc_deprecated"})

_DATA = ("Megatron-LM's pretraining data pipeline is not used: give --prompt-data (on-policy prompts) "
         "or --rollout-data (rollouts from an external sampler)")
#: (dests, dest prefixes, argparse group titles, why): the first rule that matches refuses the flag.
REFUSED: tuple[tuple[frozenset, tuple, frozenset, str], ...] = (
    (frozenset({"data_path", "train_data_path", "valid_data_path", "test_data_path", "data_args_path",
                "per_split_data_args_path", "per_dataset_sequences_path", "mock_data", "phase_transition_iterations",
                "encoder_seq_length", "decoder_seq_length", "vocab_file", "merge_file", "vocab_extra_ids",
                "tiktoken_pattern", "tiktoken_num_special_tokens", "special_tokens", "metadata_path", "chat_template",
                "skip_train", "full_validation", "multiple_validation_sets", "validation_set_names"}),
     ("fim_", "dataloader_", "reset_", "eod_mask", "mask_prob", "short_seq", "sample_rate", "object_storage",
      "mid_level", "allow_ambiguous"), frozenset({"data and dataloader"}), _DATA),
    (frozenset({"fp16", "loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis",
                "fp16_lm_cross_entropy"}), (), frozenset(),
     "fp16 training (loss scaling) is not wired into the distillation step: use --bf16"),
    (frozenset({"num_experts"}), ("moe_", "expert_"), frozenset({"moe"}),
     "mixture-of-experts models are not supported (dense GPT models only)"),
    (frozenset({"multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
                "v_head_dim", "rotary_scaling_factor", "mscale", "mscale_all_dim", "cache_mla_latents", "rope_type"}),
     ("mla_",), frozenset({"mla"}), "multi-latent attention is not supported"),
    (frozenset(), ("mtp_",), frozenset(), "multi-token prediction is not supported"),
    (frozenset({"hybrid_layer_pattern", "hybrid_override_pattern", "is_hybrid_model"}), ("mamba_",), frozenset(),
     "hybrid (Mamba) models are not supported"),
    (frozenset({"experimental_attention_variant", "softmax_type", "attention_output_gate", "window_size",
                "window_attn_skip_freq", "no_rope_freq", "qk_l2_norm", "qk_clip", "qk_clip_alpha",
                "qk_clip_threshold", "glu_linear_offset", "activation_func_clamp_value", "use_mup"}),
     ("dsa_", "linear_", "mup_", "yarn_", "relative_attention"), frozenset({"heterogeneous architecture"}),
     "this attention / layer variant is not supported (GPT layers of Megatron-Core's standard specs only)"),
    (frozenset({"num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank",
                "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                "account_for_loss_in_pipeline_split", "microbatch_group_size_per_vp_stage",
                "overlap_p2p_comm_warmup_flush", "use_ring_exchange_p2p", "pipeline_model_parallel_comm_backend"}),
     (), frozenset(),
     "interleaved (virtual) pipelines and custom layouts are not supported: use "
     "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers for uneven stages"),
    (frozenset({"hierarchical_context_parallel_sizes", "cp_comm_type", "hybrid_context_parallel",
                "max_seqlen_per_dp_cp_rank"}), (), frozenset(), "context parallelism is not supported"),
    (frozenset({"enable_cuda_graph", "external_cuda_graph", "optimizer_cuda_graph"}), ("cuda_graph",), frozenset(),
     "CUDA graphs are not supported"),
    (frozenset({"fine_grained_activation_offloading", "offload_modules", "optimizer_cpu_offload",
                "optimizer_offload_fraction", "use_torch_optimizer_for_cpu_offload", "overlap_cpu_optimizer_d2h_h2d",
                "pin_cpu_grads", "pin_cpu_params"}), ("cpu_offloading",), frozenset(), "offloading is not supported"),
    (frozenset({"fp4", "fp4_recipe", "fp4_param_gather", "fp4_quantizer_factory", "fp8_quantizer_factory",
                "te_precision_config_file", "fp8_output_proj"}), ("kitchen", "use_kitchen"), frozenset(),
     "this quantisation recipe is not supported (FP8 through --fp8-format only)"),
    (frozenset({"use_megatron_fsdp", "use_torch_fsdp2", "data_parallel_sharding_strategy",
                "torch_fsdp2_reshard_after_forward", "num_distributed_optimizer_instances",
                "use_layer_wise_param_layout", "enable_full_sharding_in_hsdp"}),
     ("megatron_fsdp", "fsdp_"), frozenset(), "FSDP is not supported: use --use-distributed-optimizer"),
    (frozenset({"use_precision_aware_optimizer", "main_grads_dtype", "main_params_dtype", "exp_avg_dtype",
                "exp_avg_sq_dtype"}), ("muon_", "lion_"), frozenset(),
     "only Megatron-Core's standard adam / sgd with fp32 state is wired in"),
    (frozenset({"rampup_batch_size", "step_batch_size_schedule", "decrease_batch_size_if_needed"}), (), frozenset(),
     "batch-size ramps are not supported: the global batch size is fixed"),
    (frozenset({"yaml_cfg"}), (), frozenset(), "use --config FILE.yaml (flag names as keys)"),
    (frozenset({"use_checkpoint_args", "use_mp_args_from_checkpoint_args", "use_tokenizer_model_from_checkpoint_args"}),
     (), frozenset(), "the model's flags are given explicitly (the teacher's may come from its model_config.yaml)"),
    (frozenset({"spec"}), (), frozenset(), "custom layer specs are not supported"),
    (frozenset({"tp_comm_overlap", "tp_comm_overlap_cfg", "tp_comm_bootstrap_backend", "tp_comm_overlap_rs_dgrad",
                "tp_comm_bulk_wgrad", "tp_comm_bulk_dgrad", "tp_comm_overlap_ag", "tp_comm_overlap_rs",
                "tp_comm_split_ag", "tp_comm_split_rs", "delay_wgrad_compute", "defer_embedding_wgrad_compute",
                "wgrad_deferral_limit"}), (), frozenset(),
     "tensor-parallel communication overlap needs Transformer Engine userbuffers, which vopd-train does not set up"),
    (frozenset({"perform_rl_step", "sft", "sft_tokenizer_prompt_format"}), ("rl_", "grpo_", "langrl", "refit_"),
     frozenset({"rl", "sft", "Logits Distillation", "inference"}),
     "Megatron-LM's RL / SFT / inference / logits-distillation loops are not used: vopd-train samples with "
     "--rollout-* flags, vopd-sft trains supervised"),
    (frozenset({"encoder_num_layers", "decoder_num_layers", "bert_binary_head"}), (), frozenset(
        {"vision", "biencoder", "autoresume", "In-process restart", "ft_package", "fault injector", "msc",
         "workload inspector", "rerun engine"}), "not part of GPT distillation in vopd-train"),
    (frozenset({"batch_size", "warmup", "checkpoint_activations", "model_parallel_size"}), (), frozenset(),
     "removed from Megatron-LM, which refuses it too (see its --help for the replacement)"),
    (frozenset({"tensor_parallel_num_weight_shards", "expert_tensor_parallel_num_weight_shards"}), (), frozenset(),
     "tensor-parallel weight sharding (GTP) is not supported"),
    (frozenset({"te_rng_tracker", "inference_rng_tracker", "data_parallel_random_init"}), (), frozenset(),
     "vopd-train seeds Megatron-Core's RNG tracker itself (--seed; the teacher's initialisation uses seed + 1)"),
    (frozenset({"exit_signal_handler", "exit_signal", "exit_signal_handler_for_dataloader",
                "exit_signal_handler_for_training"}), (), frozenset(),
     "save-on-signal is not implemented: use --exit-duration-in-mins or --exit-interval"),
    (frozenset({"iterations_to_skip", "result_rejected_tracker_filename", "check_for_large_grads",
                "check_weight_hash_across_dp_replicas_interval", "gpu_sniff_test_interval", "train_sync_interval",
                "freeze_all_layers", "dump_param_to_param_group_map", "deterministic_mode"}), (), frozenset(),
     "this part of Megatron-LM's training loop is not implemented in vopd-train"),
    (frozenset({"flash_decode", "mrope_section", "min_offloaded_tensor_size", "delay_offload_until_cuda_graph",
                "delta_offload_bytes_across_pp_ranks", "activation_offload_fraction",
                "fine_grained_offloading_max_inflight_offloads", "symmetric_ar_type", "nccl_all_reduce_for_prefill",
                "use_grouped_gemm_for_dense_mlp", "use_grouped_gemm_for_shared_expert", "mlp_chunks_for_prefill",
                "mlp_chunks_for_training", "high_priority_a2a_comm_stream", "use_fused_weighted_squared_relu",
                "fused_residual_rmsnorm", "use_transformer_engine_op_fuser", "flash_attention_version",
                "init_model_with_meta_device", "batch_invariant_mode", "overlap_moe_expert_parallel_comm",
                "overlap_dispatch_backward_with_experts_wgrad", "ep_overlap_early_attn_memory_release"}),
     ("inference_",), frozenset(), "this kernel / inference / offloading option is not supported by vopd-train"),
    (frozenset({"pretrained_checkpoint", "ckpt_step", "exit_on_missing_checkpoint", "no_save_optim", "no_save_rng",
                "no_load_optim", "no_load_rng", "override_ckpt_iteration", "replication", "replication_jump",
                "replication_factor", "verify_integrity"}),
     ("save_", "non_persistent", "ckpt_", "async_", "dist_ckpt", "load_main_params", "strict_fsdp",
      "stream_ckpt"), frozenset({"checkpointing"}),
     "vopd-train writes and reads checkpoints with its own torch_dist code (--save, --save-interval, --load, "
     "--finetune); this Megatron-LM checkpoint option is not implemented there"),
)
REFUSED += (
    (frozenset({"trust_remote_code", "pad_vocab_size"}), ("tokenizer_sentencepiece", "tokenizer_hf_", "null_tokenizer"),
     frozenset(), "vopd-train loads tokenizers with its own loader (--tokenizer-model: tokenizer.json, a Hugging "
                  "Face directory or a sentencepiece model); this option is not applied"),
    (frozenset({"lazy_mpu_init", "nccl_communicator_config_path", "use_tp_pp_dp_mapping", "use_gloo_process_groups",
                "use_sharp", "sharp_enabled_group", "high_priority_stream_groups",
                "distributed_timeout_seconds_after_init", "fake_process_group", "nccl_ub",
                "disable_symmetric_registration", "create_all_gather_group", "outer_dp_sharding_strategy",
                "gradient_reduce_div_fusion", "suggested_communication_unit_size", "keep_fp8_transpose_cache",
                "ddp_reduce_scatter_with_fp32_accumulation", "ddp_param_name_patterns_for_fp32_local_accumulation",
                "overlap_param_gather_with_optimizer_step", "reuse_grad_buf_for_mxfp8_param_ag", "disable_jit_fuser"}),
     ("flight_recorder",), frozenset(),
     "vopd-train sets up its process groups and DDP itself; this Megatron-LM option is not applied"),
)
NOT_SUPPORTED = "not supported by vopd-train (not wired into its training loop)"


@dataclass(frozen=True)
class Verdict:
    kind: str  # "honoured", "no_effect", "silent" or "refused"
    reason: str


def runconfig_dests() -> frozenset:
    """Megatron-LM dests that a field of a Megatron-backed RunConfig section carries: honoured by
    construction (so a field another module adds, e.g. CheckpointArgs.no_load_optim, needs no edit here)."""
    from dataclasses import fields

    from .schema import CheckpointArgs, LoggingArgs, ModelArgs, ParallelArgs, TrainArgs

    renamed = {"norm_epsilon": "layernorm_epsilon", "disable_bias_linear": "add_bias_linear"}
    return frozenset(renamed.get(f.name, f.name) for cls in (ModelArgs, ParallelArgs, TrainArgs, CheckpointArgs,
                                                             LoggingArgs)
                     for f in fields(cls) if f.name != "megatron_overrides" and not f.metadata.get("plugin"))


def classify(dest: str, group: str) -> Verdict:
    """What vopd-train does with a Megatron-LM flag (by argparse dest) set to a non-default value."""
    if dest in SILENT:
        return Verdict("silent", "deprecated; no effect in Megatron-LM 0.19")
    if dest in HONOURED or dest in runconfig_dests():
        rule = VALUE_RULES.get(dest)
        return Verdict("honoured", f"only {rule[1]}" if rule else "")
    if dest in NO_EFFECT:
        return Verdict("no_effect", NO_EFFECT[dest])
    for dests, prefixes, groups, reason in REFUSED:
        if dest in dests or dest.startswith(prefixes) or group in groups:
            return Verdict("refused", reason)
    return Verdict("refused", NOT_SUPPORTED)


def markdown_table(actions) -> str:
    """docs/megatron_flags.md: every Megatron-LM flag that is not simply honoured, with the reason.

    actions: (option strings, dest, group title) of every Megatron-LM flag."""
    rows = {"refused": [], "no_effect": [], "value": []}
    for options, dest, group in actions:
        verdict = classify(dest, group)
        name = " / ".join(f"`{o}`" for o in options)
        if verdict.kind == "honoured" and dest in VALUE_RULES:
            allowed = ", ".join(sorted(str(v) for v in VALUE_RULES[dest][0]))
            rows["value"].append(f"| {name} | honoured for {allowed} | {VALUE_RULES[dest][1]} |")
        elif verdict.kind in ("refused", "no_effect"):
            rows[verdict.kind].append(f"| {name} | {'error' if verdict.kind == 'refused' else 'warning, ignored'} "
                                      f"| {verdict.reason} |")
    head = "| flag | what vopd-train does | why |\n| --- | --- | --- |\n"
    return (
        "# Megatron-LM flags vopd-train refuses, ignores or restricts\n\n"
        "Generated from `vopd_megatron/config/flag_policy.py` by\n"
        "`python -m vopd_megatron.config.flag_policy > docs/megatron_flags.md` (a test keeps it current).\n"
        "Every other Megatron-LM 0.19 flag is honoured with Megatron-LM's default and meaning\n"
        "(docs/training.md). A flag given with its default value is always accepted.\n\n"
        f"## Honoured for some values only ({len(rows['value'])})\n\n" + head + "\n".join(rows["value"]) + "\n\n"
        f"## Accepted with a warning, no effect ({len(rows['no_effect'])})\n\n" + head
        + "\n".join(rows["no_effect"]) + "\n\n"
        f"## Refused with an error ({len(rows['refused'])})\n\n" + head + "\n".join(rows["refused"]) + "\n"
    )


if __name__ == "__main__":
    from .megatron_args import megatron_actions

    print(markdown_table(megatron_actions()), end="")
