"""One runner for Megatron's pipeline schedule, shared by every command.

Distillation, supervised training, evaluation's reverse KL and the variance
tool all do the same thing: zero the DDP gradient buffers, run Megatron's
forward/backward schedule (`get_forward_backward_func`: no pipelining at
PP = 1, 1F1B otherwise) over this rank's microbatches, and let Megatron's
`finalize_model_grads` all-reduce the gradients and divide them by the
batch's token count. What differs is the forward step (what the model sees
and which loss closes it) and the modules the schedule runs; both are given.

A forward step here is `forward_step(mask, data_iterator, model)`: Megatron's
`forward_step_func` with the `[1, 1, s, s]` causal mask bound first (built
once per call, on the batch's device).
"""
from __future__ import annotations

from functools import partial

from ..model.masks import causal_mask


def wire_grad_hooks(config, ddp_chunks: list) -> None:
    """Point the schedule's gradient hooks (read from the model config `config`)
    at the DDP chunks whose gradients a step finalizes. No overlap: gradients
    are reduced once, in `finalize_model_grads`."""
    from megatron.core.distributed import finalize_model_grads

    config.no_sync_func = ddp_chunks[0].no_sync
    config.grad_sync_func = None
    # The schedule passes its own module list (e.g. the distillation stages);
    # the gradients to finalize are the DDP chunks'.
    config.finalize_model_grads_func = lambda _modules, *a, **kw: finalize_model_grads(ddp_chunks, *a, **kw)


def run_pipeline(modules: list, forward_step, microbatches: list[dict], *, seq_length: int, micro_batch_size: int,
                 grad_chunks: list = (), forward_only: bool = False, adjust_tensor_shapes_fn=None) -> list[dict]:
    """Megatron's schedule over `microbatches` (this DP rank's, each `[b, s]`).

    modules: what the schedule runs (one per virtual stage); grad_chunks: the
    DDP chunks whose gradient buffers are zeroed first (ignored when
    forward_only). Returns the last stage's per-microbatch metrics ([] on
    other stages)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not forward_only:
        for chunk in grad_chunks:
            chunk.zero_grad_buffer()
    mask = causal_mask(seq_length, microbatches[0]["tokens"].device)  # [1, 1, s, s]
    kwargs = {} if adjust_tensor_shapes_fn is None else {"adjust_tensor_shapes_fn": adjust_tensor_shapes_fn}
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, mask), data_iterator=iter(microbatches), model=modules,
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only, **kwargs)
