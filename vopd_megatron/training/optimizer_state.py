"""Optimizer-state plumbing for checkpoints: formats and the torch-Adam workarounds.

megatron-core's distributed optimizer saves its state in a chosen sharding
format; `fully_reshardable` stores it in model-parameter space so it reshards
across TP/PP/DP. Without Transformer Engine or apex the inner optimizer is
torch's Adam, which megatron-core 0.19 cannot restore into directly (see
`load_optimizer`); `prime_torch_adam_state` and `load_optimizer` work around it.
"""
from __future__ import annotations

import torch

DISTOPT_SHARDING = "fully_reshardable"  # model-space, reshardable across TP/PP/DP
#: distributed-optimizer checkpoint formats `load_optimizer` reads, and the method that reads each
LOADABLE_DISTOPT_FORMATS = {
    "fully_reshardable": "load_parameter_state_from_fully_reshardable",
    "fully_sharded_model_space": "load_parameter_state_from_fs_model_space",
    "dp_reshardable": "load_parameter_state_from_dp_reshardable",
}


def distopt_sharding_type(optimizer) -> str | None:
    """The DistributedOptimizer format to save in (None without a distributed optimizer)."""
    if optimizer is None or not any(_is_distopt(o) for o in _megatron_optimizers(optimizer)):
        return None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    formats = getattr(DistributedOptimizer, "checkpoint_fully_reshardable_formats", ())
    return DISTOPT_SHARDING if DISTOPT_SHARDING in formats else "fully_sharded_model_space"  # 0.16


def sharded_metadata(distopt_sharding: str | None) -> dict:
    """The `metadata` Megatron-LM passes to model and optimizer `sharded_state_dict` (torch_dist)."""
    from megatron.core import parallel_state as ps

    metadata = dict(singleton_local_shards=False, chained_optim_avoid_prefix=True)
    if distopt_sharding is not None:
        metadata["distrib_optim_sharding_type"] = distopt_sharding
        # The default exchange all-gathers through `.cuda()` tensors; without a GPU
        # use the gloo gather to DP rank 0 (same checkpoint content, per megatron-core).
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = not torch.cuda.is_available()
    if ps.model_parallel_is_initialized():
        metadata["dp_cp_group"] = ps.get_data_parallel_group(with_context_parallel=True)
    return metadata


def _megatron_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _is_distopt(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(optimizer, DistributedOptimizer)


def _is_torch_adam(inner) -> bool:
    """A torch Adam/AdamW: megatron-core's optimizer when neither TE nor apex is installed."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def prime_torch_adam_state(optimizer) -> None:
    """Give a fresh distributed optimizer's torch Adam zero moments and `step` before a load.

    `DistributedOptimizer.sharded_state_dict(is_loading=True)` first calls its
    `state_dict()`, which (without TE/apex) reads the common `step` from the
    per-parameter states and asserts there is exactly one: on an optimizer that
    has not stepped yet there are none. The values are overwritten by the load.
    """
    for megatron_optimizer in _megatron_optimizers(optimizer):
        inner = getattr(megatron_optimizer, "optimizer", None)
        if not (_is_distopt(megatron_optimizer) and _is_torch_adam(inner)) or inner.state:
            continue
        megatron_optimizer.init_state_fn(inner, megatron_optimizer.config)
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.tensor(0.0))


def load_optimizer(optimizer, state) -> None:
    """`optimizer.load_state_dict(state)`, except for a distributed optimizer over torch Adam.

    Without TE/apex, megatron-core 0.19's `DistributedOptimizer.load_state_dict`
    puts one `step` tensor into every parameter's Adam state and then fails
    (KeyError 'step') copying the model-space parameter state, which has no
    `step`. So for those: load the common part (param groups, `step`), set the
    `step`s aside, load the parameter state, and give each parameter its own
    copy of `step` back: a shared tensor would be incremented once per
    parameter per step by torch Adam (MEGATRON_ON_CPU.md trap 4).
    """
    subs = _megatron_optimizers(optimizer)
    if len(subs) > 1 and isinstance(state, dict):  # ChainedOptimizer: one state per sub-optimizer, by index
        state = [state[k] for k in sorted(state)]
    for sub, sub_state in zip(subs, state if len(subs) > 1 else [state]):
        inner = getattr(sub, "optimizer", None)
        if not (_is_distopt(sub) and _is_torch_adam(inner) and "param_state" in sub_state):
            sub.load_state_dict(sub_state)
            continue
        sub_state = dict(sub_state)
        param_state = sub_state.pop("param_state")
        kind = sub_state.pop("param_state_sharding_type")
        sub.load_state_dict(sub_state)
        steps = {p: s.pop("step") for p, s in inner.state.items() if "step" in s}
        loader = LOADABLE_DISTOPT_FORMATS[kind]
        getattr(sub, loader)(param_state)
        for p, step in steps.items():
            inner.state[p]["step"] = step.clone()
    if len(subs) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()
