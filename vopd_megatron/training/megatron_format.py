"""Megatron-LM's side of a torch_dist checkpoint: what it writes and reads beside the tensors.

Megatron-LM's `megatron.training.checkpointing` keeps, next to the model
(`model`, `model0`, ...) and optimizer (`optimizer`) shards, whose keys are
megatron-core's and identical to ours:

- `args`: its argparse Namespace. The loader reads the layout from it (TP/PP,
  world and DP size), checks the model shape (`num_layers`, `hidden_size`,
  `num_attention_heads`, ...) and takes the data position
  (`consumed_train_samples`); `--use-checkpoint-args` copies the whole shape.
- `iteration`, `checkpoint_version` (3.0), `num_floating_point_operations_so_far`.
- `opt_param_scheduler`: the scheduler's state, counted in samples.
- `rng_state`: one `ShardedObject` over the (PP, TP) grid, replicated over DP,
  holding a one-element list of the host, CUDA and tracker RNG states.
- content metadata: the distributed optimizer's sharding format.

Without `iteration` Megatron-LM's `load_checkpoint` calls `sys.exit()`: a
`pretrain_gpt.py` job resumed from a checkpoint that lacks it ends with exit
status 0 before training. `save_checkpoint` therefore writes all of the above;
`checkpoint_info` reads them from a checkpoint Megatron-LM wrote.

`args` is built with Megatron-LM's own parser (every attribute present, with
its default) from flags that describe the saved model and, given a RunConfig,
the run's schedule; a caller that already holds Megatron-LM's Namespace passes
it and only the layout and progress fields are updated.
"""
from __future__ import annotations

import argparse
import copy
import functools
import logging
import os
from dataclasses import dataclass

import torch

CHECKPOINT_VERSION = 3.0  # what Megatron-LM's generate_state_dict writes
RNG_KEY = "rng_state"
_LAYOUT_FIELDS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "world_size",
                  "data_parallel_size", "context_parallel_size")


@functools.cache
def _parser() -> argparse.ArgumentParser:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    from megatron.training.arguments import add_megatron_arguments

    # Importing megatron.training points the root logger at stdout, level INFO
    # (training.py's basicConfig): every library's INFO lines would flood the run's output.
    root.handlers[:], root.level = handlers, level
    parser = argparse.ArgumentParser(prog="megatron-lm", allow_abbrev=False)
    return add_megatron_arguments(parser)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flags(values: dict, switches: dict) -> list[str]:
    """`--name value` for the values that are set, `--name` for the switches that are on."""
    flags = [f for k, v in values.items() if v is not None for f in (_flag(k), str(v))]
    return flags + [_flag(k) for k, on in switches.items() if on]


def flags_from_model(chunk) -> list[str]:
    """Megatron-LM flags that rebuild the shape of `chunk` (a GPTModel, wrapped or not)."""
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(chunk)
    c = gpt.config
    gqa = c.num_query_groups not in (None, c.num_attention_heads)
    return _flags(
        dict(num_layers=c.num_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
             num_query_groups=c.num_query_groups if gqa else None,
             ffn_hidden_size=c.ffn_hidden_size, kv_channels=c.kv_channels, normalization=c.normalization,
             norm_epsilon=c.layernorm_epsilon, init_method_std=c.init_method_std,
             attention_dropout=c.attention_dropout, hidden_dropout=c.hidden_dropout,
             max_position_embeddings=getattr(gpt, "max_sequence_length", None),
             position_embedding_type=getattr(gpt, "position_embedding_type", None),
             decoder_first_pipeline_num_layers=c.num_layers_in_first_pipeline_stage,
             decoder_last_pipeline_num_layers=c.num_layers_in_last_pipeline_stage),
        dict(group_query_attention=gqa, swiglu=c.gated_linear_unit, disable_bias_linear=not c.add_bias_linear,
             add_qkv_bias=c.add_qkv_bias, qk_layernorm=c.qk_layernorm, bf16=c.bf16,
             untie_embeddings_and_output_weights=not getattr(gpt, "share_embeddings_and_output_weights", True)),
    )


def namespace_from_model_args(m) -> argparse.Namespace:
    """Megatron-LM's Namespace for a model of shape `m` (ModelArgs), e.g. a converted checkpoint's."""
    gqa = m.query_groups != m.num_attention_heads
    flags = _flags(
        dict(num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
             num_query_groups=m.query_groups if gqa else None, ffn_hidden_size=m.ffn_size, kv_channels=m.head_dim,
             normalization=m.normalization, norm_epsilon=m.norm_epsilon,
             position_embedding_type=m.position_embedding_type, rotary_base=m.rotary_base,
             rotary_percent=m.rotary_percent, rope_scaling_factor=m.rope_scaling_factor,
             max_position_embeddings=m.max_position_embeddings, vocab_size=m.vocab_size,
             make_vocab_size_divisible_by=m.make_vocab_size_divisible_by),
        dict(group_query_attention=gqa, swiglu=m.swiglu, disable_bias_linear=m.disable_bias_linear,
             add_qkv_bias=m.add_qkv_bias, qk_layernorm=m.qk_layernorm, use_rope_scaling=m.use_rope_scaling,
             untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights),
    )
    args = _parser().parse_args(flags)
    args.padded_vocab_size = m.padded_vocab_size(1)
    return args


def flags_from_run(run) -> list[str]:
    """The run's schedule and data flags (RunConfig field names are Megatron-LM's flag names)."""
    t, m = run.train, run.model
    values = dict(
        micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size, train_iters=t.train_iters,
        lr=t.lr, min_lr=t.min_lr, lr_decay_style=t.lr_decay_style, lr_warmup_iters=t.lr_warmup_iters,
        lr_decay_iters=t.lr_decay_iters, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad, seed=t.seed,
        seq_length=m.seq_length, vocab_size=m.vocab_size, make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        rotary_base=m.rotary_base, rotary_percent=m.rotary_percent,
        save=run.checkpoint.save, load=run.checkpoint.load, save_interval=run.checkpoint.save_interval,
    )
    flags = [f for k, v in values.items() if v is not None for f in (_flag(k), str(v))]
    return flags + (["--calculate-per-token-loss"] if t.calculate_per_token_loss else [])


def megatron_namespace(model: list, run=None) -> argparse.Namespace:
    """Megatron-LM's Namespace for a checkpoint of `model` (and `run`'s schedule, when given)."""
    flags = flags_from_model(model[0]) + (flags_from_run(run) if run is not None else [])
    seq = [f for f in flags if f == "--seq-length"]
    if not seq:  # Megatron-LM requires one; the model's position table is the longest it can take
        flags += ["--seq-length", flags[flags.index("--max-position-embeddings") + 1]]
    args = _parser().parse_args(flags)
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model[0])
    args.padded_vocab_size = getattr(gpt, "vocab_size", None)  # Megatron-LM sets it when it builds the tokenizer
    args.params_dtype = gpt.config.params_dtype
    args._is_global_batch_size_explicitly_specified = args.global_batch_size is not None
    return args


def checkpoint_args(args: argparse.Namespace, layout: dict, *, iteration: int, consumed_samples: int,
                    has_optimizer: bool, distopt_sharding: str | None) -> argparse.Namespace:
    """A copy of `args` describing this save: its layout, progress and what it holds."""
    out = copy.copy(args)
    out.tensor_model_parallel_size, out.pipeline_model_parallel_size = layout.get("tp", 1), layout.get("pp", 1)
    out.transformer_pipeline_model_parallel_size = out.pipeline_model_parallel_size
    out.world_size, out.data_parallel_size = layout["world_size"], layout.get("dp", layout["world_size"])
    out.context_parallel_size = layout.get("cp", 1)
    out.rank = 0  # rank 0's copy (Megatron-LM's too)
    out.ckpt_format, out.use_dist_ckpt = "torch_dist", True
    out.iteration, out.consumed_train_samples = iteration, consumed_samples
    out.skipped_train_samples = getattr(out, "skipped_train_samples", 0) or 0
    out.consumed_valid_samples = getattr(out, "consumed_valid_samples", 0) or 0
    out.no_save_optim, out.no_save_rng = not has_optimizer, False
    out.use_distributed_optimizer = distopt_sharding is not None
    out.dist_ckpt_optim_fully_reshardable = distopt_sharding == "fully_reshardable"
    return out


def comparable_args(args) -> dict:
    """`args` as a dict without the fields that legitimately differ across ranks."""
    out = dict(vars(args))
    out.pop("rank", None)
    out.pop("local_rank", None)
    return out


def content_metadata(sharded_metadata: dict) -> dict:
    """What megatron-core stores as the checkpoint's content metadata: the sharding format, not
    the exchange algorithm or the process group (the loader picks its own)."""
    skip = ("dp_cp_group", "distrib_optim_fully_reshardable_mem_efficient")
    return {k: v for k, v in sharded_metadata.items() if k not in skip}


# --- RNG state in Megatron-LM's format --------------------------------------------------------


def rng_sharded_object(host_state: dict | None):
    """Megatron-LM's `rng_state` ShardedObject of this rank: one entry per (PP, TP) rank,
    DP ranks are replicas. `host_state`: `rng_state.get_rng_state()`'s dict (None to load)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    data = None if host_state is None else [to_megatron_rng(host_state)]
    if not ps.model_parallel_is_initialized():
        return ShardedObject(RNG_KEY, data, (1, 1), (0, 0), replica_id=0)
    return ShardedObject(
        RNG_KEY, data,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def to_megatron_rng(state: dict) -> dict:
    """Our RNG dict in Megatron-LM's key names. Without CUDA the CPU generator plays the CUDA
    generator's part (as vopd_megatron.megatron.cpu_compat maps it)."""
    return {
        "random_rng_state": state["random"], "np_rng_state": state["numpy"], "torch_rng_state": state["torch"],
        "cuda_rng_state": state["cuda"] if state["cuda"] is not None else state["torch"],
        "rng_tracker_states": state["tracker"],
    }


def from_megatron_rng(saved: list, dp_rank: int, data_parallel_random_init: bool) -> dict:
    """Megatron-LM's saved RNG list -> our RNG dict (the DP rank's entry when it kept one per rank)."""
    entry = saved[dp_rank] if data_parallel_random_init and len(saved) > dp_rank else saved[0]
    cuda = entry.get("cuda_rng_state") if torch.cuda.is_available() else None
    return {"random": entry["random_rng_state"], "numpy": entry["np_rng_state"],
            "torch": entry["torch_rng_state"], "cuda": cuda, "tracker": entry["rng_tracker_states"]}


# --- reading a checkpoint's description -------------------------------------------------------


@dataclass
class CheckpointInfo:
    """What a checkpoint holds, whoever wrote it."""

    path: str
    iteration: int
    ours: bool  # written by vopd_megatron (has the `vopd` common key)
    layout: dict | None  # our layout dict (world_size, model_chunks, tp, pp, cp, dp); None: unknown
    has_optimizer: bool
    distopt_sharding: str | None  # the distributed optimizer's format, None for a plain optimizer
    base_seed: int | None
    state: dict  # the run state: at least iteration and consumed_samples
    args: argparse.Namespace | None  # Megatron-LM's Namespace, when the checkpoint has one
    has_rng: bool  # Megatron-LM's `rng_state`
    has_scheduler: bool


def checkpoint_info(path: str, iteration: int, common: dict, tensor_keys) -> CheckpointInfo:
    """Describe the checkpoint at `path` from its common state and its stored tensor keys."""
    args = common.get("args")
    args = args if isinstance(args, argparse.Namespace) else None
    content = common.get("content_metadata") or {}
    ours = common.get("vopd")
    if ours is not None:
        return CheckpointInfo(
            path, ours["iteration"], True, ours["layout"], ours["has_optimizer"],
            ours["distrib_optim_sharding_type"], ours["base_seed"], ours["state"], args,
            _has_rng(tensor_keys), "opt_param_scheduler" in common,
        )
    has_optimizer = "optimizer" in common or any(k.startswith("optimizer.") for k in tensor_keys)
    consumed = int(getattr(args, "consumed_train_samples", 0) or 0)
    iteration = int(common.get("iteration", iteration))
    layout = None
    if args is not None:
        layout = dict(world_size=getattr(args, "world_size", None), tp=getattr(args, "tensor_model_parallel_size", 1),
                      pp=getattr(args, "pipeline_model_parallel_size", 1),
                      cp=getattr(args, "context_parallel_size", 1), dp=getattr(args, "data_parallel_size", None))
    sharding = content.get("distrib_optim_sharding_type")
    if sharding is None and getattr(args, "use_distributed_optimizer", False) and has_optimizer:
        sharding = "fully_sharded_model_space" if getattr(args, "ckpt_fully_parallel_save", False) \
            else "dp_zero_gather_scatter"  # Megatron-LM's reading of checkpoints without content metadata
    return CheckpointInfo(
        path, iteration, False, layout, has_optimizer, sharding, getattr(args, "seed", None),
        {"iteration": iteration, "consumed_samples": consumed}, args,
        _has_rng(tensor_keys), "opt_param_scheduler" in common,
    )


def _has_rng(tensor_keys) -> bool:
    return any(k.startswith(RNG_KEY + "/") for k in tensor_keys)  # ShardedObjects: `key/shard_...`


def describe_model(args) -> str:
    """The model shape a checkpoint's args record, for error messages ('' when unknown)."""
    if args is None:
        return ""
    names = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
             "kv_channels", "padded_vocab_size", "normalization", "swiglu", "untie_embeddings_and_output_weights")
    gqa = getattr(args, "group_query_attention", False)  # Megatron-LM ignores num_query_groups without it
    parts = [f"{n}={getattr(args, n)}" for n in names
             if getattr(args, n, None) is not None and (gqa or n != "num_query_groups")]
    return "the checkpoint was saved with " + ", ".join(parts)


def tensor_keys(path: str) -> list[str]:
    """Keys of the tensors and objects stored in a torch_dist checkpoint (its `.metadata` index)."""
    from torch.distributed.checkpoint import FileSystemReader

    return list(FileSystemReader(path).read_metadata().state_dict_metadata) if os.path.isdir(path) else []
