"""Megatron side of `--vopd-fused-output`: the last stage hands the loss the output
layer's input and weight instead of logits.

megatron-core's GPTModel.forward takes an `output_processor` hook that replaces
its output layer (the hidden states after the final norm and the output
weight, or the tied embedding, are passed to it). `output_layer_input` is that
hook: it returns an `OutputLayerInput` holding

* `hidden [s, b, H]`: the hidden states exactly as ColumnParallelLinear would
  feed its GEMM -- through Megatron's own sequence-parallel all-gather
  (`gather_from_sequence_parallel_region`, backward reduce-scatter) when the
  output layer is sequence parallel, else through
  `copy_to_tensor_model_parallel_region` (backward all-reduce, what the layer's
  `allreduce_dgrad` does), so the hidden-state gradient is reduced over TP as
  it is today;
* `weight [V/tp, H]`: the Parameter itself. The fused loss's backward returns
  its gradient through autograd, so Megatron's DDP hooks accumulate it into
  the gradient buffer, and with tied embeddings it is the embedding weight
  (one stage) or the last stage's copy whose gradient finalize_model_grads
  all-reduces with the first stage's -- the same as for the logits path.

A holder rather than a tuple: Float16Module upcasts every bf16 tensor (and
tuple of tensors) a last stage returns, which would copy the weight to fp32;
it passes other objects through untouched.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass
class OutputLayerInput:
    """What the output layer would have multiplied: `hidden @ weight^T` are the logits."""

    hidden: torch.Tensor  # [s, b, H] (sequence-parallel gathered, TP-copied)
    weight: torch.Tensor  # [V/tp, H] the output layer's (or tied embedding's) Parameter


def output_layer_input(*, hidden_states, output_layer, output_weight, **_) -> OutputLayerInput:
    """GPTModel `output_processor` hook: the output layer's input and weight, no logits."""
    from megatron.core.tensor_parallel import (
        copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    )

    weight = output_weight if output_weight is not None else output_layer.weight
    group = output_layer.tp_group
    if output_layer.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True, group=group)
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden_states, group=group)
    return OutputLayerInput(hidden=hidden, weight=weight)


def output_processor_supported() -> bool:
    """megatron-core's GPTModel.forward takes the `output_processor` hook (0.19 does)."""
    from megatron.core.models.gpt import GPTModel

    return "output_processor" in inspect.signature(GPTModel.forward).parameters


def fused_output_problems(model) -> list[str]:
    """Why this GPTModel's output layer cannot be replaced by the fused loss ([] if it can)."""
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model)
    problems = []
    if "output_processor" not in inspect.signature(type(gpt).forward).parameters:
        return ["this megatron-core's GPTModel.forward has no output_processor hook (needs >= 0.19)"]
    if not getattr(gpt, "post_process", False):
        return problems
    config = gpt.config
    from megatron.core.tensor_parallel import ColumnParallelLinear

    if not isinstance(gpt.output_layer, ColumnParallelLinear):
        problems.append(f"the output layer is {type(gpt.output_layer).__name__} (e.g. an MXFP8 output projection), "
                        "not a plain ColumnParallelLinear")
    if getattr(gpt.output_layer, "bias", None) is not None:
        problems.append("the output layer has a bias")
    if getattr(config, "use_mup", False):
        problems.append("MuP scales the logits after the output layer")
    if getattr(config, "mtp_num_layers", None):
        problems.append("multi-token prediction uses the output layer itself")
    if getattr(config, "defer_embedding_wgrad_compute", False):
        problems.append("--defer-embedding-wgrad-compute computes the output weight's gradient itself")
    return problems
